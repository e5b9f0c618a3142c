"""Whole-model forward cost of an adapter: peftcore vs PEFT, as a ratio to the bare model.

Llama-shaped model (hidden 2048, intermediate 5632, 6 layers, ~1.2 GB of fp32 weights, far
beyond the 32 MiB LLC), fp32 and bf16, decode-shaped (1 token) and prefill-shaped (256
tokens). Medians of interleaved repeats. Methods:

* ``lora``: LoRA r=16 on all 7 projections;
* ``ia3``: IA3 with PEFT's Llama defaults (k_proj, v_proj, down_proj; down_proj feedforward);
* ``adalora``: AdaLoRA init_r=12 on all 7 projections, after rank allocation kept 8 of 12
  triplets per module (what a trained AdaLoRA adapter looks like when loaded).

    python benchmarks/bench_model.py [--method lora|ia3|adalora] [--repeats N] [--dtypes fp32,bf16] [--tokens 1,256]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import statistics  # noqa: E402

from timing import env_line, interleaved_samples, paired_overhead, read_bandwidth_gbs  # noqa: E402

warnings.simplefilter("ignore")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(dtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def shared_copy(base):
    """A copy of ``base`` whose parameters and buffers use ``base``'s memory: all three
    candidates read the very same weight pages (separate copies may run at different speeds
    depending on where their pages land, enough to swamp a 1 % overhead)."""
    out = copy.deepcopy(base)
    for (_, a), (_, b) in zip(out.named_parameters(), base.named_parameters()):
        a.data = b.data
    for (_, a), (_, b) in zip(out.named_buffers(), base.named_buffers()):
        a.data = b.data
    return out


def peft_config(method: str):
    import peft

    if method == "ia3":
        return peft.IA3Config(init_ia3_weights=False)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=32, total_step=100, target_modules=PROJ)
    return peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ, init_lora_weights=False)


@torch.no_grad()
def randomize(pm, method: str) -> None:
    """Non-trivial adapter values; for AdaLoRA also a rank pattern keeping 8 of 12 triplets
    per module (as rank allocation leaves it), so the saved file holds rank-8 factors."""
    g = torch.Generator().manual_seed(0)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    if method == "adalora":
        pattern = {}
        for n, p in pm.named_parameters():
            if ".lora_E." in n:
                mask = [i < 8 for i in range(p.shape[0])]
                p.masked_fill_(~torch.tensor(mask).unsqueeze(1), 0.0)
                pattern[n[len("base_model.model."):]] = mask
        pm.peft_config["default"].rank_pattern = pattern


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lora", choices=["lora", "ia3", "adalora"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--tokens", default="1,256")
    ap.add_argument("--no-peft", action="store_true",
                    help="time the base and peftcore only (less time per round: the finer measurement of a small overhead)")
    args = ap.parse_args()
    import peft

    import peftcore

    print(env_line())
    op = {"lora": "lora_linear", "ia3": "ia3_linear", "adalora": "lora_linear"}[args.method]
    print(f"method {args.method}; peftcore native kernels: {peftcore.native_available(op)}")
    print(f"read bandwidth (1 GiB sum, best of 5): {read_bandwidth_gbs():.1f} GB/s")
    rows = []
    for dname in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        base = build(dtype)
        pm = peft.get_peft_model(copy.deepcopy(base), peft_config(args.method))
        randomize(pm, args.method)
        with tempfile.TemporaryDirectory() as d:
            pm.save_pretrained(d)
            # PEFT runs what it loads (AdaLoRA: the rank-8 factors of the saved file).
            pm = peft.PeftModel.from_pretrained(shared_copy(base), d).eval()
            ours = shared_copy(base)
            peftcore.load_adapter(ours, d)
        gb = sum(p.numel() * p.element_size() for p in base.parameters()) / 1e9
        for T in [int(t) for t in args.tokens.split(",")]:
            ids = torch.randint(0, 1024, (1, T))

            def run(m):
                return lambda: m(input_ids=ids, use_cache=False)

            fns = {"base": run(base), "peftcore": run(ours)}
            if not args.no_peft:
                fns["peft"] = run(pm)
            with torch.inference_mode():
                samples = interleaved_samples(fns, args.repeats)
            med = {k: statistics.median(v) for k, v in samples.items()}
            over = {k: paired_overhead(samples, k, "base") for k in samples if k != "base"}
            med.setdefault("peft", float("nan"))
            over.setdefault("peft", float("nan"))
            rows.append((dname, T, gb, med, over))
            print(rows[-1], flush=True)
        del base, pm, ours
    print()
    print(f"method: {args.method}")
    print("overhead: median over rounds of (t / t_base - 1), each round's calls back to back")
    print("| dtype | tokens | weights GB | base ms | peftcore ms | PEFT ms | peftcore overhead | PEFT overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for dname, T, gb, m, o in rows:
        print(
            f"| {dname} | {T} | {gb:.2f} | {m['base']*1e3:.1f} | {m['peftcore']*1e3:.1f} | {m['peft']*1e3:.1f} | "
            f"{o['peftcore']*100:+.1f}% | {o['peft']*100:+.1f}% |"
        )


if __name__ == "__main__":
    main()
