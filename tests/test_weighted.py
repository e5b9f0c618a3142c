"""``peftcore.add_weighted_adapter`` against PEFT 0.21.2 where PEFT is right, and against
the math where it is not (rsLoRA: PEFT gives the combined adapter scale √r instead of 1).

Oracles: PEFT's ``add_weighted_adapter`` on the same adapters (logits); the exact delta
Σ w_i·s_i·B_i·A_i per layer ("cat" must equal it; "svd" at full rank too); the file PEFT
loads back.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import peft  # noqa: E402

import peftcore  # noqa: E402
from peftcore.layers import LoraLayer  # noqa: E402
from tests._models import assert_unchanged, fresh_base, model_snapshot, perturb_trainable, rel_err  # noqa: E402

RTOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _saved(tmp_path, configs: dict, arch="opt"):
    dirs = {}
    for i, (name, cfg) in enumerate(configs.items()):
        base, _ = fresh_base(arch)
        pm = peft.get_peft_model(base, cfg)
        perturb_trainable(pm, seed=i)
        pm.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def _both(dirs, arch="opt"):
    base, inputs = fresh_base(arch)
    names = list(dirs)
    pm = peft.PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(dirs[n], adapter_name=n)
    model, _ = fresh_base(arch)
    for n in names:
        peftcore.load_adapter(model, dirs[n], n)
    return pm, model, inputs


def _deltas(model, names, weights):
    """Per layer: Σ w_i·s_i·B_i·A_i over the adapters it carries."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer):
            terms = [w * m.scaling[n] * (m.adapter_weights(n)[1] @ m.adapter_weights(n)[0]).detach()
                     for n, w in zip(names, weights) if n in m.adapter_names]
            if terms:
                out[path] = sum(terms)
    return out


LORA = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=2, target_modules=["v_proj", "fc1"]),
}


@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
def test_lora_matches_peft_and_math(tmp_path, combination):
    dirs = _saved(tmp_path, {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in LORA.items()})
    pm, model, inputs = _both(dirs)
    w = [0.7, -1.3]
    pm.add_weighted_adapter(["a", "b"], w, "mix", combination_type=combination)
    pm.set_adapter("mix")
    peftcore.add_weighted_adapter(model, ["a", "b"], w, "mix", combination_type=combination)
    assert peftcore.active_adapters(model) == ["mix"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".mix"))
    assert rel_err(_logits(model, inputs), _logits(pm, inputs)) <= RTOL
    want = _deltas(model, ["a", "b"], w)
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer) and "mix" in m.adapter_names:
            assert m.scaling["mix"] == 1.0
            got = m.adapter_weights("mix")[1] @ m.adapter_weights("mix")[0]
            if combination in ("cat", "svd"):  # exact (svd: the rank-4 delta of a rank <= 4 sum, or rank 8 for v_proj)
                if combination == "svd" and "v_proj" in path:
                    continue  # v_proj carries both: rank 8 truncated to 4, checked through the logits
                torch.testing.assert_close(got, want[path], rtol=1e-5, atol=1e-6)
    # The saved file loads in PEFT to the same logits.
    peftcore.save_pretrained(model, tmp_path / "ours", ["mix"])
    base, _ = fresh_base("opt")
    pm2 = peft.PeftModel.from_pretrained(base, tmp_path / "ours" / "mix")
    assert rel_err(_logits(pm2, inputs), _logits(model, inputs)) <= RTOL


def test_svd_full_rank_is_exact(tmp_path):
    dirs = _saved(tmp_path, {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in LORA.items()})
    _, model, inputs = _both(dirs)
    peftcore.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_rank=8)
    want = _deltas(model, ["a", "b"], [1.0, 0.5])
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer) and "mix" in m.adapter_names:
            got = m.adapter_weights("mix")[1] @ m.adapter_weights("mix")[0]
            torch.testing.assert_close(got, want[path], rtol=1e-4, atol=1e-5)


def test_rslora_combined_scale_is_one(tmp_path):
    """PEFT keeps use_rslora on the combined adapter (alpha = r): scale √r instead of 1.
    peftcore's combination equals the exact weighted sum; PEFT's is √r times too large."""
    cfgs = {n: peft.LoraConfig(init_lora_weights=False, use_rslora=True, **kw) for n, kw in LORA.items()}
    dirs = _saved(tmp_path, cfgs)
    pm, model, inputs = _both(dirs)
    w = [1.0, 1.0]
    peftcore.add_weighted_adapter(model, ["a", "b"], w, "mix", combination_type="cat")
    want = _deltas(model, ["a", "b"], w)
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer) and "mix" in m.adapter_names:
            got = m.scaling["mix"] * m.adapter_weights("mix")[1] @ m.adapter_weights("mix")[0]
            torch.testing.assert_close(got, want[path], rtol=1e-5, atol=1e-6)
    pm.add_weighted_adapter(["a", "b"], w, "mix", combination_type="cat")
    layer = pm.base_model.model.model.decoder.layers[0].self_attn.v_proj
    assert layer.scaling["mix"] == pytest.approx(8**0.5)  # PEFT's over-scale (r = 8)
    # Both adapters active in PEFT sum to the exact combination: our "mix" alone equals it.
    pm.base_model.set_adapter(["a", "b"])
    assert rel_err(_logits(model, inputs), _logits(pm, inputs)) <= RTOL
    # The saved combination (use_rslora off, alpha = r) loads in PEFT at scale 1.
    peftcore.save_pretrained(model, tmp_path / "ours", ["mix"])
    base, _ = fresh_base("opt")
    pm2 = peft.PeftModel.from_pretrained(base, tmp_path / "ours" / "mix")
    assert rel_err(_logits(pm2, inputs), _logits(model, inputs)) <= RTOL


def test_ia3_weighted_sum_matches_peft(tmp_path):
    kw = dict(init_ia3_weights=False, feedforward_modules=["fc2"])
    dirs = _saved(tmp_path, {"a": peft.IA3Config(target_modules=["k_proj", "fc2"], **kw),
                             "b": peft.IA3Config(target_modules=["v_proj", "fc2"], **kw)})
    pm, model, inputs = _both(dirs)
    pm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix")
    pm.set_adapter("mix")
    peftcore.add_weighted_adapter(model, ["a", "b"], [0.6, 0.4], "mix")
    assert rel_err(_logits(model, inputs), _logits(pm, inputs)) <= RTOL
    cfg = peftcore.get_adapter_state_dict(model, "mix")
    assert any(k.endswith("k_proj.ia3_l") for k in cfg) and any(k.endswith("v_proj.ia3_l") for k in cfg)


def test_refusals_leave_model_unchanged(tmp_path):
    dirs = _saved(tmp_path, {"a": peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                             "b": peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)})
    _, model, _ = _both(dirs)
    snap = model_snapshot(model)
    for kwargs, err, match in [
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", combination_type="linear"), peftcore.AdapterConfigError, "one rank"),
        (dict(adapters=["a", "zz"], weights=[1, 1], adapter_name="m"), peftcore.AdapterNameError, "zz"),
        (dict(adapters=["a"], weights=[1, 2], adapter_name="m"), peftcore.AdapterConfigError, "one weight per adapter"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), peftcore.AdapterNameError, "already loaded"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", combination_type="ties"), peftcore.UnsupportedAdapterError, "ties"),
    ]:
        with pytest.raises(err, match=match):
            peftcore.add_weighted_adapter(model, **kwargs)
        assert_unchanged(model, snap)
