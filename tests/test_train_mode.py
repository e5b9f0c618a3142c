"""Training mode after every entry point (issue 22): no LoRA dropout at inference.

The rules (README, "Training mode"):
* every layer peftcore creates or wraps (adapter layers, ``modules_to_save`` wrappers)
  takes the training mode of the module it replaces;
* ``load_adapter`` / ``from_pretrained`` with ``is_trainable=False`` (the default) leave
  the model in eval mode, as PEFT and transformers do; ``is_trainable=True``,
  ``add_adapter``, ``hotswap_adapter`` and ``add_weighted_adapter`` keep the user's mode.

Every adapter here has ``lora_dropout`` > 0 (IA3 has no dropout; its layers' flags are
still checked). After each entry point, on an eval model, two calls under ``no_grad``
must be bit-identical and equal PEFT's ``PeftModel.from_pretrained`` of the same adapter
(on bitsandbytes bases: PEFT on ``dequantized_copy``, the exact oracle of
tests/test_quantized.py); ``model.train()`` must then turn dropout on and
``model.eval()`` off again. The helpers' ``logits()`` and ``peft_model()`` call
``.eval()`` themselves, which is how this bug went unseen: they are not used here.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peft  # noqa: E402

import peftcore  # noqa: E402
from peftcore.layers import AdapterLayer, ModulesToSaveWrapper  # noqa: E402
from tests._models import (  # noqa: E402
    INPUT_IDS,
    assert_unchanged,
    dequantized_copy,
    fresh_base,
    model_snapshot,
    perturb_trainable,
    quantized_model,
    rel_err,
    saved_tiny,
)

DROPOUT = 0.3
# fp32 logits against PEFT, the contract of tests/test_peft_parity.py (summation order
# differs between the fused kernels and PEFT's separate matmuls).
RTOL = 1e-4

# Every quantized layer is adapted, so that PEFT on the dequantized copy is an exact
# oracle for the whole model (a layer left to bitsandbytes rounds x on the CPU).
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# base kind -> (targets, IA3 feedforward modules, modules_to_save)
BASES = {
    "linear": (["q_proj", "v_proj", "fc1"], ["fc1"], ["fc2"]),  # OPT: nn.Linear
    "conv1d": (["c_attn", "c_fc"], ["c_fc"], None),  # GPT-2: transformers Conv1D
    "embedding": (["embed_tokens", "q_proj"], None, None),  # Llama: LoRA on nn.Embedding too
    "nf4": (LLAMA_LINEAR, ["down_proj"], None),  # bitsandbytes Linear4bit
    "int8": (LLAMA_LINEAR, ["down_proj"], None),  # bitsandbytes Linear8bitLt
}
# PEFT supports LoRA only on embeddings.
CASES = [(m, b) for m in ("lora", "adalora", "ia3") for b in BASES if b != "embedding" or m == "lora"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(autouse=True)
def _exact_float32(monkeypatch):
    # Whole-model float32 logits against PEFT on the dequantized copy (an exact oracle):
    # exact float32 products on the quantized bases (PEFTCORE_QUANT_FP32=exact; the default
    # rounds float32 x to bf16, as bitsandbytes' CPU kernel does in inference, and is held
    # to bitsandbytes' tolerance in tests/test_quantized.py and to its bounds op by op).
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")


def _peft_config(method: str, base: str, **changes):
    targets, ff, mts = BASES[base]
    kw = dict(target_modules=targets, modules_to_save=mts)
    if method == "lora":
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=DROPOUT, **kw)
    elif method == "adalora":
        cfg = peft.AdaLoraConfig(init_r=4, total_step=10, lora_alpha=8, lora_dropout=DROPOUT, **kw)
    else:
        cfg = peft.IA3Config(feedforward_modules=ff, **kw)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _new_base(base: str, tmp_path):
    """(model in eval mode, inputs, PEFT's base for the oracle: a float copy)."""
    if base in ("nf4", "int8"):
        q = quantized_model(saved_tiny(tmp_path), 4 if base == "nf4" else 8)
        return q, {"input_ids": INPUT_IDS}, dequantized_copy(q)
    model, inputs = fresh_base({"linear": "opt", "conv1d": "gpt2", "embedding": "llama"}[base])
    return model, inputs, copy.deepcopy(model)


def _peft_dir(tmp_path, name, oracle_base, config, seed):
    """A PEFT-saved adapter with every trainable tensor random (so each one shows)."""
    pm = peft.get_peft_model(copy.deepcopy(oracle_base), config)
    perturb_trainable(pm, seed)
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def _out(model, inputs):
    """One call, as a user makes it: no_grad, and no change of any training flag."""
    with torch.no_grad():
        return model(**inputs).logits


def _peft_out(oracle_base, adapter_dir, inputs):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(oracle_base), adapter_dir)
    assert not any(m.training for m in pm.modules())  # PEFT's own rule, which we follow
    return _out(pm, inputs)


