"""``peftcore.hotswap_adapter``: the swapped model equals a fresh load of the new adapter
(PEFT's logits), under ``torch.compile`` without recompiling (a compile counter), with
smaller ranks zero-padded and modules the new adapter leaves alone zeroed; refusals leave
the model unchanged."""
from __future__ import annotations

import warnings

import pytest
import torch

import peft  # noqa: E402

import peftcore  # noqa: E402
from tests._models import assert_unchanged, fresh_base, model_snapshot, perturb_trainable, rel_err  # noqa: E402

RTOL = 1e-4  # fp32 logits against PEFT: the contract of tests/test_peft_parity.py (the fused kernels sum in another order)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _saved(tmp_path, name, config, seed):
    base, _ = fresh_base("opt")
    pm = peft.get_peft_model(base, config)
    perturb_trainable(pm, seed)
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def _peft_logits(path, inputs):
    base, _ = fresh_base("opt")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, path).eval()(**inputs).logits


CASES = {
    "lora": (peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False),
             # smaller rank, other alpha, rsLoRA, a subset of the modules (fc1 is zeroed)
             peft.LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)),
    "ia3": (peft.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"], init_ia3_weights=False),
            peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights=False)),
    "adalora": (peft.AdaLoraConfig(init_r=6, total_step=10, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                peft.AdaLoraConfig(init_r=4, total_step=10, lora_alpha=7, target_modules=["q_proj", "v_proj"])),
}


@pytest.mark.parametrize("method", list(CASES))
def test_hotswap_equals_fresh_load_without_recompiling(tmp_path, method):
    from torch._dynamo.testing import CompileCounter

    first, second = CASES[method]
    d1, d2 = _saved(tmp_path, "one", first, 1), _saved(tmp_path, "two", second, 2)
    model, inputs = fresh_base("opt")
    peftcore.load_adapter(model, d1)
    model.eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        out1 = compiled(**inputs).logits
    assert rel_err(out1, _peft_logits(d1, inputs)) <= RTOL
    params = {n: p for n, p in model.named_parameters()}
    peftcore.hotswap_adapter(model, d2, "default")
    assert all(p is params[n] for n, p in model.named_parameters())  # same tensors, written in place
    with torch.no_grad():
        out2 = compiled(**inputs).logits
    assert counter.frame_count == 1, f"recompiled (frame_count={counter.frame_count})"
    assert rel_err(out2, _peft_logits(d2, inputs)) <= RTOL
    assert not torch.allclose(out1, out2, atol=1e-4)
    fresh, _ = fresh_base("opt")
    peftcore.load_adapter(fresh, d2)
    with torch.no_grad():
        assert rel_err(out2, fresh.eval()(**inputs).logits) <= RTOL


def test_hotswap_refusals_leave_model_unchanged(tmp_path):
    d1 = _saved(tmp_path, "one", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), 1)
    big = _saved(tmp_path, "big", peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), 2)
    wider = _saved(tmp_path, "wider", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 3)
    ia3 = _saved(tmp_path, "ia3", peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), 4)
    model, _ = fresh_base("opt")
    peftcore.load_adapter(model, d1)
    snap = model_snapshot(model)
    for path, err, match in [
        (big, peftcore.AdapterConfigError, "rank 4 but adapter 'default'"),
        (wider, peftcore.AdapterConfigError, "v_proj.*no slot"),
        (ia3, peftcore.UnsupportedAdapterError, "IA3"),
    ]:
        with pytest.raises(err, match=match):
            peftcore.hotswap_adapter(model, path, "default")
        assert_unchanged(model, snap)
    with pytest.raises(peftcore.AdapterNameError, match="nope"):
        peftcore.hotswap_adapter(model, d1, "nope")


def test_hotswap_larger_embedding_rank_is_refused(tmp_path):
    """LoRA on an embedding keeps its factors under other names (lora_embedding_A / _B): a
    larger rank there is refused before anything is written, like on a Linear."""
    def cfg(r):
        return peft.LoraConfig(r=r, target_modules=["embed_tokens"], init_lora_weights=False)

    def saved(name, r, seed):  # without the embedding's base table (PEFT saves it by default: not hot-swappable)
        pm = peft.get_peft_model(fresh_base("opt")[0], cfg(r))
        perturb_trainable(pm, seed)
        pm.save_pretrained(tmp_path / name, save_embedding_layers=False)
        return tmp_path / name

    small, big = saved("small", 2, 1), saved("big", 4, 2)
    model, _ = fresh_base("opt")
    peftcore.load_adapter(model, small)
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterConfigError, match="embed_tokens' has rank 4 but adapter 'default'"):
        peftcore.hotswap_adapter(model, big, "default")
    assert_unchanged(model, snap)
