"""Switching semantics (load / set / disable / enable / delete), get_adapter_state_dict and
multi-adapter save layout, each compared with PEFT on the same PEFT-saved adapters; and
switching under torch.compile without recompiling."""
from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftcore
from tests._models import INPUT_IDS, assert_unchanged, logits, model_snapshot, peft_adapter_dir, peft_model, tiny_opt

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, same math in another summation order (fused low-rank update vs separate matmuls)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Three PEFT adapters for tiny_opt() with different targets and ranks (overlapping on
    v_proj / q_proj)."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_opt()
    return {
        "a": peft_adapter_dir(root, base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                              name="a", seed=1),
        "b": peft_adapter_dir(root, base, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["v_proj", "fc1", "k_proj"]),
                              name="b", seed=2),
        "c": peft_adapter_dir(root, base, peft.LoraConfig(r=3, lora_alpha=3, use_rslora=True,
                                                          target_modules=["q_proj", "fc2"]), name="c", seed=3),
        # same targets as "a"
        "d": peft_adapter_dir(root, base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name="d", seed=4),
        "e": peft_adapter_dir(root, base, peft.LoraConfig(r=6, target_modules=["q_proj", "v_proj"]), name="e", seed=5),
    }


@pytest.fixture(scope="module")
def base_logits():
    return logits(tiny_opt())


def _peftcore(dirs, names=("a", "b")):
    m = tiny_opt()
    for n in names:
        peftcore.load_adapter(m, dirs[n], n)
    return m


def _peft(dirs, names=("a", "b")):
    return peft_model(tiny_opt(), {n: dirs[n] for n in names})


def test_load_makes_new_adapter_the_only_active(dirs):
    m = tiny_opt()
    assert peftcore.active_adapters(m) == []
    peftcore.load_adapter(m, dirs["a"], "a")
    assert peftcore.active_adapters(m) == ["a"]
    peftcore.set_adapter(m, ["a"])
    peftcore.load_adapter(m, dirs["b"], "b")
    assert peftcore.active_adapters(m) == ["b"]
    peftcore.set_adapter(m, ["a", "b"])
    peftcore.load_adapter(m, dirs["c"], "c")
    assert peftcore.active_adapters(m) == ["c"]
    # the output is that of "c" alone
    only_c = _peftcore(dirs, ["c"])
    assert torch.equal(logits(m), logits(only_c))


@pytest.mark.parametrize("active", ["a", "b", ["a", "b"], ["b", "a"]], ids=["a", "b", "a+b", "b+a"])
def test_set_adapter_matches_peft(dirs, base_logits, active):
    m, pm = _peftcore(dirs), _peft(dirs)
    peftcore.set_adapter(m, active)
    pm.base_model.set_adapter(active)
    assert peftcore.active_adapters(m) == ([active] if isinstance(active, str) else active)
    out = logits(m)
    assert not torch.allclose(out, base_logits, atol=1e-4)
    torch.testing.assert_close(out, logits(pm), **TOL)


def test_switching_back_and_forth_is_exact(dirs):
    m = _peftcore(dirs)
    outs = {}
    for act in ("a", "b", ("a", "b"), "a", ("a", "b"), "b"):
        peftcore.set_adapter(m, list(act) if isinstance(act, tuple) else act)
        o = logits(m)
        if act in outs:
            assert torch.equal(o, outs[act]), act
        outs[act] = o
    assert not torch.allclose(outs["a"], outs["b"], atol=1e-4)
    assert not torch.allclose(outs["a"], outs[("a", "b")], atol=1e-4)


def test_switching_survives_copy_dtype_and_structure_changes(dirs):
    """Every layer's state is a view of one tensor (a switch is one copy): the views must
    follow deepcopy, a dtype change, and adapters added or deleted afterwards."""
    import copy

    m = _peftcore(dirs)
    ref = {}
    for act in ("a", "b"):
        peftcore.set_adapter(m, act)
        ref[act] = logits(m)
    m2 = copy.deepcopy(m)
    for act in ("a", "b", "a"):
        peftcore.set_adapter(m2, act)
        assert torch.equal(logits(m2), ref[act]), act
    m2.to(torch.bfloat16)  # the scales stay float32 and exact (alpha / r is not exact in bf16)
    layers = [x for x in m2.modules() if isinstance(x, peftcore.layers.LoraLayer)]
    for act in ("b", "a"):
        peftcore.set_adapter(m2, act)
        for x in layers:
            want = [x.scaling[n] if n == act else 0.0 for n in x.adapter_names]
            assert x.lora_scales.dtype == torch.float32 and x.lora_scales.tolist() == want
    m2.to(torch.float32)
    peftcore.set_adapter(m2, "a")
    ref_bf16 = logits(m2)  # base weights now bf16-rounded: compare against this from here on
    ref = {"a": ref_bf16}
    peftcore.load_adapter(m2, dirs["c"], "c")  # new layers (fc2) and new slots: the table follows
    peftcore.set_adapter(m2, "a")
    assert torch.equal(logits(m2), ref["a"])
    peftcore.delete_adapter(m2, "b")
    only_ac = _peftcore(dirs, ["a"]).to(torch.bfloat16).to(torch.float32)  # as m2: rounded, then "c"
    peftcore.load_adapter(only_ac, dirs["c"], "c")
    for act in ("c", "a", ["a", "c"]):
        peftcore.set_adapter(m2, act)
        peftcore.set_adapter(only_ac, act)
        assert torch.equal(logits(m2), logits(only_ac)), act