def _modes(model):
    return {n for n, m in model.named_modules() if m.training}


def _check_inference(model, inputs, want, *, dropout: bool):
    """Eval everywhere, deterministic, equal to ``want``; train() turns dropout on, eval() off."""
    assert not _modes(model), f"modules left in training mode: {sorted(_modes(model))[:6]}"
    first = _out(model, inputs)
    assert torch.equal(first, _out(model, inputs)), "two eval calls differ: dropout ran"
    assert rel_err(first, want) <= RTOL
    model.train()
    assert all(m.training for m in model.modules())
    if dropout:
        assert not torch.equal(_out(model, inputs), _out(model, inputs)), "train() did not turn dropout on"
    model.eval()
    assert torch.equal(_out(model, inputs), first)


@pytest.mark.parametrize("start", ["eval", "train"])
@pytest.mark.parametrize("method,base", CASES)
def test_load_adapter_for_inference_is_eval(tmp_path, method, base, start):
    model, inputs, oracle = _new_base(base, tmp_path)
    d = _peft_dir(tmp_path, "a", oracle, _peft_config(method, base), seed=1)
    model.train(start == "train")
    peftcore.load_adapter(model, d)
    assert any(isinstance(m, AdapterLayer) for m in model.modules())
    if BASES[base][2]:
        assert any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())
    _check_inference(model, inputs, _peft_out(oracle, d, inputs), dropout=method != "ia3")


@pytest.mark.parametrize("start", ["eval", "train"])
def test_trainable_load_keeps_the_users_mode(tmp_path, start):
    model, inputs, oracle = _new_base("linear", tmp_path)
    d = _peft_dir(tmp_path, "a", oracle, _peft_config("lora", "linear"), seed=1)
    model.train(start == "train")
    peftcore.load_adapter(model, d, is_trainable=True)
    assert all(m.training == (start == "train") for m in model.modules())
    if start == "eval":
        assert torch.equal(_out(model, inputs), _out(model, inputs))


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_from_pretrained_is_eval(tmp_path, method):
    base, inputs, _ = _new_base("linear", tmp_path)
    base_dir = tmp_path / "tiny-opt"
    base.save_pretrained(base_dir)
    oracle = type(base).from_pretrained(base_dir)  # what both loaders start from
    d = _peft_dir(tmp_path, "a", oracle, _peft_config(method, "linear"), seed=1)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = peftcore.from_pretrained(str(d))
    _check_inference(model, inputs, _peft_out(oracle, d, inputs), dropout=method != "ia3")


@pytest.mark.parametrize("start", ["eval", "train"])
@pytest.mark.parametrize("method,base", [c for c in CASES if c[1] in ("linear", "nf4", "embedding")])
def test_add_adapter_keeps_the_models_mode(tmp_path, method, base, start):
    model, inputs, oracle = _new_base(base, tmp_path)
    _peft_config(method, base).save_pretrained(tmp_path / "config")
    config = peftcore.AdapterConfig.from_pretrained(tmp_path / "config")
    model.train(start == "train")
    peftcore.add_adapter(model, config)
    assert all(m.training == (start == "train") for m in model.modules())
    if start == "train":
        return
    perturb_trainable(model, seed=3)  # PEFT's init leaves the output unchanged: make the adapter show
    peftcore.save_pretrained(model, tmp_path / "ours")
    _check_inference(model, inputs, _peft_out(oracle, tmp_path / "ours", inputs), dropout=method != "ia3")


