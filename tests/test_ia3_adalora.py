"""IA3 and AdaLoRA end to end, differential against Hugging Face PEFT 0.21.2.

PEFT builds each adapter (random vectors / factors), saves it; peftcore loads it onto a
fresh copy of the same base and must give PEFT's logits; peftcore saves it again and the
file must equal PEFT's key for key, and PEFT must load peftcore's file to the same
logits. Also: AdaLoRA rank patterns (kept triplets only on disk, zero-rank layers,
ranknum = init_r, legacy ``ranknum`` keys), several IA3 adapters (they multiply), merge /
unmerge against PEFT, methods that do not mix, bitsandbytes bases, and bad input.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peft  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import peftcore  # noqa: E402
from peftcore.layers import AdaLoraLayer, Ia3Layer  # noqa: E402
from tests._models import (  # noqa: E402
    assert_unchanged,
    fresh_base,
    model_snapshot,
    perturb_trainable,
    rel_err,
)

RTOL = 1e-4  # fp32 logits, as for LoRA (tests/test_peft_parity.py)
ST = "adapter_model.safetensors"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _peft_saved(tmp_path, arch, config, *, seed=0, edit=None):
    """(folder, PEFT's logits) of a PEFT adapter with every trainable tensor perturbed;
    ``edit(peft_model)`` runs before saving."""
    base, inputs = fresh_base(arch)
    pm = peft.get_peft_model(base, config)
    perturb_trainable(pm, seed)
    if edit is not None:
        edit(pm)
    pm.eval()
    want = _logits(pm, inputs)
    out = tmp_path / "peft"
    pm.save_pretrained(out)
    return out, want, inputs


def _round_trip(tmp_path, arch, peft_dir, want, inputs):
    """peftcore loads PEFT's file (logits = PEFT's after loading it, and = ``want``, the
    saving model's, unless None), saves it (file = PEFT's), PEFT loads ours."""
    model, _ = fresh_base(arch)
    peftcore.load_adapter(model, peft_dir)
    model.eval()
    got = _logits(model, inputs)
    base, _ = fresh_base(arch)
    assert rel_err(got, _logits(peft.PeftModel.from_pretrained(base, peft_dir).eval(), inputs)) <= RTOL
    if want is not None:
        assert rel_err(got, want) <= RTOL
    ours = tmp_path / "ours"
    peftcore.save_pretrained(model, ours)
    a, b = load_file(ours / ST), load_file(peft_dir / ST)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    for k in a:
        assert torch.equal(a[k], b[k].to(a[k].dtype)), k
    base2, _ = fresh_base(arch)
    pm2 = peft.PeftModel.from_pretrained(base2, ours).eval()
    assert rel_err(_logits(pm2, inputs), got) <= RTOL
    return model, ours


# ---------------------------------------------------------------------- IA3
IA3_CASES = [
    # (id, arch, IA3Config kwargs): OPT and GPT-2 have biases, Llama has none.
    ("opt-output-bias", "opt", dict(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
    ("opt-ff-and-output", "opt", dict(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"])),
    ("opt-regex", "opt", dict(target_modules=r".*\.(k_proj|fc2)", feedforward_modules=r".*\.fc2")),
    ("opt-modules-to-save", "opt", dict(target_modules=["k_proj"], feedforward_modules=[], modules_to_save=["lm_head"])),
    ("llama-defaults", "llama", dict()),
    ("llama-all-ff", "llama", dict(target_modules=["down_proj", "o_proj"], feedforward_modules=["down_proj", "o_proj"])),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
]


@pytest.mark.parametrize("case_id,arch,kw", IA3_CASES, ids=[c[0] for c in IA3_CASES])
def test_ia3_peft_saved_loads_and_back(tmp_path, case_id, arch, kw):
    peft_dir, want, inputs = _peft_saved(tmp_path, arch, peft.IA3Config(init_ia3_weights=False, **kw))
    model, ours = _round_trip(tmp_path, arch, peft_dir, want, inputs)
    layers = [m for m in model.modules() if isinstance(m, Ia3Layer)]
    assert layers
    theirs_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    ours_cfg = json.loads((ours / "adapter_config.json").read_text())
    assert ours_cfg["peft_type"] == "IA3"
    for k in ("feedforward_modules", "target_modules"):
        v1, v2 = theirs_cfg[k], ours_cfg[k]
        assert (sorted(v1) if isinstance(v1, list) else v1) == (sorted(v2) if isinstance(v2, list) else v2)
    assert ours_cfg["fan_in_fan_out"] == theirs_cfg["fan_in_fan_out"]


def test_ia3_new_adapter_is_identity_then_trains(tmp_path):
    model, inputs = fresh_base("opt")
    want = _logits(model, inputs)
    peftcore.add_adapter(model, peftcore.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]))
    assert torch.equal(_logits(model, inputs), want)  # vectors of ones
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".ia3_l.default") for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    opt.step()
    model.eval()
    assert not torch.equal(_logits(model, inputs), want)


def test_several_ia3_adapters_multiply_like_peft(tmp_path):
    dirs = {}
    for i, (name, kw) in enumerate({
        "a": dict(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]),
        "b": dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]),
    }.items()):
        base, inputs = fresh_base("opt")
        pm = peft.get_peft_model(base, peft.IA3Config(init_ia3_weights=False, **kw))
        perturb_trainable(pm, seed=i)
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
    base, _ = fresh_base("opt")
    with peftcore.adapters_disabled(model):
        assert torch.equal(_logits(model, inputs), _logits(base, inputs))


@pytest.mark.parametrize("arch,kw", [
    ("opt", dict(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])),
    ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
])
def test_ia3_merge_matches_peft(tmp_path, arch, kw):
    peft_dir, want, inputs = _peft_saved(tmp_path, arch, peft.IA3Config(init_ia3_weights=False, **kw))
    base, _ = fresh_base(arch)
    pm = peft.PeftModel.from_pretrained(base, peft_dir)
    merged_peft = pm.merge_and_unload().eval()
    model, _ = fresh_base(arch)
    before = copy.deepcopy(model.state_dict())
    peftcore.load_adapter(model, peft_dir)
    peftcore.merge_adapter(model)
    assert rel_err(_logits(model.eval(), inputs), want) <= RTOL
    theirs = merged_peft.state_dict()
    ours_layers = {n: m for n, m in model.named_modules() if isinstance(m, Ia3Layer)}
    for path, m in ours_layers.items():
        for k in ("weight", "bias"):
            t = getattr(m.base_layer, k, None)
            if t is not None:
                assert torch.equal(t, theirs[f"{path}.{k}"]), (path, k)
    with pytest.warns(UserWarning, match="inaccurate"):
        peftcore.unmerge_adapter(model)
    after = model.state_dict()
    for path, m in ours_layers.items():
        l = m.ia3_l["default"].detach().double()  # noqa: E741
        for k in ("weight", "bias"):
            key = f"{path}.{k}"
            if key in before:
                # PEFT's lossy inverse: W·l / (l + 1e-8), far from W where l is near 0;
                # checked against that formula in float64, to fp32 rounding (2 roundings).
                w = before[key].double()
                if k == "bias":  # scaled by non-feedforward layers only
                    expect = w if m.is_feedforward else w * l.flatten() / (l.flatten() + 1e-8)
                else:
                    v = l.t() if m.is_conv1d else l
                    expect = w * v / (v + 1e-8)
                torch.testing.assert_close(after[f"{path}.base_layer.{k}"].double(), expect, rtol=2**-22, atol=1e-12)
    merged = peftcore.merge_and_unload(model)
    assert not any(isinstance(m, Ia3Layer) for m in merged.modules())
    assert rel_err(_logits(merged.eval(), inputs), want) <= RTOL


# ---------------------------------------------------------------------- AdaLoRA
def _adalora_config(**kw):
    base = dict(init_r=6, target_r=3, lora_alpha=8, total_step=20, init_lora_weights=True)
    return peft.AdaLoraConfig(**{**base, **kw})


def _allocate(pm, masks_by_module):
    """Give PEFT's model a rank pattern (as RankAllocator.mask_to_budget would): zero the
    masked E entries and store the pattern under PEFT's in-memory keys."""
    pattern = {}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_E.default" in n:
                path = n[len("base_model.model."):].rsplit(".lora_E.default", 1)[0]
                mask = masks_by_module(path, p.shape[0])
                p.masked_fill_(~torch.tensor(mask).unsqueeze(1), 0.0)
                pattern[f"{path}.lora_E.default"] = mask
    pm.peft_config["default"].rank_pattern = pattern


