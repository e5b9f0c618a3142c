"""The quantized bases' errors, peftcore's against bitsandbytes' own, as
tests/ops/test_quantized_ops.py measures them (the accuracy table of README.md).

One 256 x 512 layer quantized by bitsandbytes (nf4 / fp4 with and without double
quantization, blocksize 64; LLM.int8 with threshold 6.0 and 0.0), with a bias, no adapter;
x of 1, 16, 64 and 130 rows in bf16 and float32 (int8: with outlier features, a few columns
x 8, and once without). The oracle: x·Wᵀ + b in float64 with W = bitsandbytes' dequantized weight. Printed:
RMS and max error of each, and peftcore's / bitsandbytes' ratios; float32 x both by
default and with PEFTCORE_QUANT_FP32=exact.

    python benchmarks/quant_accuracy.py
"""
from __future__ import annotations

import copy
import logging
import os
import warnings

import torch

logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")
import bitsandbytes as bnb  # noqa: E402
from bitsandbytes import functional as bnbF  # noqa: E402

import peftcore  # noqa: E402, F401  (registers the ops)

TOKENS = (1, 16, 64, 130)


def _x(T, dtype, outliers=False):
    x = torch.randn(T, 512, generator=torch.Generator().manual_seed(T))
    if outliers:
        x[:, ::97] *= 8.0
    return x.to(dtype)


def _err(y, oracle):
    e = y.double() - oracle
    return e.pow(2).mean().sqrt().item(), e.abs().max().item()


def _weight():
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(1234)) / 512**0.5


def layers():
    bias = torch.randn(256, generator=torch.Generator().manual_seed(5)) * 0.1
    for qt in ("nf4", "fp4"):
        for nested in (True, False):
            lin = bnb.nn.Linear4bit(512, 256, bias=True, compute_dtype=torch.bfloat16, quant_type=qt,
                                    compress_statistics=nested)
            lin.weight = bnb.nn.Params4bit(_weight(), requires_grad=False, quant_type=qt, compress_statistics=nested,
                                           blocksize=64)
            lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
            lin = lin.to("cpu").eval()
            q, st = lin.weight.data.clone(), copy.deepcopy(lin.weight.quant_state)
            W = bnbF.dequantize_4bit(q, st).reshape(256, 512).float().double()
            quant = (q, st.absmax, st.code, st.blocksize)
            quant += (st.state2.absmax, st.state2.code, st.offset.reshape(()).float(), st.state2.blocksize) if nested \
                else (None, None, None, 256)

            def ours(x, quant=quant):
                return torch.ops.peftcore.lora_linear_4bit(x, *quant, 256, bias.to(x.dtype), [], [], None,
                                                           torch.zeros(0), None)
            yield f"{qt}{' nested' if nested else ''}", lin, W, bias, ours, False
    for thr in (6.0, 0.0):
        lin = bnb.nn.Linear8bitLt(512, 256, bias=True, has_fp16_weights=False, threshold=thr)
        lin.weight = bnb.nn.Int8Params(_weight(), requires_grad=False, has_fp16_weights=False)
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
        lin = lin.to("cpu").eval()
        CB, SCB = lin.weight.data, lin.weight.SCB
        W = bnbF.int8_vectorwise_dequant(CB, SCB).double()

        def ours(x, CB=CB, SCB=SCB):
            return torch.ops.peftcore.lora_linear_int8(x, CB, SCB, bias.to(x.dtype), [], [], None, torch.zeros(0),
                                                       None)
        yield f"int8 threshold {thr}", lin, W, bias, ours, True
        if thr == 6.0:
            yield "int8 threshold 6.0, x without outlier features", lin, W, bias, ours, False


def main():
    print("| weight | x | T | peftcore rms / max | bitsandbytes rms / max | ratio rms / max |")
    print("|---|---|---:|---|---|---|")
    for name, lin, W, bias, ours, outliers in layers():
        for dtype, exact in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
            for T in TOKENS:
                x = _x(T, dtype, outliers)
                # the bias as both are given it (bitsandbytes casts its own in place)
                oracle = x.double() @ W.t() + bias.to(dtype).double()
                with torch.no_grad():
                    y_bnb = lin(x)
                if exact:
                    os.environ["PEFTCORE_QUANT_FP32"] = "exact"
                y = ours(x)
                os.environ.pop("PEFTCORE_QUANT_FP32", None)
                (ro, mo), (rb, mb) = _err(y, oracle), _err(y_bnb, oracle)
                xs = str(dtype)[6:] + (" exact" if exact else "")
                print(f"| {name} | {xs} | {T} | {ro:.2e} / {mo:.2e} | {rb:.2e} / {mb:.2e} | {ro / rb:.2f} / {mo / mb:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