def test_disable_enable_exact_base(dirs, base_logits):
    m = _peftcore(dirs)
    peftcore.set_adapter(m, ["a", "b"])
    active = logits(m)
    assert not torch.equal(active, base_logits)

    peftcore.disable_adapters(m)
    assert torch.equal(logits(m), base_logits)
    assert peftcore.active_adapters(m) == ["a", "b"]  # disabling does not forget the active set
    peftcore.enable_adapters(m)
    assert torch.equal(logits(m), active)

    with peftcore.adapters_disabled(m):
        assert torch.equal(logits(m), base_logits)
    assert torch.equal(logits(m), active)

    with pytest.raises(RuntimeError, match="boom"):
        with peftcore.adapters_disabled(m):
            raise RuntimeError("boom")
    assert torch.equal(logits(m), active)

    # already disabled: the context manager restores "disabled"
    peftcore.disable_adapters(m)
    with peftcore.adapters_disabled(m):
        pass
    assert torch.equal(logits(m), base_logits)
    peftcore.enable_adapters(m)
    assert torch.equal(logits(m), active)


def test_disable_matches_peft(dirs, base_logits):
    m, pm = _peftcore(dirs), _peft(dirs)
    with pm.disable_adapter():
        peft_base = logits(pm)
    with peftcore.adapters_disabled(m):
        ours = logits(m)
    torch.testing.assert_close(peft_base, base_logits, **TOL)
    assert torch.equal(ours, base_logits)


def _expected_after_delete(order, active, delete):
    """PEFT's rule: the other active adapters stay; if none is left, the alphabetically
    first remaining adapter becomes active."""
    active = [active] if isinstance(active, str) else list(active)
    left = [n for n in active if n != delete]
    return left or [sorted(set(order) - {delete})[0]]


@pytest.mark.parametrize(
    "order, active, delete",
    [
        (("c", "a", "b"), "b", "b"),          # only active deleted -> alphabetically first remaining ("a")
        (("b", "c", "a"), "a", "a"),          # -> "b" (not the first loaded, "c")
        (("a", "b", "c"), ["b", "c"], "c"),   # one of two active deleted -> the other stays
        (("a", "b", "c"), "a", "c"),          # an inactive one deleted -> active unchanged
    ],
    ids=["only-active-1", "only-active-2", "one-of-two", "inactive"],
)
def test_delete_adapter_matches_peft(dirs, order, active, delete):
    """Adapters with different targets. PEFT applies its rule layer by layer (each layer picks
    the first of *its own* remaining adapters), which for such adapters leaves PEFT with an
    inconsistent state; the model-wide rule is the intended one, so the PEFT oracle is its
    delete_adapter followed by set_adapter(<rule's choice>)."""
    from peft.utils import get_peft_model_state_dict

    want = _expected_after_delete(order, active, delete)
    m = _peftcore(dirs, order)
    pm = _peft(dirs, order)
    peftcore.set_adapter(m, active)
    pm.base_model.set_adapter(active)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftcore.delete_adapter(m, delete)
        pm.delete_adapter(delete)
    pm.base_model.set_adapter(want)
    assert peftcore.active_adapters(m) == want
    torch.testing.assert_close(logits(m), logits(pm), **TOL)
    with pytest.raises(peftcore.AdapterNameError):
        peftcore.set_adapter(m, delete)
    for n in set(order) - {delete}:  # the others are intact
        theirs = get_peft_model_state_dict(pm, adapter_name=n)
        ours = peftcore.get_adapter_state_dict(m, n)
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_delete_only_active_same_targets_matches_peft_directly(dirs):
    """With adapters on the same modules PEFT's own delete_adapter is consistent: compare
    its resulting active adapter and outputs as they are."""
    order = ("e", "a", "d")
    m, pm = _peftcore(dirs, order), _peft(dirs, order)
    peftcore.set_adapter(m, "d")
    pm.base_model.set_adapter("d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftcore.delete_adapter(m, "d")
        pm.delete_adapter("d")
    assert pm.active_adapters == ["a"]
    assert peftcore.active_adapters(m) == ["a"]
    torch.testing.assert_close(logits(m), logits(pm), **TOL)
    torch.testing.assert_close(logits(m), logits(_peftcore(dirs, ["a"])), rtol=0, atol=0)


def test_delete_all_restores_original_model(dirs, base_logits):
    fresh = tiny_opt()
    tree = [(n, type(mod)) for n, mod in fresh.named_modules()]
    sd = fresh.state_dict()
    m = _peftcore(dirs, ("a", "b", "c"))
    assert [(n, type(mod)) for n, mod in m.named_modules()] != tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in ("b", "a", "c"):
            peftcore.delete_adapter(m, n)
    assert [(n, type(mod)) for n, mod in m.named_modules()] == tree
    assert list(m.state_dict()) == list(sd)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert peftcore.active_adapters(m) == []
    assert torch.equal(logits(m), base_logits)
    # and the model takes a new adapter as if it never had one
    peftcore.load_adapter(m, dirs["b"], "a")
    assert torch.equal(logits(m), logits(_peftcore(dirs, ["b"])))


def test_set_unknown_adapter_changes_nothing(dirs):
    m = _peftcore(dirs)
    peftcore.set_adapter(m, "a")
    snap = model_snapshot(m)
    for bad in ("nope", ["a", "nope"], []):
        with pytest.raises(peftcore.AdapterNameError) as err:
            peftcore.set_adapter(m, bad)
        if bad:
            assert "nope" in str(err.value)
        assert_unchanged(m, snap)
    with pytest.raises(peftcore.AdapterNameError):
        peftcore.delete_adapter(m, "nope")
    assert_unchanged(m, snap)


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_get_adapter_state_dict_matches_peft(dirs, name):
    from peft.utils import get_peft_model_state_dict

    m, pm = _peftcore(dirs, ("a", "b", "c")), _peft(dirs, ("a", "b", "c"))
    ours = peftcore.get_adapter_state_dict(m, name)
    theirs = get_peft_model_state_dict(pm, adapter_name=name)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0)
    # and equal to the file it came from
    disk = load_file(os.path.join(dirs[name], "adapter_model.safetensors"))
    assert sorted(disk) == sorted(ours)


