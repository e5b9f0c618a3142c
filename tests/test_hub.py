"""Loading adapters by Hub repo id from a hand-made, offline Hugging Face cache, and
``peftcore.from_pretrained`` (base model from ``base_model_name_or_path``, then the adapter),
checked against PEFT on the same files."""
from __future__ import annotations

import json
import os
import shutil

import peft
import pytest
import torch

import peftcore
from tests._models import assert_unchanged, logits, model_snapshot, peft_adapter_dir, peft_model, tiny_opt

REPO = "tiny-org/tiny-adapter"
MAIN = "0123456789abcdef0123456789abcdef01234567"
DEV = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three different PEFT adapters for tiny_opt(): main, dev branch, and a subfolder one."""
    root = tmp_path_factory.mktemp("peft")
    base = tiny_opt()
    return {
        "main": peft_adapter_dir(root, base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="main", seed=1),
        "dev": peft_adapter_dir(root, base, peft.LoraConfig(r=2, target_modules=["fc1"]), name="dev", seed=2),
        "sub": peft_adapter_dir(root, base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "out_proj"]),
                                name="sub", seed=3),
    }


def _put(snapshot_dir, src):
    os.makedirs(snapshot_dir, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(src, f), os.path.join(snapshot_dir, f))


@pytest.fixture
def hub_cache(tmp_path, adapters, monkeypatch):
    """``<cache>/models--tiny-org--tiny-adapter`` with refs/main -> MAIN (adapter "main",
    and adapter "sub" in subfolder "sub") and refs/dev -> DEV (adapter "dev"); offline mode on."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "dev").write_text(DEV)
    _put(repo / "snapshots" / MAIN, adapters["main"])
    _put(repo / "snapshots" / MAIN / "sub", adapters["sub"])
    _put(repo / "snapshots" / DEV, adapters["dev"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads these at import time
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return str(cache)


@pytest.fixture(scope="module")
def peft_logits(adapters):
    base = tiny_opt()
    return {k: logits(peft_model(base, {"default": d})) for k, d in adapters.items()}


def test_peft_oracles_differ(peft_logits):
    base = logits(tiny_opt())
    vals = list(peft_logits.values())
    for i, a in enumerate(vals):
        assert not torch.allclose(a, base, atol=1e-4)
        for b in vals[i + 1:]:
            assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, which",
    [
        ({}, "main"),
        ({"revision": "main"}, "main"),
        ({"revision": "dev"}, "dev"),
        ({"revision": DEV}, "dev"),
        ({"revision": MAIN}, "main"),
        ({"subfolder": "sub"}, "sub"),
        ({"subfolder": "sub", "revision": "main"}, "sub"),
    ],
    ids=["default", "main", "branch", "commit-dev", "commit-main", "subfolder", "subfolder-main"],
)
def test_load_from_hub_cache_matches_peft(hub_cache, peft_logits, kwargs, which):
    model = tiny_opt()
    peftcore.load_adapter(model, REPO, cache_dir=hub_cache, **kwargs)
    assert peftcore.active_adapters(model) == ["default"]
    torch.testing.assert_close(logits(model), peft_logits[which], rtol=1e-5, atol=1e-5)


def test_load_from_hub_cache_default_cache_dir(hub_cache, peft_logits):
    """Without cache_dir, huggingface_hub's configured cache (HF_HUB_CACHE) is used."""
    model = tiny_opt()
    peftcore.load_adapter(model, REPO, revision="dev", local_files_only=True)
    torch.testing.assert_close(logits(model), peft_logits["dev"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "repo, kwargs, needle",
    [
        ("tiny-org/missing-adapter", {}, "tiny-org/missing-adapter"),
        (REPO, {"revision": "no-such-branch"}, "no-such-branch"),
        (REPO, {"subfolder": "nope"}, "nope"),
    ],
    ids=["missing-repo", "missing-revision", "missing-subfolder"],
)
@pytest.mark.parametrize("preloaded", [False, True])
def test_missing_in_hub_cache(hub_cache, adapters, repo, kwargs, needle, preloaded):
    model = tiny_opt()
    if preloaded:
        peftcore.load_adapter(model, adapters["dev"], "dev")
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterFileNotFoundError) as err:
        peftcore.load_adapter(model, repo, "x", cache_dir=hub_cache, **kwargs)
    assert isinstance(err.value, FileNotFoundError)
    assert needle in str(err.value)
    assert repo in str(err.value)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------- from_pretrained
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "tiny-opt"
    tiny_opt().save_pretrained(d)
    return str(d)


def _adapter_for_base(tmp_path, src, base_dir, **changes):
    d = tmp_path / "adapter"
    shutil.copytree(src, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_dir
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return str(d)


def _peft_reference(base_dir, adapter_dir, **base_kwargs):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, **base_kwargs)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("how", ["model_class", "task_type", "auto_mapping"])
def test_from_pretrained_matches_peft(tmp_path, adapters, base_dir, how):
    from transformers import OPTForCausalLM

    changes = {"task_type": "CAUSAL_LM"} if how == "task_type" else {}
    if how == "task_type":
        changes["auto_mapping"] = None
    d = _adapter_for_base(tmp_path, adapters["main"], base_dir, **changes)
    kw = {"model_class": OPTForCausalLM} if how == "model_class" else {}
    model = peftcore.from_pretrained(d, **kw)
    assert type(model) is OPTForCausalLM
    assert peftcore.active_adapters(model) == ["default"]
    ref = _peft_reference(base_dir, d)
    out = logits(model)
    assert not torch.allclose(out, logits(tiny_opt()), atol=1e-4)
    torch.testing.assert_close(out, logits(ref), rtol=1e-5, atol=1e-5)


def test_from_pretrained_passes_base_kwargs(tmp_path, adapters, base_dir):
    from transformers import OPTForCausalLM

    d = _adapter_for_base(tmp_path, adapters["main"], base_dir, task_type="CAUSAL_LM")
    model = peftcore.from_pretrained(d, torch_dtype=torch.bfloat16)
    assert isinstance(model, OPTForCausalLM)
    assert model.dtype == torch.bfloat16
    assert model.model.decoder.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    # PEFT keeps bf16-base adapters in float32 (autocast_adapter_dtype); so does peftcore
    sd = peftcore.get_adapter_state_dict(model)
    assert sd and all(t.dtype == torch.float32 for t in sd.values())
    ref = _peft_reference(base_dir, d, dtype=torch.bfloat16)
    out, want = logits(model), logits(ref)
    assert out.dtype == want.dtype == torch.bfloat16
    # bf16 logits: in each of the 4 adapted layers (q_proj, v_proj x 2 decoder layers)
    # PEFT rounds the base and the LoRA output to bf16 before adding them, peftcore adds
    # in fp32 and rounds once: up to one bf16 ulp (2**-8 relative) per adapted layer,
    # 4 * 2**-8 = 1.6e-2 to first order; 2e-2 covers it.
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_from_pretrained_hub_adapter(hub_cache, adapters, base_dir, tmp_path):
    """The adapter itself by repo id (offline cache), its base from a local folder."""
    import huggingface_hub.constants as hc

    repo = os.path.join(hub_cache, "models--tiny-org--based", )
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(MAIN)
    snap = os.path.join(repo, "snapshots", MAIN)
    d = _adapter_for_base(tmp_path, adapters["sub"], base_dir)
    _put(snap, d)
    assert hc.HF_HUB_OFFLINE
    model = peftcore.from_pretrained("tiny-org/based", cache_dir=hub_cache)
    torch.testing.assert_close(logits(model), logits(_peft_reference(base_dir, d)), rtol=1e-5, atol=1e-5)


def test_from_pretrained_without_base_name(tmp_path, adapters):
    d = tmp_path / "adapter"
    shutil.copytree(adapters["main"], d)
    with pytest.raises(peftcore.PeftcoreError) as err:
        peftcore.from_pretrained(str(d))
    assert "base_model_name_or_path" in str(err.value)


@pytest.mark.parametrize("adapter_kwargs, which", [({"revision": "dev"}, "dev"), ({"subfolder": "sub"}, "sub"),
                                                   ({}, "main")], ids=["branch", "subfolder", "default"])
def test_transformers_load_adapter_from_hub_cache(hub_cache, peft_logits, adapter_kwargs, which):
    """patch_transformers: transformers' model.load_adapter(repo_id, adapter_kwargs=...) reads
    the same offline cache (revision, subfolder, cache_dir as transformers passes them)."""
    peftcore.patch_transformers()
    try:
        model = tiny_opt()
        model.load_adapter(REPO, adapter_kwargs={"cache_dir": hub_cache, **adapter_kwargs})
        torch.testing.assert_close(logits(model), peft_logits[which], rtol=1e-5, atol=1e-5)
    finally:
        peftcore.unpatch_transformers()
