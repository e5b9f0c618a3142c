"""The loops users run: a training step and ``model.generate``, peftcore against PEFT.

* ``train``: one optimizer step (forward with labels, backward, ``AdamW.step``,
  ``zero_grad``) of a Llama-shaped model (hidden 1024, intermediate 2816, 6 layers, vocab
  4096), batch 2 x 128 tokens, LoRA r=16 on all 7 projections, dropout 0, in train mode.
  Bases: bf16, fp32, nf4 (bitsandbytes, double quantization, bf16 compute: QLoRA) and
  int8 (LLM.int8, bf16 activations). Reported: peftcore / PEFT per step, and the floor
  (the bare model's forward + backward to its input embeddings) with each library's
  time above it: the adapter's whole cost, the only part an adapter library controls.
* ``generate``: greedy ``model.generate`` with the KV cache (it runs under ``no_grad``, not
  ``inference_mode``), Llama-shaped (hidden 2048, intermediate 5632, 6 layers, vocab 8192),
  a 32-token prompt and 24 new tokens, LoRA r=16 on all 7 projections, float32 adapters
  (PEFT's default) and, as ``bf16-noautocast``, bf16 adapters on the bf16 base (PEFT's
  ``autocast_adapter_dtype=False`` in both libraries); ``nf4`` / ``int8``: the same model
  quantized by bitsandbytes as ``train``'s (bf16 compute and activations), bitsandbytes
  alone as the bare model. Reported: peftcore / bare and PEFT / bare, the bare model
  frozen as the adapted ones are.
* ``layer``: the cost of one adapted linear under ``no_grad`` minus its ``nn.Linear``'s
  (a 64 x 64 layer at one token, so the time is all Python and dispatch).

Every candidate reads the same base weight tensors (separate copies land on different
pages and move the results by more than the effects measured); rounds are interleaved
with alternating order, and each ratio is the median over rounds of the ratio within a
round. Machine, threads, versions and the read bandwidth (the ceiling) are printed.

    python benchmarks/bench_workloads.py [--train bf16,fp32,nf4,int8]
                                         [--generate bf16,fp32,bf16-noautocast,nf4,nf4-noautocast,int8]
                                         [--layer] [--repeats N]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import shared_copy  # noqa: E402
from timing import env_line, interleaved_samples, read_bandwidth_gbs  # noqa: E402

warnings.simplefilter("ignore")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def llama(hidden, inter, vocab, dtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=6,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def quantized(model, kind):
    """``model`` saved and loaded back by transformers with bitsandbytes quantization on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=qc, device_map="cpu", dtype=torch.bfloat16)


def lora_pair(base, trainable, autocast=True):
    """(PEFT model, peftcore model), both over ``base``'s weight memory, with the same
    non-trivial LoRA adapter (PEFT's file, loaded by peftcore); ``autocast``: PEFT's
    ``autocast_adapter_dtype`` in both."""
    import peft

    import peftcore

    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJ)
    pm = peft.get_peft_model(shared_copy(base), cfg, autocast_adapter_dtype=autocast)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # PEFT starts B at 0: give the adapter an effect
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    ours = shared_copy(base)
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        peftcore.load_adapter(ours, d, is_trainable=trainable, autocast_adapter_dtype=autocast)
    return pm, ours


def ratio(samples, name, base):
    return statistics.median(a / b for a, b in zip(samples[name], samples[base]))


