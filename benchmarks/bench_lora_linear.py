"""Op-level benchmark of peftcore::lora_linear on CPU.

Compares, per shape / token count / dtype (r = 16, one fp32 adapter as PEFT keeps them):
  * F.linear            the frozen layer alone (the floor),
  * eager reference     F.linear + the low-rank branch as separate matmuls, the PEFT way
                        (reference.lora_linear: x.to(fp32) @ Aᵀ @ Bᵀ · s, add, cast back),
  * fused               torch.ops.peftcore.lora_linear (native kernel).
Then the same for peftcore::lora_embedding, peftcore::ia3_linear (both directions: the eager
PEFT (IA)³ forward vs the fused op) and peftcore::lora_linear with lora_E (AdaLoRA: eager
PEFT SVDLinear chain vs fused).
Weights are cycled through > 128 MiB of copies so that every call streams them from
DRAM, as in a real model; candidates run interleaved and the median is reported.
Prints Markdown tables.  Usage: python benchmarks/bench_lora_linear.py [--quick] [--tables ia3,adalora]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import env_line, interleaved, read_bandwidth_gbs  # noqa: E402

import peftcore  # noqa: E402
from peftcore import reference  # noqa: E402

SHAPES = [(4096, 4096), (2048, 5632)]
TOKENS = [1, 16, 256]
DTYPES = [torch.float32, torch.bfloat16]
RANK = 16
STREAM_BYTES = 128 << 20


def bench_case(fin, fout, T, dtype, repeats):
    w_bytes = fin * fout * dtype.itemsize
    copies = max(2, -(-STREAM_BYTES // w_bytes) + 1)
    Ws = [torch.randn(fout, fin, dtype=dtype) / fin**0.5 for _ in range(copies)]
    bs = [torch.randn(fout, dtype=dtype) for _ in range(copies)]
    As = [torch.randn(RANK, fin) / fin**0.5 for _ in range(copies)]
    Bs = [torch.randn(fout, RANK) for _ in range(copies)]
    scales = torch.tensor([2.0])
    x = torch.randn(T, fin, dtype=dtype)
    it = {"i": 0}

    def nxt():
        it["i"] = (it["i"] + 1) % copies
        return it["i"]

    def base():
        i = nxt()
        return F.linear(x, Ws[i], bs[i])

    def ref():
        i = nxt()
        return reference.lora_linear(x, Ws[i], bs[i], [As[i]], [Bs[i]], None, scales)

    def fused():
        i = nxt()
        return torch.ops.peftcore.lora_linear(x, Ws[i], bs[i], [As[i]], [Bs[i]], None, scales, None)

    i0 = 0
    torch.testing.assert_close(
        torch.ops.peftcore.lora_linear(x, Ws[i0], bs[i0], [As[i0]], [Bs[i0]], None, scales, None),
        reference.lora_linear(x, Ws[i0], bs[i0], [As[i0]], [Bs[i0]], None, scales),
        rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
        atol=2e-2 if dtype == torch.bfloat16 else 1e-4,
    )
    with torch.inference_mode():
        return interleaved({"base": base, "ref": ref, "fused": fused}, repeats=repeats, warmup=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--tables", default="lora,embedding,ia3,adalora", help="comma-separated subset to run")
    args = ap.parse_args()
    tables = set(args.tables.split(","))
    print(f"<!-- {env_line()}; peftcore native: {peftcore.native_available('lora_linear')} -->")
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, r = {RANK}, weights streamed from DRAM")
    print(f"read bandwidth (1 GiB sum, best of 5): {read_bandwidth_gbs():.1f} GB/s\n")
    if "lora" in tables:
        bench_lora(args.quick)
    if "embedding" in tables:
        bench_embedding(args.quick)
    if "ia3" in tables:
        bench_ia3(args.quick)
    if "adalora" in tables:
        bench_adalora(args.quick)


def bench_lora(quick: bool):
    print("| in x out | T | dtype | F.linear ms | eager ref ms | fused ms | fused vs ref | LoRA overhead (fused / ref) |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for fin, fout in SHAPES:
        for T in TOKENS:
            for dtype in DTYPES:
                reps = (10 if T >= 256 else 30) // (2 if quick else 1)
                t = bench_case(fin, fout, T, dtype, reps)
                ovh_f = (t["fused"] / t["base"] - 1) * 100
                ovh_r = (t["ref"] / t["base"] - 1) * 100
                print(
                    f"| {fin}x{fout} | {T} | {str(dtype)[6:]} | {t['base'] * 1e3:.3f} | {t['ref'] * 1e3:.3f} | "
                    f"{t['fused'] * 1e3:.3f} | {t['ref'] / t['fused']:.2f}x | +{ovh_f:.1f}% / +{ovh_r:.1f}% |",
                    flush=True,
                )


def bench_embedding(quick: bool, V: int = 32000, D: int = 2048):
    """peftcore::lora_embedding: F.embedding vs the eager reference vs fused, a
    Llama-sized table (fp32, 262 MB) and T random tokens."""
    W = torch.randn(V, D)
    A = [torch.randn(RANK, V)]
    B = [torch.randn(D, RANK)]
    scales = torch.tensor([2.0])
    print(f"\n| lora_embedding {V}x{D} fp32 | T | F.embedding ms | eager ref ms | fused ms | fused vs ref |")
    print("|---|---:|---:|---:|---:|---:|")
    for T in TOKENS:
        idx = torch.randint(0, V, (T,))
        with torch.inference_mode():
            t = interleaved(
                {
                    "base": lambda: F.embedding(idx, W),
                    "ref": lambda: reference.lora_embedding(idx, W, A, B, scales),
                    "fused": lambda: torch.ops.peftcore.lora_embedding(idx, W, A, B, scales, -1),
                },
                repeats=15 if quick else 50,
                warmup=2,
            )
        print(f"| | {T} | {t['base'] * 1e3:.3f} | {t['ref'] * 1e3:.3f} | {t['fused'] * 1e3:.3f} | {t['ref'] / t['fused']:.2f}x |")


def _streamed(make, fin, fout, dtype):
    """Enough copies of make() (a tuple of per-layer tensors) to stream > 128 MiB of W."""
    copies = max(2, -(-STREAM_BYTES // (fin * fout * dtype.itemsize)) + 1)
    return [make() for _ in range(copies)]


def bench_ia3(quick: bool, fin: int = 4096, fout: int = 4096):
    """peftcore::ia3_linear vs PEFT's eager (IA)³ forward (F.linear + the scaling as
    separate elementwise ops) vs F.linear alone; one fp32 vector as PEFT keeps it."""
    print(f"\n| ia3_linear {fin}x{fout} | T | dtype | feedforward | F.linear ms | eager PEFT ms | fused ms | fused vs eager |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    on = torch.ones(1)
    for T in TOKENS:
        for dtype in DTYPES:
            for ff in (False, True):
                layers = _streamed(lambda: (torch.randn(fout, fin, dtype=dtype) / fin**0.5,
                                            torch.randn(fout, dtype=dtype),
                                            1 + 0.1 * torch.randn((1, fin) if ff else (fout, 1))), fin, fout, dtype)
                x = torch.randn(T, fin, dtype=dtype)
                it = {"i": 0}

                def nxt():
                    it["i"] = (it["i"] + 1) % len(layers)
                    return layers[it["i"]]

                def base():
                    W, b, _ = nxt()
                    return F.linear(x, W, b)

                def eager():
                    W, b, l = nxt()
                    if ff:
                        return F.linear((x.to(l.dtype) * l.flatten()).to(x.dtype), W, b)
                    return (F.linear(x, W, b) * l.flatten()).to(x.dtype)

                def fused():
                    W, b, l = nxt()
                    return torch.ops.peftcore.ia3_linear(x, W, b, [l], on, ff)

                with torch.inference_mode():
                    t = interleaved({"base": base, "eager": eager, "fused": fused},
                                    repeats=(10 if T >= 256 else 30) // (2 if quick else 1), warmup=2)
                print(f"| | {T} | {str(dtype)[6:]} | {ff} | {t['base'] * 1e3:.3f} | {t['eager'] * 1e3:.3f} | "
                      f"{t['fused'] * 1e3:.3f} | {t['eager'] / t['fused']:.2f}x |", flush=True)


def bench_adalora(quick: bool, fin: int = 4096, fout: int = 4096):
    """peftcore::lora_linear with lora_E vs PEFT's eager SVDLinear chain (x @ (A*E).T @ B.T * s,
    fp32 adapters, r = 16) vs F.linear alone."""
    print(f"\n| lora_linear + lora_E (AdaLoRA) {fin}x{fout} r={RANK} | T | dtype | F.linear ms | eager PEFT ms | fused ms | fused vs eager |")
    print("|---|---:|---|---:|---:|---:|---:|")
    scales = torch.tensor([2.0 / (RANK + 1e-5)])
    for T in TOKENS:
        for dtype in DTYPES:
            layers = _streamed(lambda: (torch.randn(fout, fin, dtype=dtype) / fin**0.5, torch.randn(fout, dtype=dtype),
                                        torch.randn(RANK, fin) / fin**0.5, torch.randn(RANK, 1),
                                        torch.randn(fout, RANK)), fin, fout, dtype)
            x = torch.randn(T, fin, dtype=dtype)
            it = {"i": 0}

            def nxt():
                it["i"] = (it["i"] + 1) % len(layers)
                return layers[it["i"]]

            def base():
                W, b, *_ = nxt()
                return F.linear(x, W, b)

            def eager():
                W, b, A, E, B = nxt()
                y = F.linear(x, W, b)
                return (y + (x.to(A.dtype) @ (A * E).T @ B.T) * scales[0]).to(x.dtype)

            def fused():
                W, b, A, E, B = nxt()
                return torch.ops.peftcore.lora_linear(x, W, b, [A], [B], [E], scales, None)

            with torch.inference_mode():
                t = interleaved({"base": base, "eager": eager, "fused": fused},
                                repeats=(10 if T >= 256 else 30) // (2 if quick else 1), warmup=2)
            print(f"| | {T} | {str(dtype)[6:]} | {t['base'] * 1e3:.3f} | {t['eager'] * 1e3:.3f} | "
                  f"{t['fused'] * 1e3:.3f} | {t['eager'] / t['fused']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
