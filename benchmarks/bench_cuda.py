"""GPU sweep of peftcore's CUDA kernels against PyTorch's unfused path and bitsandbytes.

Run by benchmarks/gpu_check.sh (one GPU, no network); usable alone:

  python benchmarks/bench_cuda.py --out DIR [--quick]

Every timing is a CUDA graph of `--calls` back-to-back calls replayed `--reps` times
between CUDA events (launch overhead amortised as in a captured decode step); the
median per call is reported in microseconds. Inputs are bfloat16 (adapters too, as a
model loaded in bfloat16 holds them), scales on the GPU.

Sweeps (tokens 1-64):
  * lora_linear: layers 4096x4096, 4096x14336, 14336x4096; ranks 8 / 16 / 64; one adapter,
    4 and 32 adapters summed (the fused multi-adapter shrink / expand), and 4 / 32 mixed
    adapters per row (peftcore::lora_linear_mixed, when this build has its CUDA kernel);
    baselines: the base F.linear alone, and PyTorch's unfused LoRA (PEFT's forward:
    F.linear + x·Aᵀ·Bᵀ·s per adapter; mixed: PEFT's per-adapter sub-batches).
  * nf4 (lora_linear_4bit, double-quantized, blocksize 64) and int8 (lora_linear_int8):
    the base alone and with a rank-16 adapter, against bitsandbytes' own kernels
    (bnb.matmul_4bit / Linear8bitLt) with and without PEFT's unfused LoRA on top. For nf4,
    the fraction of HBM bandwidth (bytes read / time) against the spec and a measured copy.
Writes DIR/bench_cuda.json (every record) and DIR/bench_cuda.md (tables + the issue's goals).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = torch.device("cuda")
DT = torch.bfloat16
SPEC_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.04e12, "L40S": 0.864e12}
LAYERS = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)


# ---------------------------------------------------------------------------- timing
def time_us(fn, calls=20, reps=7):
    """Median µs per call of fn, from a CUDA graph of `calls` calls (eager events when the
    function cannot be captured, e.g. a reference fallback that syncs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run = graph.replay
    except Exception:  # not capturable: eager timing
        graph = None
        torch.cuda.synchronize()

        def run():
            for _ in range(calls):
                fn()

    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    eager = graph is None
    del graph  # its memory pool goes back before the next configuration
    return statistics.median(times), eager


def copy_bandwidth():
    """Bytes/s of a 2 GiB device-to-device copy (read + write): the measured ceiling."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us, _ = time_us(lambda: b.copy_(a), calls=5, reps=5)
    return 2 * n / (us * 1e-6)


# ---------------------------------------------------------------------------- helpers
def rand(*shape, scale=1.0, dtype=DT, g=None):
    return (torch.randn(*shape, device=DEV, generator=g) * scale).to(dtype)


def adapters(n, r, fin, fout, g):
    A = [rand(r, fin, scale=fin**-0.5, g=g) for _ in range(n)]
    B = [rand(fout, r, scale=r**-0.5, g=g) for _ in range(n)]
    return A, B


def unfused(x, base_fn, A, B, scales_f):
    """PEFT's unmerged forward, eager PyTorch: the base, then per adapter x·Aᵀ·Bᵀ·s added."""
    y = base_fn(x)
    for a in range(len(A)):
        y = y + (x @ A[a].t() @ B[a].t()) * scales_f[a]
    return y


def unfused_mixed(x, base_fn, A, B, scales_f, idx):
    """PEFT's mixed-batch forward: the base for all rows, then each adapter on its sub-batch."""
    y = base_fn(x)
    for a, rows in enumerate(idx):
        xa = x.index_select(0, rows)
        y = y.index_add(0, rows, (xa @ A[a].t() @ B[a].t()) * scales_f[a])
    return y


def have_native(op):
    from peftcore import native

    return hasattr(torch.ops.peftcore, op) and native.native_available(op, "cuda")


# ---------------------------------------------------------------------------- sweeps
def sweep_lora_linear(tokens, ranks, rec, quick):
    g = torch.Generator(device=DEV).manual_seed(0)
    mixed_ok = have_native("lora_linear_mixed")
    for fin, fout in LAYERS[:1] if quick else LAYERS:
        W = rand(fout, fin, scale=fin**-0.5, g=g)
        for M in tokens:
            x = rand(M, fin, g=g)
            base_us, _ = time_us(lambda: F.linear(x, W))
            rec.append(dict(kind="lora_linear", fin=fin, fout=fout, tokens=M, variant="base F.linear", us=base_us))
            for r in ranks:
                for n in (1, 4, 32):
                    A, B = adapters(n, r, fin, fout, g)
                    scales = torch.full((n,), 0.5, device=DEV)
                    sf = [0.5] * n
                    common = dict(kind="lora_linear", fin=fin, fout=fout, tokens=M, rank=r, adapters=n, base_us=base_us)
                    us, eager = time_us(lambda: torch.ops.peftcore.lora_linear(x, W, None, A, B, None, scales, None))
                    rec.append(dict(common, variant="peftcore summed" if n > 1 else "peftcore", us=us, eager=eager))
                    us, _ = time_us(lambda: unfused(x, lambda t: F.linear(t, W), A, B, sf))
                    rec.append(dict(common, variant="unfused summed" if n > 1 else "unfused", us=us))
                    if n == 1:
                        continue
                    rows = torch.arange(M, device=DEV) % n
                    idx = [torch.nonzero(rows == a).reshape(-1) for a in range(n)]
                    if mixed_ok:
                        us, eager = time_us(
                            lambda: torch.ops.peftcore.lora_linear_mixed(x, W, None, A, B, None, scales, rows))
                        rec.append(dict(common, variant="peftcore mixed", us=us, eager=eager))
                    us, _ = time_us(lambda: unfused_mixed(x, lambda t: F.linear(t, W), A, B, sf, idx))
                    rec.append(dict(common, variant="unfused mixed", us=us))
            print(f"  lora_linear {fin}x{fout} M={M} done", flush=True)


def _bnb():
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception:
        return None


def quantize_nf4(Wf, bnb):
    """(peftcore 4-bit args, bitsandbytes weight + state or None); nested, blocksize 64."""
    if bnb is not None:
        q, st = bnb.functional.quantize_4bit(Wf, blocksize=64, compress_statistics=True, quant_type="nf4")
        args = [q, st.absmax, st.code, st.blocksize, st.state2.absmax, st.state2.code,
                st.offset.reshape(()).float(), st.state2.blocksize]
        return args, (q, st)
    # No bitsandbytes: a stand-in of the same layout and size (timing does not depend on values).
    N, K = Wf.shape
    q = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, device=DEV)
    nb = math.ceil(N * K / 64)
    args = [q, torch.randint(0, 256, (nb,), dtype=torch.uint8, device=DEV), torch.linspace(-1, 1, 16, device=DEV), 64,
            torch.rand(math.ceil(nb / 256), device=DEV), torch.linspace(-1, 1, 256, device=DEV),
            torch.zeros((), device=DEV), 256]
    return args, None