def _mixed_masks(path, r):
    # layer 0 q (GPT-2: c_attn): rank 0; layer 0's others: all kept; other layers: alternate.
    if ".0." in path and ("q_proj" in path or "c_attn" in path):
        return [False] * r
    if ".0." in path:
        return [True] * r
    return [i % 2 == 0 for i in range(r)]


ADALORA_CASES = [
    ("opt-fresh", "opt", dict(target_modules=["q_proj", "v_proj"]), None),
    ("opt-allocated", "opt", dict(target_modules=["q_proj", "v_proj"]), _mixed_masks),
    # lora_alpha <= 0: the scale is the rank, and PEFT takes the *pruned* rank after loading
    # (its update_layer at the new rank), so a reloaded adapter differs from the saved
    # model; peftcore gives what PEFT gives after loading the file.
    ("llama-allocated-alpha0", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=0), _mixed_masks),
    ("gpt2-conv1d-allocated", "gpt2", dict(target_modules=["c_attn"]), _mixed_masks),
    ("opt-bias-mts", "opt", dict(target_modules=["q_proj"], bias="lora_only", modules_to_save=["lm_head"]), _mixed_masks),
]


@pytest.mark.parametrize("case_id,arch,kw,masks", ADALORA_CASES, ids=[c[0] for c in ADALORA_CASES])
def test_adalora_peft_saved_loads_and_back(tmp_path, case_id, arch, kw, masks):
    edit = (lambda pm: _allocate(pm, masks)) if masks else None
    peft_dir, want, inputs = _peft_saved(tmp_path, arch, _adalora_config(**kw), edit=edit)
    model, ours = _round_trip(tmp_path, arch, peft_dir, None if kw.get("lora_alpha") == 0 else want, inputs)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA"
    assert cfg["rank_pattern"] == json.loads((peft_dir / "adapter_config.json").read_text())["rank_pattern"]
    for path, m in layers.items():
        assert float(m.ranknum["default"]) == 6.0  # init_r, after pruning too
        if masks:
            assert m.r["default"] == sum(masks(path, 6))
    if masks:
        assert any(m.r["default"] == 0 for m in layers.values())


