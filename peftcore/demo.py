"""End-to-end demo, no network: ``python -m peftcore.demo`` (``make demo``).

Builds a small local Llama-shaped model over bytes, adds a LoRA adapter and trains it to
complete a prompt with a sentence, saves the adapter in PEFT's format, loads it back into
a fresh copy of the base with ``peftcore.load_adapter``, and prints the model's greedy
completions with the adapter on, off and reloaded.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

PROMPT = "peftcore says: "
TARGET = "adapters cost nearly nothing."


def encode(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())])


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode(errors="replace")


def build_base(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def complete(model, n: int = len(TARGET)) -> str:
    ids = encode(PROMPT)
    for _ in range(n):  # greedy decoding, written out to keep the demo self-contained
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return decode(ids[0, len(PROMPT):])


def main(argv=None) -> int:
    import peftcore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for the saved adapter (default: a temporary folder)")
    ap.add_argument("--max-steps", type=int, default=300)
    args = ap.parse_args(argv)

    print(peftcore.show_config())
    model = build_base()
    before = complete(model)
    print(f"\nbase model            : {PROMPT}{before!r}")

    config = peftcore.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    peftcore.add_adapter(model, config, "demo")
    peftcore.print_trainable_parameters(model)

    ids = encode(PROMPT + TARGET)
    labels = ids.clone()
    labels[:, : len(PROMPT)] = -100  # learn the completion only
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.max_steps + 1):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
            model.eval()
            done = complete(model) == TARGET
            model.train()
            if done:
                break
    model.eval()
    print(f"trained in {time.perf_counter() - t0:.1f} s")

    out = args.out or tempfile.mkdtemp(prefix="peftcore-demo-")
    peftcore.save_pretrained(model, out, adapter_names=["demo"])
    saved = os.path.join(out, "demo")
    print(f"saved PEFT-format adapter to {saved}: {sorted(os.listdir(saved))}")

    on = complete(model)
    with peftcore.adapters_disabled(model):
        off = complete(model)
    fresh = build_base()
    peftcore.load_adapter(fresh, saved)
    reloaded = complete(fresh)

    print(f"\nadapter on            : {PROMPT}{on!r}")
    print(f"adapter off           : {PROMPT}{off!r}")
    print(f"reloaded (fresh base) : {PROMPT}{reloaded!r}")
    ok = on == TARGET and reloaded == on and off == before
    print("\nOK: the adapter's effect is visible, disabling restores the base, reloading reproduces it"
          if ok else "\nFAILED: outputs differ from what the demo expects")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