def _layout(root):
    out = set()
    for dp, _, files in os.walk(root):
        for f in files:
            if f != "README.md":
                out.add(os.path.relpath(os.path.join(dp, f), root))
    return out


@pytest.mark.parametrize("names", [("default", "b"), ("a", "b")], ids=["default+b", "a+b"])
def test_save_pretrained_multi_layout_matches_peft(dirs, tmp_path, names):
    srcs = dict(zip(names, ("a", "b")))
    m = tiny_opt()
    for n, src in srcs.items():
        peftcore.load_adapter(m, dirs[src], n)
    pm = peft_model(tiny_opt(), {n: dirs[src] for n, src in srcs.items()})
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    peftcore.save_pretrained(m, ours)
    pm.save_pretrained(theirs)
    assert _layout(ours) == _layout(theirs)
    if "default" in names:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= _layout(ours)
    for n in names:
        sub = "" if n == "default" else n
        a = load_file(ours / sub / "adapter_model.safetensors")
        b = load_file(theirs / sub / "adapter_model.safetensors")
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
        ca = json.loads((ours / sub / "adapter_config.json").read_text())
        cb = json.loads((theirs / sub / "adapter_config.json").read_text())
        for key in ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "bias", "inference_mode"):
            assert (sorted(ca[key]) if key == "target_modules" else ca[key]) == (
                sorted(cb[key]) if key == "target_modules" else cb[key]), key
    # PEFT reloads our folder with the same outputs
    pm2 = peft_model(tiny_opt(), {n: str(ours / ("" if n == "default" else n)) for n in names})
    pm2.base_model.set_adapter(list(names))
    peftcore.set_adapter(m, list(names))
    torch.testing.assert_close(logits(pm2), logits(m), **TOL)