def test_adalora_legacy_ranknum_keys(tmp_path):
    """Older PEFT saved ``<module>.ranknum``; PEFT loads it into ranknum, and so do we
    (here 4.0 instead of init_r, so the scale shows it)."""
    peft_dir, _, inputs = _peft_saved(tmp_path, "opt", _adalora_config(target_modules=["q_proj", "v_proj"]))
    sd = load_file(peft_dir / ST)
    for k in [k for k in sd if k.endswith(".lora_A")]:
        sd[k[: -len("lora_A")] + "ranknum"] = torch.tensor([4.0])
    save_file(sd, peft_dir / ST, metadata={"format": "pt"})
    base, _ = fresh_base("opt")
    pm = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    assert float(pm.base_model.model.model.decoder.layers[0].self_attn.q_proj.ranknum["default"]) == 4.0
    model, _ = fresh_base("opt")
    peftcore.load_adapter(model, peft_dir)
    assert rel_err(_logits(model.eval(), inputs), _logits(pm, inputs)) <= RTOL
    assert "ranknum" not in "".join(peftcore.get_adapter_state_dict(model))  # PEFT drops it on save


def test_adalora_new_adapter_matches_peft_init(tmp_path):
    """Same seed -> PEFT's initial weights (E = 0, A, B ~ N(0, 0.02), PEFT's draw order)."""
    cfg = dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])
    base, inputs = fresh_base("opt")
    torch.manual_seed(3)
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(**cfg))
    model, _ = fresh_base("opt")
    torch.manual_seed(3)
    peftcore.add_adapter(model, peftcore.AdaLoraConfig(**cfg))
    theirs = {k[len("base_model.model."):]: v for k, v in pm.named_parameters() if ".lora_" in k}
    ours = {k: v for k, v in model.named_parameters() if ".lora_" in k}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(ours)
    assert peftcore.get_nb_trainable_parameters(model) == pm.get_nb_trainable_parameters()


