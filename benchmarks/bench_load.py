"""Adapter load time: peftcore.load_adapter vs the raw safetensors read vs PEFT; and the
switching verbs: peftcore.hotswap_adapter (the same file into a loaded adapter's slot) and
peftcore.set_adapter between two loaded adapters, vs PEFT's set_adapter.

LoRA r=16 on all 7 projections of a Llama-shaped model (hidden 1024, intermediate 2816,
24 layers: 168 modules, ~30 MB). Each timed load goes onto a fresh model: peftcore's
adapter is deleted and PEFT's unloaded between repeats (untimed), which restores the
original modules. Medians of interleaved repeats.

    python benchmarks/bench_load.py [--repeats N]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import env_line  # noqa: E402

warnings.simplefilter("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import peft
    import transformers
    from safetensors.torch import load_file

    import peftcore

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16,
    )
    base = transformers.LlamaForCausalLM(cfg).eval()
    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    d = tempfile.mkdtemp()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=proj, init_lora_weights=False))
    pm.save_pretrained(d)
    del pm
    f = os.path.join(d, "adapter_model.safetensors")
    size_mb = os.path.getsize(f) / 1e6
    peft_base = copy.deepcopy(base)

    def raw():
        load_file(f)

    def ours():
        peftcore.load_adapter(base, d)

    def ours_reset():
        peftcore.delete_adapter(base, "default")

    def theirs():
        return peft.PeftModel.from_pretrained(peft_base, d)

    times = {"raw safetensors read": [], "peftcore.load_adapter": [], "PeftModel.from_pretrained": []}
    for i in range(args.repeats + 1):
        t0 = time.perf_counter(); raw(); t1 = time.perf_counter()
        ours(); t2 = time.perf_counter()
        ours_reset()
        t3 = time.perf_counter(); m = theirs(); t4 = time.perf_counter()
        m.unload()
        if i:  # first round is warm-up (page cache, allocator)
            times["raw safetensors read"].append(t1 - t0)
            times["peftcore.load_adapter"].append(t2 - t1)
            times["PeftModel.from_pretrained"].append(t4 - t3)
    import statistics

    # Switching: a second model holding two adapters ("a", "b"), swapped / switched per repeat.
    two = copy.deepcopy(peft_base)
    peftcore.load_adapter(two, d, "a")
    peftcore.load_adapter(two, d, "b")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), d, adapter_name="a")
    pm2.load_adapter(d, adapter_name="b")
    times.update({"peftcore.hotswap_adapter": [], "peftcore.set_adapter": [], "PEFT set_adapter": []})
    for i in range(args.repeats + 1):
        t0 = time.perf_counter(); peftcore.hotswap_adapter(two, d, "a"); t1 = time.perf_counter()
        peftcore.set_adapter(two, "a" if i % 2 else "b"); t2 = time.perf_counter()
        pm2.set_adapter("a" if i % 2 else "b"); t3 = time.perf_counter()
        if i:
            times["peftcore.hotswap_adapter"].append(t1 - t0)
            times["peftcore.set_adapter"].append(t2 - t1)
            times["PEFT set_adapter"].append(t3 - t2)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    n_mod = sum(1 for k in load_file(f) if k.endswith("lora_A.weight"))
    print(env_line())
    print(f"adapter: {n_mod} modules, {size_mb:.1f} MB, {args.repeats} repeats, medians")
    print("| what | ms | × raw read |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {v / med['raw safetensors read']:.2f}× |")


if __name__ == "__main__":
    main()
