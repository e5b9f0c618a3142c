"""Differential tests against Hugging Face PEFT 0.21.2 (the oracle).

For each architecture x feature: PEFT trains nothing but perturbs every trainable tensor,
saves the adapter; peftcore loads it onto a fresh copy of the same base and must give
PEFT's logits (fp32, relative error <= 1e-4). Then peftcore saves it, the file must have
PEFT's key names and shapes, and PEFT must load it back to the same logits.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import peft  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import peftcore  # noqa: E402

from tests._models import ARCHS, fresh_base, perturb_trainable, rel_err  # noqa: E402

RTOL = 1e-4  # the contract for fp32 logits

CASES = [
    # (id, arch, LoraConfig kwargs)
    ("opt-list", "opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("opt-dotted-suffix", "opt", dict(r=2, lora_alpha=3, target_modules=["self_attn.k_proj", "fc2"])),
    ("opt-regex", "opt", dict(r=3, lora_alpha=6, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj")),
    ("opt-all-linear", "opt", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    ("opt-exclude", "opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], exclude_modules=["fc1"])),
    ("opt-layers", "opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    (
        "opt-layers-pattern",
        "opt",
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    ),
    (
        "opt-rank-alpha-pattern",
        "opt",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}),
    ),
    ("opt-rslora", "opt", dict(r=6, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    ("opt-bias-all", "opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")),
    ("opt-bias-lora-only", "opt", dict(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], bias="lora_only")),
    ("opt-modules-to-save", "opt", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("opt-embedding", "opt", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    ("llama-all-linear", "llama", dict(r=4, lora_alpha=16, target_modules="all-linear")),
    ("llama-default-targets", "llama", dict(r=4, lora_alpha=8)),
    ("llama-rslora-pattern", "llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2})),
    ("gpt2-conv1d", "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"])),
    ("gpt2-conv1d-bias", "gpt2", dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"], bias="lora_only")),
    ("gpt2-embedding", "gpt2", dict(r=2, lora_alpha=4, target_modules=["wte", "c_attn"])),
    ("bert-seqcls", "bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("bert-all-linear-seqcls", "bert", dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS")),
]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("case_id,arch,kwargs", CASES, ids=[c[0] for c in CASES])
def test_peft_saved_loads_in_peftcore_and_back(tmp_path, case_id, arch, kwargs):
    warnings.simplefilter("ignore")
    base, inputs = fresh_base(arch)
    pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(pm)
    pm.eval()
    expected = _logits(pm, inputs)
    peft_dir = tmp_path / "peft"
    pm.save_pretrained(peft_dir)

    model, _ = fresh_base(arch)
    peftcore.load_adapter(model, peft_dir)
    model.eval()
    got = _logits(model, inputs)
    assert rel_err(got, expected) <= RTOL

    # peftcore -> PEFT: same keys and shapes on disk, and PEFT gives our logits.
    ours_dir = tmp_path / "ours"
    peftcore.save_pretrained(model, ours_dir)
    theirs = load_file(peft_dir / "adapter_model.safetensors")
    ours = load_file(ours_dir / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k].to(ours[k].dtype), rtol=0, atol=0)
    base2, _ = fresh_base(arch)
    pm2 = peft.PeftModel.from_pretrained(base2, ours_dir).eval()
    assert rel_err(_logits(pm2, inputs), got) <= RTOL


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_bin_file_loads(tmp_path, arch):
    """adapter_model.bin (safe_serialization=False) loads through torch.load(weights_only=True)."""
    warnings.simplefilter("ignore")
    base, inputs = fresh_base(arch)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=ARCHS[arch]["attn"]))
    perturb_trainable(pm)
    pm.eval()
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.exists(tmp_path / "adapter_model.bin")
    model, _ = fresh_base(arch)
    peftcore.load_adapter(model, tmp_path)
    assert rel_err(_logits(model.eval(), inputs), _logits(pm, inputs)) <= RTOL


def test_two_adapters_different_targets_and_ranks(tmp_path):
    """Several adapters on one model, summed when both are active, as in PEFT."""
    warnings.simplefilter("ignore")
    dirs = {}
    for name, kw in {"a": dict(r=2, target_modules=["q_proj"]), "b": dict(r=5, target_modules=["v_proj", "fc2"])}.items():
        base, inputs = fresh_base("opt")
        pm = peft.get_peft_model(base, peft.LoraConfig(lora_alpha=4, init_lora_weights=False, **kw))
        perturb_trainable(pm, seed=ord(name))
        pm.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    base, inputs = fresh_base("opt")
    pm = peft.PeftModel.from_pretrained(base, dirs["a"], adapter_name="a")
    pm.load_adapter(dirs["b"], adapter_name="b")
    pm.eval()
    model, _ = fresh_base("opt")
    peftcore.load_adapter(model, dirs["a"], "a")
    peftcore.load_adapter(model, dirs["b"], "b")
    model.eval()
    for active in (["a"], ["b"], ["a", "b"]):
        pm.base_model.set_adapter(active)
        peftcore.set_adapter(model, active)
        assert rel_err(_logits(model, inputs), _logits(pm, inputs)) <= RTOL, active
    # Layout of a multi-adapter save: "default" at the root, others in subfolders.
    peftcore.save_pretrained(model, tmp_path / "multi")
    assert sorted(os.listdir(tmp_path / "multi")) == ["a", "b"]
    for n in ("a", "b"):
        ours = load_file(tmp_path / "multi" / n / "adapter_model.safetensors")
        theirs = load_file(dirs[n] / "adapter_model.safetensors")
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_bf16_base_matches_peft(tmp_path):
    """A bf16 base with PEFT's fp32 adapters: same rounding points as PEFT (base in bf16,
    LoRA in fp32, one cast back), so logits agree to bf16 resolution."""
    warnings.simplefilter("ignore")
    base, inputs = fresh_base("llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear"))
    perturb_trainable(pm)
    pm.save_pretrained(tmp_path)
    base, _ = fresh_base("llama")
    pm = peft.PeftModel.from_pretrained(base.to(torch.bfloat16), tmp_path).eval()  # fp32 adapters (PEFT default)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if "lora_" in n)
    model, _ = fresh_base("llama")
    model = model.to(torch.bfloat16)
    peftcore.load_adapter(model, tmp_path)
    got, want = _logits(model.eval(), inputs).float(), _logits(pm, inputs).float()
    # Same math, different fp32 summation order inside the low-rank branch: the two can
    # round a few activations to neighbouring bf16 values, which then propagate; 2 bf16
    # ulps of relative error (2 * 2**-8) bounds it.
    assert rel_err(got, want) <= 2 * 2**-8
