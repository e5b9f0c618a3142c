"""The quantized base kernels alone, with the layer in cache: peftcore's lora_linear_4bit
(no adapter) against bitsandbytes' Linear4bit on one 4096 x 4096 nf4 layer (8 MiB, inside
the 32 MiB LLC), x bf16, for 1-16 token rows; with and without double quantization.

What the compute costs, apart from streaming the weight from memory (bench_quant.py) and
the adapter: reported is the 10th percentile of 300 calls per candidate (the compute-bound
time; the host's noise only adds), in µs, and the ratio. 2 threads.

    python benchmarks/bench_quant_kernel.py [--tokens 1,2,3,4,8,16]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import env_line  # noqa: E402

logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")
import bitsandbytes as bnb  # noqa: E402

import peftcore  # noqa: E402, F401  (registers the ops)

DIM = 4096


def p10(fn, calls=300):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[calls // 10] * 1e6


def layer(nested: bool):
    lin = bnb.nn.Linear4bit(DIM, DIM, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=nested)
    w = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0)) / DIM**0.5
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=nested, blocksize=64)
    lin = lin.to("cpu").eval()
    q, st = lin.weight.data.clone(), copy.deepcopy(lin.weight.quant_state)
    quant = (q, st.absmax, st.code, st.blocksize)
    quant += (st.state2.absmax, st.state2.code, st.offset.reshape(()).float(), st.state2.blocksize) if nested \
        else (None, None, None, 256)
    return lin, quant


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,3,4,8,16")
    args = ap.parse_args()
    print(env_line())
    print("| nf4 | T | bitsandbytes µs | peftcore µs | peftcore / bitsandbytes |")
    print("|---|---:|---:|---:|---:|")
    empty = torch.empty(0)
    for nested in (True, False):
        lin, quant = layer(nested)
        with torch.inference_mode():
            for T in [int(t) for t in args.tokens.split(",")]:
                x = torch.randn(T, DIM, generator=torch.Generator().manual_seed(T)).bfloat16()
                a = p10(lambda: lin(x))
                b = p10(lambda: torch.ops.peftcore.lora_linear_4bit(x, *quant, DIM, None, [], [], None, empty, None))
                print(f"| {'double quant' if nested else 'plain absmax'} | {T} | {a:.0f} | {b:.0f} | {b / a:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