def test_adalora_merge_matches_peft(tmp_path):
    peft_dir, want, inputs = _peft_saved(tmp_path, "gpt2", _adalora_config(target_modules=["c_attn"]),
                                         edit=lambda pm: _allocate(pm, _mixed_masks))
    base, _ = fresh_base("gpt2")
    merged_peft = peft.PeftModel.from_pretrained(base, peft_dir).merge_and_unload()
    model, _ = fresh_base("gpt2")
    peftcore.load_adapter(model, peft_dir)
    merged = peftcore.merge_and_unload(model)
    theirs = merged_peft.state_dict()
    for k, v in merged.state_dict().items():
        # Same math; PEFT multiplies B·(A⊙E) by alpha and divides by ranknum + 1e-5 in two
        # steps where peftcore uses one factor: an fp32 ulp of the delta.
        torch.testing.assert_close(v, theirs[k], rtol=1e-6, atol=1e-6)
    assert rel_err(_logits(merged.eval(), inputs), want) <= RTOL


def test_adalora_bf16_base_matches_peft(tmp_path):
    peft_dir, _, inputs = _peft_saved(tmp_path, "llama", _adalora_config(target_modules=["q_proj", "v_proj", "down_proj"]),
                                      edit=lambda pm: _allocate(pm, _mixed_masks))
    base, _ = fresh_base("llama")
    pm = peft.PeftModel.from_pretrained(base.to(torch.bfloat16), peft_dir).eval()
    model, _ = fresh_base("llama")
    model = model.to(torch.bfloat16)
    peftcore.load_adapter(model, peft_dir)
    # As for LoRA on bf16 (test_peft_parity.test_bf16_base_matches_peft): fp32 summation
    # order inside the low-rank branch can move an activation by one bf16 rounding.
    assert rel_err(_logits(model.eval(), inputs), _logits(pm, inputs)) <= 2 * 2**-8


# ---------------------------------------------------------------------- rules and bad input
def test_methods_do_not_mix(tmp_path):
    model, inputs = fresh_base("opt")
    peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["q_proj"]), "lora")
    snap = model_snapshot(model)
    with pytest.raises(peftcore.UnsupportedAdapterError, match="share a method"):
        peftcore.add_adapter(model, peftcore.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "ia3")
    assert_unchanged(model, snap)
    peft_dir, _, _ = _peft_saved(tmp_path, "opt", _adalora_config(target_modules=["v_proj"]))
    with pytest.raises(peftcore.UnsupportedAdapterError, match="adapter_config.json.*share a method"):
        peftcore.load_adapter(model, peft_dir, "ada")
    assert_unchanged(model, snap)


def test_one_trainable_adalora_adapter():
    model, _ = fresh_base("opt")
    cfg = peftcore.AdaLoraConfig(init_r=2, total_step=5, target_modules=["q_proj"])
    peftcore.add_adapter(model, cfg, "a")
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterConfigError, match="only one AdaLoRA adapter can train"):
        peftcore.add_adapter(model, cfg, "b")
    assert_unchanged(model, snap)


def test_ia3_feedforward_conflict_refused():
    model, _ = fresh_base("opt")
    peftcore.add_adapter(model, peftcore.IA3Config(target_modules=["fc2"], feedforward_modules=["fc2"]), "a")
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterConfigError, match="fc2.*input.*non-feedforward"):
        peftcore.add_adapter(model, peftcore.IA3Config(target_modules=["fc2"], feedforward_modules=[]), "b")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("what,mutate,match", [
    ("ia3-shape", lambda sd: {k: (v.t() if k.endswith("k_proj.ia3_l") else v) for k, v in sd.items()}, "k_proj.*ia3_l of shape"),
    ("ia3-missing", lambda sd: {k: v for k, v in sd.items() if "layers.1.fc2" not in k}, "layers.1.fc2.*missing"),
    ("ia3-extra", lambda sd: {**sd, "base_model.model.model.decoder.layers.0.fc1.ia3_l": torch.ones(1, 4)}, "bind to nothing"),
])
def test_ia3_bad_files(tmp_path, what, mutate, match):
    peft_dir, _, _ = _peft_saved(tmp_path, "opt", peft.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]))
    save_file(mutate(load_file(peft_dir / ST)), peft_dir / ST, metadata={"format": "pt"})
    model, _ = fresh_base("opt")
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterWeightsError, match=match):
        peftcore.load_adapter(model, peft_dir)
    assert_unchanged(model, snap)