def train(kinds, repeats):
    print("\n## Training step: forward + backward + AdamW.step + zero_grad, batch 2 x 128, LoRA r=16 on 7 projections\n")
    print("floor: the bare model's forward + backward to its input embeddings (every layer's input gradient,")
    print("no adapter, no optimizer): what any adapter library pays before its adapter's own cost.\n")
    print("| base | floor ms | PEFT ms/step | peftcore ms/step | PEFT - floor | peftcore - floor | peftcore / PEFT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ids = torch.randint(0, 4096, (2, 128), generator=torch.Generator().manual_seed(1))
    for kind in kinds:
        dense = llama(1024, 2816, 4096, torch.float32 if kind == "fp32" else torch.bfloat16)
        base = quantized(dense, kind) if kind in ("nf4", "int8") else dense
        pm, ours = lora_pair(base, trainable=True)
        steps = {}
        for name, m in (("peft", pm), ("peftcore", ours)):
            m.train()
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

            def step(m=m, opt=opt):
                m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[name] = step
        base.requires_grad_(False)
        emb = base.get_input_embeddings()

        def floor(base=base, emb=emb):
            base.train()
            with torch.no_grad():
                e = emb(ids)
            base(inputs_embeds=e.requires_grad_(True), labels=ids, use_cache=False).loss.backward()

        steps["floor"] = floor
        s = interleaved_samples(steps, repeats, warmup=2)
        med = {k: statistics.median(v) * 1e3 for k, v in s.items()}
        print(f"| {kind} | {med['floor']:.0f} | {med['peft']:.0f} | {med['peftcore']:.0f} | "
              f"{med['peft'] - med['floor']:.0f} | {med['peftcore'] - med['floor']:.0f} | "
              f"{ratio(s, 'peftcore', 'peft'):.2f} |", flush=True)
        del pm, ours, base, dense


def generate(kinds, repeats):
    print("\n## generate: greedy, KV cache, 32-token prompt + 24 new tokens, no_grad, LoRA r=16 "
          "(float32 adapters; -noautocast: in the base dtype)\n")
    print("| base | bare ms | peftcore ms | PEFT ms | peftcore / bare | PEFT / bare |")
    print("|---|---:|---:|---:|---:|---:|")
    ids = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(2))
    for kind in kinds:
        b = kind.split("-")[0]
        base = llama(2048, 5632, 8192, DTYPES.get(b, torch.bfloat16)).eval()
        if b in ("nf4", "int8"):  # bitsandbytes alone is the bare model here
            base = quantized(base, b).eval()
        pm, ours = lora_pair(base, trainable=False, autocast=not kind.endswith("-noautocast"))
        # The bare model frozen too, as both adapter libraries freeze the base: a frozen
        # lm_head changes torch.matmul's path for generate's strided last-token slice (no
        # folding: a bmm over a 33 MB copy of the weight, ~5 % of this run), which is
        # PyTorch's cost of freezing, not the adapter's.
        base.requires_grad_(False)
        pm.eval()
        kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)

        def gen(m):
            return lambda: m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)

        with torch.no_grad():
            s = interleaved_samples({"bare": gen(base), "peftcore": gen(ours), "peft": gen(pm)}, repeats)
        med = {k: statistics.median(v) * 1e3 for k, v in s.items()}
        print(f"| {kind} | {med['bare']:.0f} | {med['peftcore']:.0f} | {med['peft']:.0f} | "
              f"{ratio(s, 'peftcore', 'bare'):.3f} | {ratio(s, 'peft', 'bare'):.3f} |", flush=True)
        del pm, ours, base


def layer(repeats, calls=2000):
    import peftcore

    print("\n## One adapted linear under no_grad, minus nn.Linear (64 x 64, 1 token, LoRA r=8)\n")
    print("| dtype | nn.Linear µs | peftcore layer µs | extra µs |")
    print("|---|---:|---:|---:|")
    for kind, dtype in DTYPES.items():
        import peft
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=4)
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, target_modules=["q_proj"]))
        with tempfile.TemporaryDirectory() as d:
            pm.save_pretrained(d)
            peftcore.load_adapter(model, d)
        ad = model.model.layers[0].self_attn.q_proj
        x = torch.randn(1, 1, 64, dtype=dtype)

        def loop(f):
            def run():
                for _ in range(calls):
                    f(x)
            return run

        with torch.no_grad():
            s = interleaved_samples({"linear": loop(ad.base_layer), "peftcore": loop(ad)}, repeats, warmup=2)
        lin, ours = (statistics.median(s[k]) / calls * 1e6 for k in ("linear", "peftcore"))
        print(f"| {kind} | {lin:.2f} | {ours:.2f} | {ours - lin:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="bf16,fp32,nf4,int8", help="bases of the training step ('' for none)")
    ap.add_argument("--generate", default="bf16,fp32,bf16-noautocast,nf4,nf4-noautocast,int8",
                    help="bases of generate ('' for none)")
    ap.add_argument("--layer", action="store_true", help="also the per-layer cost under no_grad")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import transformers

    import peftcore

    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    print(env_line())
    print(f"peftcore native kernels: {peftcore.native_available('lora_linear')}")
    print(f"read bandwidth (1 GiB sum, best of 5): {read_bandwidth_gbs():.1f} GB/s")
    print(f"ratios: median over {args.repeats} interleaved rounds of the ratio within a round")
    if args.train:
        train(args.train.split(","), args.repeats)
    if args.generate:
        generate(args.generate.split(","), args.repeats)
    if args.layer:
        layer(max(args.repeats, 9))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
