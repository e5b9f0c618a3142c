"""Bad adapter input: every failure raises a typed error that names the file / key / module
at fault, and leaves the model exactly as it was (also when a good adapter was loaded first).
Also: adapter names, and save_pretrained's atomicity."""
from __future__ import annotations

import json
import os
import re
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftcore
from tests._models import assert_unchanged, logits, model_snapshot, peft_adapter_dir, tiny_opt

CFG = "adapter_config.json"
ST = "adapter_model.safetensors"
BIN = "adapter_model.bin"
L0Q = "model.decoder.layers.0.self_attn.q_proj"
L1V = "model.decoder.layers.1.self_attn.v_proj"
PFX = "base_model.model."


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """PEFT-written adapters for tiny_opt(): the one each case corrupts, a good one to load
    first, and an IA3 one."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_opt()
    return {
        "lora": peft_adapter_dir(root, base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="lora"),
        "good": peft_adapter_dir(root, base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"]),
                                 name="good", seed=7),
        "ia3": peft_adapter_dir(root, base, peft.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]),
                                name="ia3"),
    }


@pytest.fixture(params=[False, True], ids=["fresh", "preloaded"])
def model(request, dirs):
    """tiny_opt(), optionally with the good adapter "good" loaded (and active) first."""
    m = tiny_opt()
    if request.param:
        peftcore.load_adapter(m, dirs["good"], "good")
        assert peftcore.active_adapters(m) == ["good"]
    return m


def _copy(src, tmp_path, name="case"):
    dst = os.path.join(tmp_path, name)
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    p = os.path.join(d, CFG)
    with open(p) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    with open(p, "w") as f:
        json.dump(cfg, f)


def _edit_weights(d, fn):
    p = os.path.join(d, ST)
    sd = load_file(p)
    sd = fn(dict(sd))
    save_file(sd, p, metadata={"format": "pt"})


_DELETE = object()


def _write(d, name, data: bytes):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------- the cases
# Each: id -> (mutate(dir, tmp_path), error class, list of alternatives; each alternative is a
# list of substrings that must all be in the message; one alternative must match).
def _set(key, fn):
    def edit(sd):
        sd[PFX + key] = fn(sd[PFX + key])
        return sd
    return edit


def _rm_cfg(d):
    os.remove(os.path.join(d, CFG))


def _truncate(d):
    p = os.path.join(d, ST)
    data = open(p, "rb").read()
    _write(d, ST, data[: len(data) // 2])


def _corrupt(d):
    g = torch.Generator().manual_seed(0)
    _write(d, ST, bytes(torch.randint(0, 256, (2048,), generator=g, dtype=torch.uint8).tolist()))


def _garbage_keys(d):
    _edit_weights(d, lambda sd: {f"{PFX}garbage.{i}.weight": t for i, t in enumerate(sd.values())})


def _extra_key(d):
    def edit(sd):
        sd[PFX + "model.decoder.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
        return sd
    _edit_weights(d, edit)


def _drop_module(d):
    _edit_weights(d, lambda sd: {k: v for k, v in sd.items() if f"{L1V}." not in k})


CASES = {
    "missing_config": (_rm_cfg, peftcore.AdapterFileNotFoundError, [[CFG]]),
    "garbled_json": (lambda d: _write(d, CFG, b'{"peft_type": "LORA", "r": 4,,'), peftcore.AdapterConfigError, [[CFG]]),
    "json_not_object": (lambda d: _write(d, CFG, b'["peft_type", "LORA"]'), peftcore.AdapterConfigError, [[CFG]]),
    "no_peft_type": (lambda d: _edit_config(d, peft_type=_DELETE), peftcore.AdapterConfigError, [[CFG, "peft_type"]]),
    "prefix_tuning": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), peftcore.UnsupportedAdapterError,
                      [[CFG, "PREFIX_TUNING"]]),
    "use_dora": (lambda d: _edit_config(d, use_dora=True), peftcore.UnsupportedAdapterError, [[CFG, "use_dora"]]),
    **{
        f"init_{v}": (lambda d, v=v: _edit_config(d, init_lora_weights=v), peftcore.UnsupportedAdapterError,
                      [[CFG, "init_lora_weights", v]])
        for v in ("pissa", "olora", "loftq", "corda")
    },
    "target_parameters": (lambda d: _edit_config(d, target_parameters=["mlp.experts.gate_up_proj"]),
                          peftcore.UnsupportedAdapterError, [[CFG, "target_parameters"]]),
    "layer_replication": (lambda d: _edit_config(d, layer_replication=[[0, 1]]), peftcore.UnsupportedAdapterError,
                          [[CFG, "layer_replication"]]),
    "lora_bias": (lambda d: _edit_config(d, lora_bias=True), peftcore.UnsupportedAdapterError, [[CFG, "lora_bias"]]),
    **{
        f"r_{name}": (lambda d, v=v: _edit_config(d, r=v), peftcore.AdapterConfigError, [[CFG, f"r={v!r}"], [CFG, "'r'"]])
        for name, v in (("zero", 0), ("negative", -1), ("string", "x"))
    },
    "missing_weights": (lambda d: os.remove(os.path.join(d, ST)), peftcore.AdapterFileNotFoundError, [[ST]]),
    "truncated_safetensors": (_truncate, peftcore.AdapterWeightsError, [[ST]]),
    "corrupt_safetensors": (_corrupt, peftcore.AdapterWeightsError, [[ST]]),
    "lora_A_wrong_in_features": (
        lambda d: _edit_weights(d, _set(f"{L0Q}.lora_A.weight", lambda t: t[:, :31].contiguous())),
        peftcore.AdapterWeightsError, [[ST, L0Q]]),
    "lora_B_wrong_rank": (
        lambda d: _edit_weights(d, _set(f"{L0Q}.lora_B.weight", lambda t: t[:, :3].contiguous())),
        peftcore.AdapterWeightsError, [[ST, L0Q]]),
    "int_dtype": (lambda d: _edit_weights(d, _set(f"{L0Q}.lora_A.weight", lambda t: (t * 100).to(torch.int32))),
                  peftcore.AdapterWeightsError, [[ST, f"{L0Q}.lora_A.weight"]]),
    "nan": (lambda d: _edit_weights(d, _set(f"{L1V}.lora_B.weight", lambda t: t.index_put_((torch.tensor(3),), torch.tensor(float("nan"))))),
            peftcore.AdapterWeightsError, [[ST, f"{L1V}.lora_B.weight"]]),
    "inf": (lambda d: _edit_weights(d, _set(f"{L1V}.lora_A.weight", lambda t: t.index_put_((torch.tensor(1),), torch.tensor(float("-inf"))))),
            peftcore.AdapterWeightsError, [[ST, f"{L1V}.lora_A.weight"]]),
    "unbound_extra_key": (_extra_key, peftcore.AdapterWeightsError,
                          [[ST, "model.decoder.layers.0.self_attn.k_proj.lora_A.weight"]]),
    "all_garbage_keys": (_garbage_keys, peftcore.AdapterWeightsError, [[ST, "garbage."], [ST, "self_attn.q_proj"], [ST, "self_attn.v_proj"]]),
    "target_absent": (lambda d: _edit_config(d, target_modules=["nonexistent_proj"]), peftcore.AdapterConfigError,
                      [[CFG, "nonexistent_proj"]]),
    "missing_module_weights": (_drop_module, peftcore.AdapterWeightsError, [[ST, L1V]]),
}


def _check_message(err, alternatives, where):
    msg = str(err.value)
    ok = any(all(s in msg for s in alt) for alt in alternatives)
    assert ok, f"message {msg!r} should name one of {alternatives}"
    # the full path of the folder at fault, not only a base name
    assert where in msg, f"message {msg!r} should name the folder {where!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_refused_model_unchanged(case, model, dirs, tmp_path):
    mutate, err_type, alternatives = CASES[case]
    d = _copy(dirs["lora"], tmp_path)
    mutate(d)
    snap = model_snapshot(model)
    with pytest.raises(err_type) as err:
        peftcore.load_adapter(model, d, "bad")
    assert isinstance(err.value, (peftcore.PeftcoreError, peftcore.AdapterFileNotFoundError))
    if isinstance(err.value, peftcore.PeftcoreError):
        assert isinstance(err.value, ValueError)
    else:
        assert isinstance(err.value, FileNotFoundError)
    _check_message(err, alternatives, d)
    assert_unchanged(model, snap)


def test_other_method_refused_on_lora_model(dirs):
    """Adapters on one model share a method: an IA3 adapter cannot join LoRA ones."""
    model = _loaded_model(dirs)
    snap = model_snapshot(model)
    with pytest.raises(peftcore.UnsupportedAdapterError) as err:
        peftcore.load_adapter(model, dirs["ia3"], "bad")
    _check_message(err, [[CFG, "IA3", "LORA"]], dirs["ia3"])
    assert_unchanged(model, snap)


@pytest.mark.parametrize("fail_at", [1, 3])
def test_failure_while_attaching_rolls_back(model, dirs, monkeypatch, fail_at):
    """Even a failure after checking, while layers are being attached, leaves the model as it was."""
    from peftcore.layers import LoraLayer

    real_add = LoraLayer.add
    calls = []

    def flaky_add(self, *a, **kw):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("simulated failure while attaching")
        return real_add(self, *a, **kw)

    snap = model_snapshot(model)
    monkeypatch.setattr(LoraLayer, "add", flaky_add)
    with pytest.raises(RuntimeError, match="simulated"):
        peftcore.load_adapter(model, dirs["lora"], "bad")
    monkeypatch.undo()
    assert len(calls) == fail_at
    assert_unchanged(model, snap)
    peftcore.load_adapter(model, dirs["lora"], "bad")  # and the name is free again
    assert peftcore.active_adapters(model) == ["bad"]


# ---------------------------------------------------------------------- pickle payload
class _Payload:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle"])
def test_pickle_payload_bin_not_executed(model, dirs, tmp_path, writer):
    import pickle

    d = _copy(dirs["lora"], tmp_path)
    sd = load_file(os.path.join(d, ST))
    os.remove(os.path.join(d, ST))
    marker = tmp_path / "PWNED"
    payload = dict(sd)
    payload["evil"] = _Payload(marker)
    p = os.path.join(d, BIN)
    if writer == "torch_save":
        torch.save(payload, p)
    else:
        with open(p, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterWeightsError) as err:
        peftcore.load_adapter(model, d, "bad")
    assert not marker.exists(), "the pickle payload ran"
    _check_message(err, [[BIN]], d)
    assert_unchanged(model, snap)


def test_clean_bin_still_loads(dirs, tmp_path):
    """Control for the pickle test: the same tensors in a plain torch.save .bin do load, and
    give the same logits as the safetensors file."""
    d = _copy(dirs["lora"], tmp_path)
    sd = load_file(os.path.join(d, ST))
    os.remove(os.path.join(d, ST))
    torch.save(sd, os.path.join(d, BIN))
    m1, m2 = tiny_opt(), tiny_opt()
    peftcore.load_adapter(m1, d)
    peftcore.load_adapter(m2, dirs["lora"])
    out = logits(m1)
    assert not torch.equal(out, logits(tiny_opt()))
    assert torch.equal(out, logits(m2))


# ---------------------------------------------------------------------- adapter names
@pytest.mark.parametrize("name", ["", "a.b", "a/b"])
def test_invalid_adapter_name(model, dirs, name):
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterNameError) as err:
        peftcore.load_adapter(model, dirs["lora"], name)
    assert repr(name) in str(err.value)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["", "a.b", "a/b"])
def test_invalid_adapter_name_add(name):
    model = tiny_opt()
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterNameError) as err:
        peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["q_proj"]), name)
    assert repr(name) in str(err.value)
    assert_unchanged(model, snap)


def test_taken_adapter_name(dirs):
    model = tiny_opt()
    peftcore.load_adapter(model, dirs["good"], "good")
    snap = model_snapshot(model)
    for load in (lambda: peftcore.load_adapter(model, dirs["lora"], "good"),
                 lambda: peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["k_proj"]), "good")):
        with pytest.raises(peftcore.AdapterNameError) as err:
            load()
        assert "'good'" in str(err.value)
        assert_unchanged(model, snap)


def test_good_load_after_failures_matches_clean_load(dirs, tmp_path):
    """A model that went through failed loads behaves exactly like one that did not."""
    model = tiny_opt()
    for case in ("lora_B_wrong_rank", "missing_module_weights", "nan"):
        d = _copy(dirs["lora"], tmp_path, case)
        CASES[case][0](d)
        with pytest.raises(peftcore.PeftcoreError):
            peftcore.load_adapter(model, d, "x")
    peftcore.load_adapter(model, dirs["lora"], "x")
    clean = tiny_opt()
    peftcore.load_adapter(clean, dirs["lora"], "x")
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in clean.named_modules()]
    assert torch.equal(logits(model), logits(clean))


# ---------------------------------------------------------------------- save atomicity
def _files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _loaded_model(dirs):
    m = tiny_opt()
    peftcore.load_adapter(m, dirs["lora"])
    return m


def test_save_interrupted_in_weights_write_leaves_nothing(dirs, tmp_path, monkeypatch):
    import safetensors.torch

    model = _loaded_model(dirs)
    snap = model_snapshot(model)
    out = tmp_path / "out"
    real_save = safetensors.torch.save_file
    calls = []

    def partial_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        real_save(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_then_fail)
    with pytest.raises(OSError):
        peftcore.save_pretrained(model, out)
    assert calls, "save_pretrained did not write through safetensors.torch.save_file"
    left = _files(out)
    assert ST not in left and CFG not in left, left
    assert not [f for f in left if "tmp" in f.lower() or f.startswith(".")], f"temporary files left: {left}"
    assert left == [], left
    assert_unchanged(model, snap)


def test_save_interrupted_over_existing_adapter_keeps_it_consistent(dirs, tmp_path, monkeypatch):
    """An interrupted save over a folder holding an adapter must not leave the new weights
    next to the old config (that pair could load silently wrong): either the old adapter is
    intact or there is no adapter."""
    out = tmp_path / "out"
    old = tiny_opt()
    peftcore.load_adapter(old, dirs["good"])
    peftcore.save_pretrained(old, out)
    before = {f: (out / f).read_bytes() for f in _files(out)}

    model = _loaded_model(dirs)
    real_replace = os.replace

    def fail_on_config(src, dst, *a, **kw):
        if os.fspath(dst).endswith(CFG):
            raise OSError(5, "I/O error (simulated)")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", fail_on_config)
    with pytest.raises(OSError):
        peftcore.save_pretrained(model, out)
    monkeypatch.undo()
    after = {f: (out / f).read_bytes() for f in _files(out)}
    assert not [f for f in after if f not in before], f"temporary files left: {sorted(after)}"
    intact = after == before
    gone = ST not in after and CFG not in after
    assert intact or gone, "folder holds the new adapter_model.safetensors with the old adapter_config.json"


def test_save_over_existing_folder_replaces_files(dirs, tmp_path):
    """Saving adapter X over a folder that held a bigger adapter Y gives the same bytes as
    saving X into an empty folder, and loads as X."""
    big = tiny_opt()
    peftcore.load_adapter(big, dirs["good"])
    peftcore.add_adapter(big, peftcore.LoraConfig(r=16, target_modules=["k_proj", "fc1", "fc2", "out_proj"],
                                                  init_lora_weights=False), "extra")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    peftcore.save_pretrained(big, out, adapter_names=["extra"])  # written to out/extra/
    shutil.copytree(out / "extra", out, dirs_exist_ok=True)  # a large adapter at the root
    size_before = (out / ST).stat().st_size

    model = _loaded_model(dirs)
    peftcore.save_pretrained(model, out)
    peftcore.save_pretrained(model, fresh)
    assert (out / ST).stat().st_size < size_before
    for f in (ST, CFG):
        assert (out / f).read_bytes() == (fresh / f).read_bytes(), f
    assert not [f for f in _files(out) if f not in (ST, CFG, "extra")], _files(out)
    reloaded = tiny_opt()
    peftcore.load_adapter(reloaded, out)
    assert torch.equal(logits(reloaded), logits(model))
    assert re.search(r'"r": 4\b', (out / CFG).read_text())


def test_quantized_target_refused(dirs):
    """A targeted plain layer whose weight is not floating point is refused, naming the
    module (bitsandbytes Linear4bit / Linear8bitLt are adapted: tests/test_quantized.py)."""
    m = tiny_opt()
    q = m.model.decoder.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.zeros(q.weight.shape, dtype=torch.int8), requires_grad=False)
    before = [(n, type(x)) for n, x in m.named_modules()]
    with pytest.raises(peftcore.UnsupportedAdapterError, match=r"model\.decoder\.layers\.0\.self_attn\.q_proj"):
        peftcore.load_adapter(m, dirs["lora"])
    assert [(n, type(x)) for n, x in m.named_modules()] == before
    assert peftcore.active_adapters(m) == []
