"""Op-level benchmark of peftcore's quantized-base LoRA ops on CPU (QLoRA-style layers).

Per format (nf4, fp4: bitsandbytes 4-bit with double quantization, blocksize 64; int8:
LLM.int8) and token count T, a stack of 4096x4096 layers whose weights together exceed
the last-level cache many times over, so every layer streams its weight from DRAM as in
a real model. One timed call = one pass over the stack (same x for every layer); the
report is per layer. Candidates:
  (a) bnb        bitsandbytes alone: bnb.nn.Linear4bit (compute_dtype bf16, eval mode,
                 already converted to its packed AVX512-BF16 CPU layout by a warm-up
                 forward) / bnb.nn.Linear8bitLt (has_fp16_weights=False, threshold 6.0);
  (b) bnb+PEFT   the same layers wrapped by peft.get_peft_model, LoRA r=16
                 (init_lora_weights=False, fp32 adapters as PEFT keeps them);
  (c) peftcore   torch.ops.peftcore.lora_linear_4bit / lora_linear_int8 with one r=16
                 fp32 adapter, scale 2.0, on bitsandbytes' standard (checkpoint) layout.
Candidates run interleaved (a b c c b a ...) under torch.inference_mode(); times are
medians of the repeats, ratios medians of the per-round ratios; benchmarks/timing.py
measures the read bandwidth in the same run. x in bf16 and in float32 (bitsandbytes rounds
float32 x to bf16; peftcore by default too, PEFTCORE_QUANT_FP32=exact keeps float32).
GB/s = bytes of the stored quantized weight (packed codes + block / row scales, as in
the checkpoint) per layer / time per layer.

AVX2 table (--isa avx2): an AVX2-only CPU, emulated on this AVX-512 machine. The script
re-runs itself with ATEN_CPU_CAPABILITY=avx2 (torch's own kernels, and bitsandbytes'
int8 path, which keys on it, take their AVX2 code), ONEDNN_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2 (the GEMM libraries behind F.linear) and
PEFTCORE_CPU_ISA=avx2 (peftcore's AVX2 kernels); bitsandbytes' Linear4bit is told the CPU lacks AVX512-BF16 (so it keeps the
standard layout and dequantizes + runs F.linear, its path on such CPUs; its dequantize
itself still uses the AVX-512 code it was built with, which favours bitsandbytes). For a
peftcore build without any AVX-512 code, build with PEFTCORE_CPU_BASELINE=avx2 first.

Usage: python benchmarks/bench_quant.py [--quick] [--bf16-only] [--formats nf4,fp4,int8] [--isa avx2]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import warnings

if "--isa" in sys.argv and os.environ.get("PEFTCORE_CPU_ISA") != "avx2":
    # Before torch is imported: re-run with the AVX2 settings (see the docstring).
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
               PEFTCORE_CPU_ISA="avx2")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
AVX2 = os.environ.get("PEFTCORE_CPU_ISA") == "avx2"

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import env_line, interleaved_samples, read_bandwidth_gbs  # noqa: E402

import peftcore  # noqa: E402

# bitsandbytes logs per call on CPU (e.g. about float16 inputs / compute dtypes) and at
# import (a kernel hub it cannot reach): silence all of it.
logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")
import bitsandbytes as bnb  # noqa: E402

DIM = 4096
RANK = 16
SCALE = 2.0
BLOCKSIZE = 64
TOKENS = [1, 16, 128]
# (peftcore with adapter) / (bitsandbytes alone) at T = 1 / 16 / 128, for bf16 and float32 x
# (issue 15); and (peftcore) / (bitsandbytes + PEFT) at every T and format.
GOALS = {"nf4": (0.95, 1.00, 1.00), "fp4": (0.95, 1.00, 1.00), "int8": (0.75, 0.80, 1.00)}
GOAL_VS_PEFT = 0.85


class Block(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.blocks = nn.ModuleList(Block(l) for l in layers)


def _weight(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(DIM, DIM, generator=g) / DIM**0.5


def build_4bit(quant_type: str, n_layers: int):
    """bnb Linear4bit layers (to be packed for CPU), and per layer the standard-layout
    arguments of peftcore::lora_linear_4bit (cloned before bitsandbytes repacks)."""
    layers, std = [], []
    for i in range(n_layers):
        lin = bnb.nn.Linear4bit(DIM, DIM, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type,
                                compress_statistics=True)
        lin.weight = bnb.nn.Params4bit(_weight(i), requires_grad=False, quant_type=quant_type,
                                       compress_statistics=True, blocksize=BLOCKSIZE)
        lin = lin.to("cpu").eval()  # quantizes
        if AVX2:
            lin.support_avx512bf16_for_cpu = False  # bitsandbytes' path on CPUs without AVX512-BF16
        q, st = lin.weight.data.clone(), copy.deepcopy(lin.weight.quant_state)
        args = (q, st.absmax, st.code, st.blocksize, st.state2.absmax, st.state2.code,
                st.offset.reshape(()).float(), st.state2.blocksize, DIM)
        nbytes = sum(t.numel() * t.element_size() for t in (q, st.absmax, st.state2.absmax, st.state2.code))
        layers.append(lin)
        std.append(args)
    return layers, std, nbytes


def build_int8(n_layers: int):
    layers, std = [], []
    for i in range(n_layers):
        lin = bnb.nn.Linear8bitLt(DIM, DIM, bias=False, has_fp16_weights=False, threshold=6.0)
        lin.weight = bnb.nn.Int8Params(_weight(i), requires_grad=False, has_fp16_weights=False)
        lin = lin.to("cpu").eval()  # quantizes: CB int8 [out, in], SCB float32 [out]
        CB, SCB = lin.weight.data, lin.weight.SCB
        assert CB.dtype == torch.int8
        layers.append(lin)
        std.append((CB, SCB))
    nbytes = CB.numel() * CB.element_size() + SCB.numel() * SCB.element_size()
    return layers, std, nbytes


def adapters(n_layers: int):
    out = []
    for i in range(n_layers):
        g = torch.Generator().manual_seed(10_000 + i)
        A = torch.randn(RANK, DIM, generator=g) / DIM**0.5
        B = torch.randn(DIM, RANK, generator=g) / RANK**0.5
        out.append((A, B))
    return out


def bench_format(fmt: str, n_layers: int, dtypes, repeats: int, rows: list):
    import peft

    if fmt == "int8":
        layers, std, nbytes = build_int8(n_layers)
    else:
        layers, std, nbytes = build_4bit(fmt, n_layers)
    ads = adapters(n_layers)
    scales = torch.tensor([SCALE])
    total_mib = nbytes * n_layers / 2**20
    print(f"\n### {fmt}: {n_layers} layers of {DIM}x{DIM}, {nbytes / 2**20:.2f} MiB stored per layer, "
          f"{total_mib:.0f} MiB in all (cycled)\n", flush=True)

    # (b): PEFT wraps the very same bitsandbytes modules (shared weights).
    model = Stack(layers)
    cfg = peft.LoraConfig(target_modules=["proj"], r=RANK, lora_alpha=RANK * SCALE, lora_dropout=0.0,
                          init_lora_weights=False)
    pmodel = peft.get_peft_model(model, cfg)
    wrapped = [b.proj for b in pmodel.base_model.model.blocks]
    assert all(w.base_layer is l for w, l in zip(wrapped, layers))

    if fmt == "int8":
        def ours(x, i):
            A, B = ads[i]
            return torch.ops.peftcore.lora_linear_int8(x, *std[i], None, [A], [B], None, scales, None)
    else:
        def ours(x, i):
            A, B = ads[i]
            return torch.ops.peftcore.lora_linear_4bit(x, *std[i], None, [A], [B], None, scales, None)

    print("| format | x dtype | T | bnb ms/layer | bnb+PEFT ms/layer | peftcore ms/layer | peftcore / bnb (goal) "
          "| peftcore / (bnb+PEFT) (goal) | bnb+PEFT / bnb | bnb GB/s | peftcore GB/s |")
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for dtype in dtypes:
        for ti, T in enumerate(TOKENS):
            x = torch.randn(T, DIM, generator=torch.Generator().manual_seed(T)).to(dtype)
            with torch.inference_mode():
                # warm-up forward: bitsandbytes converts Linear4bit to its packed CPU layout here
                y_bnb = layers[0](x)
                y_ours = ours(x, 0)
                # sanity: same stored weight, so the two agree up to rounding + the adapter
                A, B = ads[0]
                lora = ((x.float() @ A.t()) @ B.t()) * SCALE
                rel = ((y_ours.float() - lora) - y_bnb.float()).norm() / y_bnb.float().norm()
                assert rel < (0.1 if fmt == "int8" else 0.02), f"{fmt} {dtype} T={T}: peftcore vs bnb rel diff {rel:.3g}"

                def run(fn):
                    def go():
                        for i in range(n_layers):
                            fn(x, i)
                    return go

                t = interleaved_samples(
                    {
                        "bnb": run(lambda x, i: layers[i](x)),
                        "peft": run(lambda x, i: wrapped[i](x)),
                        "ours": run(ours),
                    },
                    repeats=repeats,
                    warmup=1,
                )
            a, b, c = (statistics.median(t[k]) / n_layers for k in ("bnb", "peft", "ours"))
            # ratios: medians of the per-round ratios (calls moments apart; this host's drift
            # moves separate medians by more than the effects measured)
            r_bnb = statistics.median(o / n for o, n in zip(t["ours"], t["bnb"]))
            r_peft = statistics.median(o / p for o, p in zip(t["ours"], t["peft"]))
            r_pb = statistics.median(p / n for p, n in zip(t["peft"], t["bnb"]))
            goal = GOALS[fmt][ti]
            print(
                f"| {fmt} | {str(dtype)[6:]} | {T} | {a * 1e3:.3f} | {b * 1e3:.3f} | {c * 1e3:.3f} | "
                f"{r_bnb:.3f} (<= {goal:.2f}: {'met' if r_bnb <= goal else 'NOT met'}) | "
                f"{r_peft:.3f} (<= {GOAL_VS_PEFT:.2f}: {'met' if r_peft <= GOAL_VS_PEFT else 'NOT met'}) | {r_pb:.2f} | "
                f"{nbytes / a / 1e9:.1f} | {nbytes / c / 1e9:.1f} |",
                flush=True,
            )
            rows.append((fmt, dtype, T, a, b, c))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: few layers (weights may stay in cache), 3 repeats")
    ap.add_argument("--bf16-only", action="store_true", help="skip float32 x (bitsandbytes computes it in bf16)")
    ap.add_argument("--formats", default="nf4,fp4,int8")
    ap.add_argument("--layers-4bit", type=int, default=24, help="nf4 / fp4 layers (8.3 MiB each)")
    ap.add_argument("--layers-int8", type=int, default=16, help="int8 layers (16 MiB each)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--isa", choices=["avx2"], help="emulate an AVX2-only CPU (see the docstring)")
    args = ap.parse_args()
    n4, n8, reps = (4, 2, 3) if args.quick else (args.layers_4bit, args.layers_int8, args.repeats)
    dtypes = [torch.bfloat16] + ([] if args.bf16_only else [torch.float32])

    print(f"<!-- {env_line()}; bitsandbytes {bnb.__version__}; "
          f"peftcore native: {peftcore.native_available('lora_linear_4bit')} (4bit), "
          f"{peftcore.native_available('lora_linear_int8')} (int8) -->")
    if AVX2:
        print(f"AVX2-only emulation: torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              "PEFTCORE_CPU_ISA=avx2, bitsandbytes Linear4bit without its AVX512-BF16 path")
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, r = {RANK}, blocksize {BLOCKSIZE} (nested absmax), "
          f"{'QUICK (weights may stay in cache)' if args.quick else 'weights streamed from DRAM'}")
    bw = read_bandwidth_gbs()
    print(f"read bandwidth (1 GiB sum, best of 5): {bw:.1f} GB/s")
    if not peftcore.native_available("lora_linear_4bit"):
        print("NOTE: no native quantized kernels in this build: peftcore runs the pure-PyTorch reference (slow).")
    rows: list = []
    for fmt in args.formats.split(","):
        bench_format(fmt, n8 if fmt == "int8" else n4, dtypes, reps, rows)
    print(f"\nread bandwidth measured: {bw:.1f} GB/s (ceiling for the GB/s columns)")


if __name__ == "__main__":
    main()