# ---------------------------------------------------------------------- torch.compile
def test_modules_to_save_switch_recompiles_once():
    """README: a switch that changes which modules_to_save copy runs (a choice between whole
    modules) recompiles once; going back to a choice already compiled does not."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)).eval()
    for i, name in enumerate("ab"):
        for p in model.parameters():
            p.requires_grad_(False)
        peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"],
                                                        init_lora_weights=False), name)
        with torch.no_grad():
            model[1].modules_to_save[name].weight.add_(i + 1.0)  # the copies differ
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 16)
    with torch.no_grad():
        for name, frames in (("a", 1), ("b", 2), ("a", 2), ("b", 2)):
            peftcore.set_adapter(model, name)
            assert torch.equal(compiled(x), model(x)), name
            assert counter.frame_count == frames, (name, counter.frame_count)


SWITCH_CONFIGS = {
    "lora": lambda i: peftcore.LoraConfig(r=2 + 2 * i, lora_alpha=1 + i, target_modules=["0"], init_lora_weights=False),
    "ia3": lambda i: peftcore.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False),
    "ia3-ff": lambda i: peftcore.IA3Config(target_modules=["0"], feedforward_modules=["0"], init_ia3_weights=False),
    "adalora": lambda i: peftcore.AdaLoraConfig(init_r=2 + i, total_step=4, target_modules=["0"],
                                                init_lora_weights=False),
}


@pytest.mark.parametrize("method", list(SWITCH_CONFIGS))
def test_switching_under_compile_does_not_recompile(method):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    base = nn.Sequential(nn.Linear(16, 8)).eval()
    base.load_state_dict(model.state_dict())
    peftcore.add_adapter(model, SWITCH_CONFIGS[method](0), "a")
    for p in model.parameters():  # one AdaLoRA adapter trains at a time
        p.requires_grad_(False)
    peftcore.add_adapter(model, SWITCH_CONFIGS[method](1), "b")
    x = torch.randn(3, 16)

    def eager():
        with torch.no_grad():
            return model(x)

    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=False)
    outs = []
    steps = [
        lambda: None,
        lambda: peftcore.set_adapter(model, "a"),
        lambda: peftcore.set_adapter(model, ["a", "b"]),
        lambda: peftcore.disable_adapters(model),
        lambda: peftcore.enable_adapters(model),
        lambda: peftcore.set_adapter(model, "b"),
    ]
    for i, step in enumerate(steps):
        step()
        with torch.no_grad():
            got = compiled(x)
        # CompileCounter runs the captured graph eagerly: the same kernels, the same bits
        assert torch.equal(got, eager()), i
        outs.append(got)
        assert counter.frame_count == 1, f"recompiled after step {i} (frame_count={counter.frame_count})"
    with torch.no_grad():
        assert torch.equal(outs[3], base(x))  # disabled: exactly the base (state 0 skips every adapter)
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)  # b -> a changed the output
    assert not torch.allclose(outs[1], outs[2], atol=1e-4)  # a -> a+b
    assert not torch.allclose(outs[2], outs[3], atol=1e-4)  # disabled
    torch.testing.assert_close(outs[4], outs[2], rtol=0, atol=0)  # enabled again: a+b
    torch.testing.assert_close(outs[5], outs[0], rtol=0, atol=0)  # b again


def test_dtype_conversion_keeps_exact_scales(tmp_path):
    """model.to(bfloat16) converts the adapter factors, as PEFT's modules would be, but
    the per-adapter scales stay float32 and exact (rsLoRA 8/sqrt(6) is not a bf16 value)."""
    from peftcore.layers import LoraLayer

    base = tiny_opt()
    d = peft_adapter_dir(tmp_path, base, peft.LoraConfig(r=6, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    model = tiny_opt()
    peftcore.load_adapter(model, d)
    model = model.to(torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    exact = torch.tensor(8 / 6**0.5, dtype=torch.float32).item()  # the fp32 value; bf16 would be 3.265625
    assert layers
    for m in layers:
        assert m.lora_scales.dtype == torch.float32
        assert m.lora_scales.tolist() == [exact]
        assert m.lora_A["default"].dtype == torch.bfloat16
    ref = peft_model(tiny_opt(), {"default": d}).to(torch.bfloat16)
    # Both models now hold bf16 adapters, but PEFT computes the LoRA branch in bf16 (rounding
    # after each matmul) while peftcore accumulates it in fp32 and rounds once: a few bf16
    # ulps (2^-8 each) per layer, compounded over 2 layers, on logits of magnitude ~1.
    torch.testing.assert_close(logits(model).float(), logits(ref).float(), rtol=0.05, atol=0.05)
    peftcore.disable_adapters(model)
    peftcore.enable_adapters(model)
    assert [m.lora_scales.tolist() for m in layers] == [[exact]] * len(layers)


def test_generate_matches_peft(tmp_path):
    """Greedy generate with a peftcore adapter gives PEFT's tokens."""
    base = tiny_opt()
    d = peft_adapter_dir(tmp_path, base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"]))
    model = tiny_opt()
    peftcore.load_adapter(model, d)
    ref = peft_model(tiny_opt(), {"default": d})
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        ours = model.generate(input_ids=INPUT_IDS[:1], **kw)
        theirs = ref.generate(input_ids=INPUT_IDS[:1], **kw)
    assert torch.equal(ours, theirs)
    with torch.no_grad(), peftcore.adapters_disabled(model):
        plain = model.generate(input_ids=INPUT_IDS[:1], **kw)
    assert torch.equal(plain, tiny_opt().generate(input_ids=INPUT_IDS[:1], **kw))