def test_new_layers_take_the_mode_of_the_module_they_replace(tmp_path):
    model, _, _ = _new_base("linear", tmp_path)
    attn = model.model.decoder.layers[0].self_attn
    attn.q_proj.train()  # one training module inside an eval model
    model.model.decoder.layers[1].fc2.train()
    peftcore.add_adapter(model, peftcore.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=DROPOUT,
                                                    modules_to_save=["fc2"]))
    want = {"model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.fc2"}
    # the new layer, its containers and the base it wraps; the wrapper, its dict, the original and the copy
    assert _modes(model) == {n for n, _ in model.named_modules() if any(n.startswith(w) for w in want)}
    assert attn.q_proj.training and attn.q_proj.base_layer.training and not attn.v_proj.training


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_hotswap_keeps_eval(tmp_path, method):
    model, inputs, oracle = _new_base("linear", tmp_path)
    a = _peft_dir(tmp_path, "a", oracle, _peft_config(method, "linear", modules_to_save=None), seed=1)
    b = _peft_dir(tmp_path, "b", oracle, _peft_config(method, "linear", modules_to_save=None), seed=2)
    peftcore.load_adapter(model, a)
    peftcore.hotswap_adapter(model, b, "default")
    _check_inference(model, inputs, _peft_out(oracle, b, inputs), dropout=method != "ia3")


@pytest.mark.parametrize("method", ["lora", "ia3"])  # AdaLoRA adapters are not combined (as in PEFT)
def test_add_weighted_adapter_keeps_eval(tmp_path, method):
    model, inputs, oracle = _new_base("linear", tmp_path)
    for name, seed in (("a", 1), ("b", 2)):
        d = _peft_dir(tmp_path, name, oracle, _peft_config(method, "linear", modules_to_save=None), seed=seed)
        peftcore.load_adapter(model, d, adapter_name=name)
    kw = {} if method == "ia3" else {"combination_type": "cat"}
    peftcore.add_weighted_adapter(model, ["a", "b"], [0.7, 0.4], "mix", **kw)
    peftcore.set_adapter(model, "mix")
    peftcore.save_pretrained(model, tmp_path / "ours", adapter_names=["mix"])
    _check_inference(model, inputs, _peft_out(oracle, tmp_path / "ours" / "mix", inputs), dropout=method != "ia3")


@pytest.mark.parametrize("method,base", [c for c in CASES if c[1] in ("linear", "nf4", "int8")])
def test_mixed_batch_after_load_is_deterministic(tmp_path, method, base):
    model, inputs, oracle = _new_base(base, tmp_path)
    dirs = {n: _peft_dir(tmp_path, n, oracle, _peft_config(method, base, modules_to_save=None), seed=s)
            for n, s in (("a", 1), ("b", 2))}
    for n, d in dirs.items():
        peftcore.load_adapter(model, d, adapter_name=n)
    assert not _modes(model)  # no model.eval() needed before mixed_batch
    with peftcore.mixed_batch(model, ["b", "a"]):
        first = _out(model, inputs)
        assert torch.equal(first, _out(model, inputs))
    for row, n in enumerate(["b", "a"]):
        want = _peft_out(oracle, dirs[n], inputs)[row]
        assert rel_err(first[row], want) <= RTOL, n


def test_failed_load_keeps_training_mode(tmp_path):
    model, _, oracle = _new_base("linear", tmp_path)
    d = _peft_dir(tmp_path, "a", oracle, _peft_config("lora", "linear"), seed=1)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]  # the file's v_proj / fc1 tensors now bind to nothing
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model.train()
    snap = model_snapshot(model)
    with pytest.raises(peftcore.AdapterWeightsError, match="bind to nothing"):
        peftcore.load_adapter(model, d)
    assert_unchanged(model, snap)  # training flags included
