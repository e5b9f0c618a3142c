"""Where the quantized bases switch from the fused panel kernels to the tiled decode + GEMM
path (csrc/cpu/quant_linear.cpp, kGemmRows4bit / kGemmRowsInt8), and what it buys.

peftcore::lora_linear_4bit (nf4, double quantization, blocksize 64) and lora_linear_int8 on a
2816 x 1024 layer (a Llama MLP shape), no adapter, bf16 and float32 x, at several token
counts. Each count is timed twice: with the GEMM path as shipped, and in a child process
with PEFTCORE_QUANT_GEMM=0 (panel kernels at every count). A stack of copies of the layer
larger than 64 MiB is cycled so the packed weights stream from memory. Medians of the
repeats, ms per layer; thread count and read bandwidth printed.

    python benchmarks/bench_quant_gemm.py [--rows 8,12,16,32,48,64,128,256] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from timing import env_line, read_bandwidth_gbs  # noqa: E402

N, K = 2816, 1024


def measure(rows, repeats):
    """{(format, dtype, rows): median ms per layer} in this process."""
    import peftcore  # noqa: F401
    from tests.op_db import quantize_4bit, quantize_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) / K**0.5
    q4 = quantize_4bit(w, 64, "nf4", True)
    cb, scb = quantize_int8(w)
    per4 = q4["qweight"].numel() + 4 * q4["absmax"].numel()
    copies = {"nf4": max(2, (64 << 20) // per4 + 1), "int8": max(2, (64 << 20) // cb.numel() + 1)}
    stacks = {
        "nf4": [(q4["qweight"].clone(), q4["absmax"].clone(), q4["code"], q4["blocksize"], q4["nested_absmax"],
                 q4["nested_code"], q4["nested_offset"], q4["nested_blocksize"], N) for _ in range(copies["nf4"])],
        "int8": [(cb.clone(), scb.clone()) for _ in range(copies["int8"])],
    }
    ops = {"nf4": torch.ops.peftcore.lora_linear_4bit, "int8": torch.ops.peftcore.lora_linear_int8}
    s0 = torch.zeros(0)
    out = {}
    with torch.inference_mode():
        for fmt, stack in stacks.items():
            for dt in (torch.bfloat16, torch.float32):
                for r in rows:
                    x = torch.randn(r, K, dtype=dt, generator=g)
                    for wa in stack[:2]:
                        ops[fmt](x, *wa, None, [], [], None, s0, None)
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        for wa in stack:
                            ops[fmt](x, *wa, None, [], [], None, s0, None)
                        times.append((time.perf_counter() - t0) / len(stack) * 1e3)
                    out[f"{fmt}|{str(dt)[6:]}|{r}"] = statistics.median(times)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="8,12,16,32,48,64,128,256")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        print(json.dumps(measure(rows, args.repeats)))
        return
    print(env_line())
    print(f"read bandwidth (1 GiB sum, best of 5): {read_bandwidth_gbs():.1f} GB/s")
    shipped = measure(rows, args.repeats)
    env = dict(os.environ, PEFTCORE_QUANT_GEMM="0")
    r = subprocess.run([sys.executable, __file__, "--child", "--rows", args.rows, "--repeats", str(args.repeats)],
                       env=env, capture_output=True, text=True, check=True)
    panel = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n## {N} x {K} layer, ms per layer: panel kernels (PEFTCORE_QUANT_GEMM=0) / as shipped\n")
    print("| format | x | " + " | ".join(f"T={t}" for t in rows) + " |")
    print("|---|---|" + "---:|" * len(rows))
    for fmt in ("nf4", "int8"):
        for dt in ("bfloat16", "float32"):
            cells = [f"{panel[f'{fmt}|{dt}|{t}']:.2f} / {shipped[f'{fmt}|{dt}|{t}']:.2f}" for t in rows]
            print(f"| {fmt} | {dt} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