def test_adalora_bad_files(tmp_path):
    peft_dir, _, _ = _peft_saved(tmp_path, "opt", _adalora_config(target_modules=["q_proj"]),
                                 edit=lambda pm: _allocate(pm, lambda p, r: [True, False] * (r // 2)))
    sd = load_file(peft_dir / ST)
    k = next(k for k in sd if k.endswith("layers.1.self_attn.q_proj.lora_E"))
    sd[k] = sd[k][:2]  # E no longer matches A / B
    save_file(sd, peft_dir / ST, metadata={"format": "pt"})
    model, _ = fresh_base("opt")
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterWeightsError, match=r"layers\.1\.self_attn\.q_proj.*lora_E \(r, 1\)"):
        peftcore.load_adapter(model, peft_dir)
    assert_unchanged(model, snap)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["total_step"] = None
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(peftcore.AdapterConfigError, match="total_step"):
        peftcore.load_adapter(model, peft_dir)
    assert_unchanged(model, snap)


def test_configs_round_trip_through_peft(tmp_path):
    """Our configs are readable by PEFT and vice versa, with every PEFT field."""
    for ours, theirs in [
        (peftcore.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]),
         peft.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])),
        (peftcore.AdaLoraConfig(target_modules=["q_proj"], total_step=9, init_r=5),
         peft.AdaLoraConfig(target_modules=["q_proj"], total_step=9, init_r=5)),
    ]:
        d = json.loads(ours.to_json_string())
        td = theirs.to_dict()
        assert set(td) <= set(d), set(td) - set(d)
        ours.save_pretrained(tmp_path / ours.peft_type)
        back = peft.PeftConfig.from_pretrained(tmp_path / ours.peft_type)
        assert type(back) is type(theirs)
        theirs.save_pretrained(tmp_path / ("p" + ours.peft_type))
        assert type(peftcore.AdapterConfig.from_pretrained(tmp_path / ("p" + ours.peft_type))) is type(ours)
    with pytest.raises(peftcore.AdapterConfigError, match="subset"):
        peftcore.IA3Config(target_modules=["k_proj"], feedforward_modules=["fc2"])
    with pytest.raises(peftcore.AdapterConfigError, match="budgeting phase"):
        peftcore.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)


# ---------------------------------------------------------------------- bitsandbytes bases
Q_CASES = {
    "nf4-dq-fp32": (4, dict(quant_type="nf4", double_quant=True, compute_dtype=torch.float32)),
    "fp4-bf16": (4, dict(quant_type="fp4", double_quant=False, compute_dtype=torch.bfloat16)),
    "int8": (8, {}),
}
# Every quantized layer is targeted, so the exact oracle covers the whole model (layers
# left to bitsandbytes would carry its CPU rounding).
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q_METHODS = {
    "ia3": lambda: peft.IA3Config(init_ia3_weights=False, target_modules=LLAMA_LINEAR, feedforward_modules=["down_proj"]),
    "adalora": lambda: _adalora_config(target_modules=LLAMA_LINEAR),
}


def _peft_quant_adapter(tmp_path, model, config):
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    perturb_trainable(pm, 5)
    out = tmp_path / "qpeft"
    pm.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", list(Q_METHODS))
