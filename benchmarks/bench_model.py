"""Whole-model forward cost of LoRA: peftcore vs PEFT, as a ratio to the bare model.

Llama-shaped model (hidden 2048, intermediate 5632, 6 layers, ~1.2 GB of fp32 weights, far
beyond the 32 MiB LLC), LoRA r=16 on all 7 projections, fp32 and bf16, decode-shaped
(1 token) and prefill-shaped (256 tokens). Medians of interleaved repeats.

    python benchmarks/bench_model.py [--repeats N] [--dtypes fp32,bf16] [--tokens 1,256]
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
from timing import env_line, interleaved, read_bandwidth_gbs  # noqa: E402

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--tokens", default="1,256")
    args = ap.parse_args()
    import peft

    import peftcore

    print(env_line())
    print(f"peftcore native kernels: {peftcore.native_available('lora_linear')}")
    print(f"read bandwidth (1 GiB sum, best of 5): {read_bandwidth_gbs():.1f} GB/s")
    rows = []
    for dname in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        base = build(dtype)
        lcfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ, init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(base), lcfg).eval()
        with tempfile.TemporaryDirectory() as d:
            pm.save_pretrained(d)
            ours = copy.deepcopy(base)
            peftcore.load_adapter(ours, d)
        gb = sum(p.numel() * p.element_size() for p in base.parameters()) / 1e9
        for T in [int(t) for t in args.tokens.split(",")]:
            ids = torch.randint(0, 1024, (1, T))

            def run(m):
                return lambda: m(input_ids=ids, use_cache=False)

            with torch.inference_mode():
                med = interleaved({"base": run(base), "peftcore": run(ours), "peft": run(pm)}, args.repeats)
            rows.append((dname, T, gb, med))
            print(rows[-1], flush=True)
        del base, pm, ours
    print()
    print("| dtype | tokens | weights GB | base ms | peftcore ms | PEFT ms | peftcore overhead | PEFT overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for dname, T, gb, m in rows:
        print(
            f"| {dname} | {T} | {gb:.2f} | {m['base']*1e3:.1f} | {m['peftcore']*1e3:.1f} | {m['peft']*1e3:.1f} | "
            f"{(m['peftcore']/m['base']-1)*100:+.1f}% | {(m['peft']/m['base']-1)*100:+.1f}% |"
        )


if __name__ == "__main__":
    main()
