"""PEFT's ``autocast_adapter_dtype`` on ``load_adapter``, ``add_adapter`` and
``from_pretrained``: True (the default) keeps adapters of fp16 / bf16 bases in float32,
False keeps them in the base's dtype. Checked against PEFT with the same flag: the
adapter tensors' dtypes, the outputs, the saved file (PEFT loads ours), a new adapter's
tensors, and a training step with base-dtype adapters."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftcore
from peftcore.layers import AdapterLayer
from tests._models import INPUT_IDS, perturb_trainable, tiny_llama, tiny_opt

# case: (base builder, config class name in peft and in peftcore, its arguments)
CASES = {
    "lora": (tiny_llama, "LoraConfig", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "adalora": (tiny_llama, "AdaLoraConfig", dict(init_r=6, target_r=4, lora_alpha=8, total_step=10,
                                                   target_modules=["q_proj", "v_proj", "up_proj"])),
    "ia3": (tiny_opt, "IA3Config", dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])),
}


def _config(case, lib=peft):
    _, cls, kw = CASES[case]
    return getattr(lib, cls)(**kw)


LOW = [torch.bfloat16, torch.float16]
# peftcore's distance from the float64 outputs over PEFT's: PEFT rounds each product of the
# low-rank branch to the base dtype, peftcore accumulates it in float32, so it is usually
# closer; 2 leaves room for a draw where PEFT's roundings happen to cancel.
FACTOR = 2.0


def _adapter_dtypes(model):
    return {p.dtype for m in model.modules() if isinstance(m, AdapterLayer)
            for d in m.param_dicts for p in m._modules[d].values()}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.double()


def _saved(tmp_path, case, dtype):
    base = CASES[case][0]().to(dtype)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), _config(case), autocast_adapter_dtype=False)
    perturb_trainable(pm, seed=1)
    pm.save_pretrained(tmp_path / "peft")
    return base, tmp_path / "peft"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_load_without_autocast_matches_peft(tmp_path, case, dtype):
    base, d = _saved(tmp_path, case, dtype)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), d, autocast_adapter_dtype=False).eval()
    ours = copy.deepcopy(base)
    peftcore.load_adapter(ours, d, autocast_adapter_dtype=False)
    assert _adapter_dtypes(ours) == {dtype}
    assert {p.dtype for n, p in theirs.named_parameters() if ".lora_" in n or ".ia3_" in n} == {dtype}
    truth = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), d).eval())
    e_ours = (_logits(ours) - truth).abs().max().item()
    e_theirs = (_logits(theirs) - truth).abs().max().item()
    assert e_ours <= FACTOR * e_theirs + 1e-6, (e_ours, e_theirs)

    # Saved in the base dtype, as PEFT saves it, and PEFT reads ours to the same outputs.
    peftcore.save_pretrained(ours, tmp_path / "ours")
    ours_sd, theirs_sd = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "ours", d))
    assert ours_sd.keys() == theirs_sd.keys()
    for k in ours_sd:
        assert ours_sd[k].dtype == theirs_sd[k].dtype and torch.equal(ours_sd[k], theirs_sd[k]), k
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", autocast_adapter_dtype=False)
    assert torch.equal(_logits(back.eval()), _logits(theirs))


@pytest.mark.parametrize("case", list(CASES))
def test_autocast_default_keeps_float32(tmp_path, case):
    base, d = _saved(tmp_path, case, torch.bfloat16)
    ours = copy.deepcopy(base)
    peftcore.load_adapter(ours, d)
    assert _adapter_dtypes(ours) == {torch.float32}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), d)
    assert {p.dtype for n, p in theirs.named_parameters() if ".lora_" in n or ".ia3_" in n} == {torch.float32}


@pytest.mark.parametrize("case", ["lora", "ia3"])
def test_add_adapter_without_autocast_starts_as_peft_and_trains(case):
    base = CASES[case][0]().to(torch.bfloat16)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), _config(case), autocast_adapter_dtype=False)
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    peftcore.add_adapter(ours, _config(case, peftcore), autocast_adapter_dtype=False)
    theirs = {n.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", ""): p
              for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n.replace(".default", ""): p for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys()
    for n in mine:
        assert mine[n].dtype == theirs[n].dtype == torch.bfloat16 and mine[n].shape == theirs[n].shape, n
        if case == "ia3" or ".lora_B" in n:  # PEFT's deterministic starts: ones, zeros (A is random)
            assert torch.equal(mine[n], theirs[n]), n
    # One optimizer step in bf16 moves the adapter (its gradients reach bf16 parameters).
    before = {n: p.detach().clone() for n, p in mine.items()}
    opt = torch.optim.SGD(list(mine.values()), lr=1.0)
    ours.train()
    ours(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in mine.values())
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in mine.items())