def sweep_quant(tokens, rec, quick, stream_bw, spec_bw):
    bnb = _bnb()
    g = torch.Generator(device=DEV).manual_seed(1)
    none = torch.zeros(0, device=DEV)
    for fin, fout in LAYERS[:1] if quick else LAYERS:
        Wf = (torch.randn(fout, fin, device=DEV, generator=g) * fin**-0.5).float()
        q4, bnb4 = quantize_nf4(Wf, bnb)
        A, B = adapters(1, 16, fin, fout, g)
        sc = torch.tensor([0.5], device=DEV)
        CB = torch.randint(-127, 128, (fout, fin), dtype=torch.int8, device=DEV)
        SCB = torch.rand(fout, device=DEV) + 0.5
        lin8 = None
        if bnb is not None:
            try:
                lin8 = bnb.nn.Linear8bitLt(fin, fout, bias=False, has_fp16_weights=False, threshold=0.0)
                lin8.weight = bnb.nn.Int8Params(Wf.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
                lin8 = lin8.to(DEV)
            except Exception as e:  # bitsandbytes API drift: skip its int8 baseline
                print(f"  (bitsandbytes Linear8bitLt baseline skipped: {e})")
                lin8 = None
        # bytes a 4-bit pass must read: codes, absmax codes, nested absmax, x, y, adapter
        w4_bytes = q4[0].numel() + q4[1].numel() + q4[4].numel() * 4
        for M in tokens:
            x = rand(M, fin, g=g)
            io = (M * fin + M * fout) * 2
            ad_bytes = (16 * fin + fout * 16) * 2
            c4 = dict(kind="nf4", fin=fin, fout=fout, tokens=M)
            us_base, _ = time_us(lambda: torch.ops.peftcore.lora_linear_4bit(x, *q4, fout, None, [], [], None, none, None))
            rec.append(dict(c4, variant="peftcore base", us=us_base, bytes=w4_bytes + io))
            us, _ = time_us(lambda: torch.ops.peftcore.lora_linear_4bit(x, *q4, fout, None, A, B, None, sc, None))
            rec.append(dict(c4, variant="peftcore + LoRA r16", us=us, base_us=us_base, bytes=w4_bytes + io + ad_bytes))
            if bnb4 is not None:
                qw, st = bnb4

                def bnb_base(t):
                    return bnb.matmul_4bit(t, qw.t(), quant_state=st)

                us_b, _ = time_us(lambda: bnb_base(x))
                rec.append(dict(c4, variant="bitsandbytes matmul_4bit", us=us_b, bytes=w4_bytes + io))
                us, _ = time_us(lambda: unfused(x, bnb_base, A, B, [0.5]))
                rec.append(dict(c4, variant="bitsandbytes + unfused LoRA r16 (PEFT)", us=us))
            c8 = dict(kind="int8", fin=fin, fout=fout, tokens=M)
            us_base8, _ = time_us(lambda: torch.ops.peftcore.lora_linear_int8(x, CB, SCB, None, [], [], None, none, None))
            rec.append(dict(c8, variant="peftcore base", us=us_base8, bytes=fout * fin + fout * 4 + io))
            us, _ = time_us(lambda: torch.ops.peftcore.lora_linear_int8(x, CB, SCB, None, A, B, None, sc, None))
            rec.append(dict(c8, variant="peftcore + LoRA r16", us=us, base_us=us_base8))
            if lin8 is not None:
                xh = x.to(torch.float16)
                us, _ = time_us(lambda: lin8(xh))
                rec.append(dict(c8, variant="bitsandbytes Linear8bitLt (fp16)", us=us))
                us, _ = time_us(lambda: unfused(xh, lin8, [a.half() for a in A], [b.half() for b in B], [0.5]))
                rec.append(dict(c8, variant="bitsandbytes + unfused LoRA r16 (PEFT)", us=us))
            print(f"  quantized {fin}x{fout} M={M} done", flush=True)
    for r in rec:
        if "bytes" in r:
            bw = r["bytes"] / (r["us"] * 1e-6)
            r["GB_s"] = bw / 1e9
            r["pct_spec"] = 100 * bw / spec_bw if spec_bw else None
            r["pct_copy"] = 100 * bw / stream_bw


# ---------------------------------------------------------------------------- report
def markdown(meta, rec):
    out = [f"# peftcore CUDA benchmark ({meta['device']})", "",
           f"torch {meta['torch']}, CUDA {meta['cuda']}, bitsandbytes {meta['bitsandbytes']}; "
           f"copy bandwidth {meta['copy_GB_s']:.0f} GB/s (spec {meta['spec_GB_s'] or '?'} GB/s). "
           "µs per call, CUDA graphs of back-to-back calls, median.", ""]
    ll = [r for r in rec if r["kind"] == "lora_linear" and "rank" in r]
    if ll:
        out += ["## lora_linear (bf16)", "", "| layer | tokens | rank | adapters | variant | µs | vs base |",
                "|---|---|---|---|---|---|---|"]
        for r in ll:
            out.append(f"| {r['fin']}x{r['fout']} | {r['tokens']} | {r['rank']} | {r['adapters']} | {r['variant']} | "
                       f"{r['us']:.1f} | {100 * (r['us'] / r['base_us'] - 1):+.1f}% |")
        out.append("")
    for kind in ("nf4", "int8"):
        q = [r for r in rec if r["kind"] == kind]
        if q:
            out += [f"## {kind} base (+ LoRA r16)", "", "| layer | tokens | variant | µs | GB/s | % spec | % copy |",
                    "|---|---|---|---|---|---|---|"]
            for r in q:
                gb = f"{r['GB_s']:.0f}" if "GB_s" in r else ""
                ps = f"{r['pct_spec']:.0f}" if r.get("pct_spec") else ""
                pc = f"{r['pct_copy']:.0f}" if "pct_copy" in r else ""
                out.append(f"| {r['fin']}x{r['fout']} | {r['tokens']} | {r['variant']} | {r['us']:.1f} | {gb} | {ps} | {pc} |")
            out.append("")
    out += ["## Goals of the issue", ""] + [f"- {g}" for g in goals(rec)]
    return "\n".join(out) + "\n"


def goals(rec):
    res = []

    def find(**kw):
        return [r for r in rec if all(r.get(k) == v for k, v in kw.items())]

    for fin, fout in ((4096, 4096), (4096, 14336)):
        p = find(kind="nf4", fin=fin, fout=fout, tokens=1, variant="peftcore + LoRA r16")
        b = find(kind="nf4", fin=fin, fout=fout, tokens=1, variant="bitsandbytes matmul_4bit")
        if p:
            pct = p[0].get("pct_spec")
            res.append(f"nf4 + LoRA r16, 1 token, {fin}x{fout}: {pct:.0f}% of spec HBM (goal >= 75%): "
                       f"{'MET' if pct and pct >= 75 else 'NOT met'}" if pct else f"nf4 {fin}x{fout}: spec unknown")
        if p and b:
            sp = b[0]["us"] / p[0]["us"]
            res.append(f"nf4 + LoRA r16 vs bitsandbytes' 4-bit kernel without LoRA, 1 token, {fin}x{fout}: "
                       f"{sp:.2f}x (goal >= 1.2x): {'MET' if sp >= 1.2 else 'NOT met'}")
    worst = [r for r in rec if r["kind"] == "lora_linear" and r["variant"] == "peftcore" and r["tokens"] <= 16]
    if worst:
        w = max(worst, key=lambda r: r["us"] / r["base_us"])
        ov = 100 * (w["us"] / w["base_us"] - 1)
        res.append(f"LoRA overhead over the base layer, 1-16 tokens, worst case ({w['fin']}x{w['fout']}, "
                   f"{w['tokens']} tokens, rank {w['rank']}): {ov:+.1f}% (goal <= 5%): {'MET' if ov <= 5 else 'NOT met'}")
    mixed = find(kind="lora_linear", variant="peftcore mixed", adapters=32)
    if mixed:
        ratios = []
        for m in mixed:
            s = find(kind="lora_linear", variant="peftcore", adapters=1, fin=m["fin"], fout=m["fout"], tokens=m["tokens"],
                     rank=m["rank"])
            if s:
                ratios.append(m["us"] / s[0]["us"])
        if ratios:
            res.append(f"32 mixed adapters vs one adapter: worst {max(ratios):.2f}x (goal <= 1.3x): "
                       f"{'MET' if max(ratios) <= 1.3 else 'NOT met'}")
    else:
        res.append("32 mixed adapters: not measured (no CUDA kernel for peftcore::lora_linear_mixed in this build)")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--quick", action="store_true", help="one layer shape, fewer token counts")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device", file=sys.stderr)
        return 1
    import peftcore  # noqa: F401

    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in SPEC_BW.items() if k in name), None)
    t0 = time.time()
    bw = copy_bandwidth()
    bnb = _bnb()
    meta = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                bitsandbytes=getattr(bnb, "__version__", "not installed"), copy_GB_s=bw / 1e9,
                spec_GB_s=spec / 1e9 if spec else None)
    tokens = [1, 4, 16, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    ranks = [16] if args.quick else [8, 16, 64]
    rec = []
    print(f"bench_cuda on {name}: copy {bw / 1e9:.0f} GB/s", flush=True)
    sweep_lora_linear(tokens, ranks, rec, args.quick)
    sweep_quant(tokens, rec, args.quick, bw, spec)
    meta["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "bench_cuda.json"), "w") as f:
        json.dump(dict(meta=meta, results=rec), f, indent=1)
    md = markdown(meta, rec)
    with open(os.path.join(args.out, "bench_cuda.md"), "w") as f:
        f.write(md)
    print("\n".join(md.splitlines()[-8:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