@pytest.mark.parametrize("qid", list(Q_CASES))
def test_quantized_bases(tmp_path, method, qid, monkeypatch):
    """IA3 / AdaLoRA on Linear4bit / Linear8bitLt: peftcore's fused quantized ops against the
    exact oracle (bitsandbytes' dequantized weight in nn.Linear + PEFT's adapter), and
    against PEFT on bitsandbytes' own kernels (their CPU rounding, see test_quantized.py)."""
    from tests._models import dequantized_copy, logits, peft_model, quantized_model, saved_tiny
    from tests.test_quantized import BNB4_RTOL, BNB8_RTOL

    bits, kw = Q_CASES[qid]
    model = quantized_model(saved_tiny(tmp_path), bits, **kw)
    oracle = dequantized_copy(model)
    ad = _peft_quant_adapter(tmp_path, model, Q_METHODS[method]())
    want_exact = logits(peft_model(oracle, {"default": str(ad)}))
    want_bnb = logits(peft_model(model, {"default": str(ad)}))
    peftcore.load_adapter(model, ad)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (Ia3Layer, AdaLoraLayer))}
    assert kinds == {f"{'Ia3' if method == 'ia3' else 'AdaLora'}Linear{'4bit' if bits == 4 else '8bit'}"}
    # The default (float32 x rounded to bf16, as bitsandbytes' CPU kernel rounds it in
    # inference) within bitsandbytes' tolerance; exact float32 products (the opt-in) against
    # the exact oracle. bf16 compute: an fp32 summation-order difference can flip x's bf16
    # rounding (2**-8).
    assert rel_err(logits(model), want_bnb) <= (BNB4_RTOL if bits == 4 else BNB8_RTOL)
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")
    got = logits(model)
    assert rel_err(got, want_exact) <= (2**-8 if kw.get("compute_dtype") == torch.bfloat16 else 1e-4)
    assert rel_err(got, want_bnb) <= (BNB4_RTOL if bits == 4 else BNB8_RTOL)
    ours = tmp_path / "ours"
    peftcore.save_pretrained(model, ours)
    a, b = load_file(ours / ST), load_file(ad / ST)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ia3_merge_on_4bit_requantizes_w_times_l(tmp_path):
    """PEFT cannot merge IA3 into bitsandbytes layers; peftcore re-quantizes W ⊙ l with the
    layer's settings (bit for bit what bitsandbytes makes of that weight)."""
    import bitsandbytes.functional as bf

    from tests._models import bnb_dense_weight, quantized_model, saved_tiny

    model = quantized_model(saved_tiny(tmp_path), 4, quant_type="nf4", double_quant=False)
    peftcore.add_adapter(model, peftcore.IA3Config(init_ia3_weights=False, target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Ia3Layer)}
    expect = {}
    for n, m in layers.items():
        w = bnb_dense_weight(m.base_layer) * m.ia3_l["default"].detach()
        qs = m.base_layer.weight.quant_state
        q, qs2 = bf.quantize_4bit(w, blocksize=qs.blocksize, quant_type=qs.quant_type, compress_statistics=False)
        expect[n] = bf.dequantize_4bit(q, qs2).float()
    peftcore.merge_adapter(model)
    for n, m in layers.items():
        assert torch.equal(bnb_dense_weight(m.base_layer), expect[n]), n


@pytest.mark.parametrize("config", [
    peftcore.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]),
    peftcore.AdaLoraConfig(init_r=2, total_step=5, target_modules=["q_proj"]),
], ids=["ia3", "adalora"])
def test_switch_delete_and_per_row_names_refused(config):
    """Disable / enable / delete restore the base exactly; per-row adapter_names (PEFT's mixed
    batch, which PEFT silently ignores for IA3) is refused rather than ignored."""
    model, inputs = fresh_base("opt")
    base = _logits(model, inputs)
    modules = {n: type(m) for n, m in model.named_modules()}
    peftcore.add_adapter(model, config, "lora_A")  # a name that is also a parameter dict's
    perturb_trainable(model)
    layer = next(m for m in model.modules() if isinstance(m, (Ia3Layer, AdaLoraLayer)))
    with pytest.raises(peftcore.PeftcoreError, match="adapter_names"):
        layer(torch.randn(2, layer.in_features), adapter_names=["lora_A", "__base__"])
    assert not torch.equal(_logits(model, inputs), base)
    with peftcore.adapters_disabled(model):
        assert torch.equal(_logits(model, inputs), base)
    peftcore.delete_adapter(model, "lora_A")
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert torch.equal(_logits(model, inputs), base)


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_from_pretrained_and_trainable_reload(tmp_path, method):
    """from_pretrained builds the base named in the adapter's config and loads the adapter
    (PEFT's logits); is_trainable=True makes exactly the adapter's tensors trainable."""
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    base, inputs = fresh_base("opt")
    base.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # PEFT saves its name_or_path as the base
    config = (peft.IA3Config(init_ia3_weights=False, target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])
              if method == "ia3" else _adalora_config(target_modules=["q_proj", "fc1"]))
    config.task_type = "CAUSAL_LM"
    pm = peft.get_peft_model(base, config)
    perturb_trainable(pm)
    pm.save_pretrained(tmp_path / "ad")
    want = _logits(pm.eval(), inputs)
    model = peftcore.from_pretrained(tmp_path / "ad", is_trainable=True)
    assert rel_err(_logits(model.eval(), inputs), want) <= RTOL
    suffixes = ("ia3_l",) if method == "ia3" else ("lora_A", "lora_B", "lora_E")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 2)[-2] in suffixes for n in trainable)
