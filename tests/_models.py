"""Shared tiny models, PEFT-made adapters and "model unchanged" checks for peftcore tests.

Everything here is offline and CPU-only: models are built from transformers configs with
random weights (seeded, so the same call always gives the same weights) and adapters are
written by PEFT itself, so they are a real oracle for peftcore's loader.

Typical use::

    from tests._models import tiny_opt, peft_adapter_dir, model_snapshot, assert_unchanged

    base = tiny_opt()
    d = peft_adapter_dir(tmp_path, base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model = tiny_opt()                      # same weights as ``base``
    snap = model_snapshot(model)
    with pytest.raises(peftcore.PeftcoreError):
        peftcore.load_adapter(model, bad_dir)
    assert_unchanged(model, snap)

Helpers:

* ``tiny_opt() / tiny_llama() / tiny_gpt2() / tiny_bert()``: 2-layer, hidden-size-32 models
  (vocab 100) with dropout off, in eval mode, identical for identical ``seed``.
* ``peft_adapter_dir(tmp_path, base_model, lora_config)``: a folder written by PEFT's
  ``save_pretrained`` for ``lora_config`` applied to a copy of ``base_model`` (the base model
  itself is not touched). By default every LoRA factor is filled with seeded random values so
  that the adapter really changes the outputs (PEFT's default init makes B zero).
* ``peft_model(base_model, {"a": dir_a, "b": dir_b})``: PEFT's ``PeftModel`` with those
  adapters loaded onto a copy of ``base_model`` (first one via ``from_pretrained``).
* ``logits(model, input_ids=None)``: eval-mode, no-grad output on a fixed input, without
  changing any module's ``training`` flag.
* ``model_snapshot(model)`` / ``assert_unchanged(model, snapshot)``: the module tree (names
  and types), every parameter and buffer (bitwise, dtype, device, ``requires_grad``), the
  ``training`` flags, ``peftcore.active_adapters``, the loaded adapter names and the logits.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
import torch.nn as nn

VOCAB = 100
#: The fixed input every helper uses: a batch of 2 sequences of 12 token ids in [1, VOCAB).
INPUT_IDS = (torch.arange(24).reshape(2, 12) * 7 % (VOCAB - 1) + 1).long()


# ---------------------------------------------------------------------- tiny models
def _seeded(build, seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build()
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def tiny_opt(seed: int = 0, **overrides) -> nn.Module:
    """``OPTForCausalLM``: q/k/v/out_proj, fc1, fc2 are nn.Linear with biases; lm_head tied."""
    from transformers import OPTConfig, OPTForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
              max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
              activation_dropout=0.0, layerdrop=0.0)
    kw.update(overrides)
    return _seeded(lambda: OPTForCausalLM(OPTConfig(**kw)), seed)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """``LlamaForCausalLM`` with GQA (4 heads, 2 kv heads); bias-free Linear layers; untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    kw.update(overrides)
    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(**kw)), seed)


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    """``GPT2LMHeadModel``: attention/MLP are transformers ``Conv1D`` (weight stored (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return _seeded(lambda: GPT2LMHeadModel(GPT2Config(**kw)), seed)


def tiny_bert(seed: int = 0, num_labels: int = 2, **overrides) -> nn.Module:
    """``BertForSequenceClassification`` (query/key/value Linear, ``classifier`` head)."""
    from transformers import BertConfig, BertForSequenceClassification

    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              num_labels=num_labels)
    kw.update(overrides)
    return _seeded(lambda: BertForSequenceClassification(BertConfig(**kw)), seed)


# ---------------------------------------------------------------------- PEFT oracles
def _randomize_lora(peft_model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Fill every LoRA factor with seeded N(0, std^2) values (deterministic order: named_parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def peft_adapter_dir(tmp_path, base_model: nn.Module, lora_config, *, name: Optional[str] = None,
                     randomize: bool = True, seed: int = 1234) -> str:
    """Save a PEFT LoRA adapter for ``base_model`` and return the folder that holds
    ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``base_model`` is deep-copied first (``get_peft_model`` modifies its model in place).
    With ``randomize`` every LoRA factor gets seeded random values, so the adapter changes
    the outputs. ``name`` is the sub-folder of ``tmp_path`` (default: a fresh ``adapter_<n>``).
    Modules in ``modules_to_save`` and biases are saved as PEFT saves them (unchanged
    unless the caller edits the files)."""
    import peft

    tmp_path = os.fspath(tmp_path)
    if name is None:
        i = 0
        while os.path.exists(os.path.join(tmp_path, f"adapter_{i}")):
            i += 1
        name = f"adapter_{i}"
    out = os.path.join(tmp_path, name)
    pm = peft.get_peft_model(copy.deepcopy(base_model), copy.deepcopy(lora_config))
    if randomize:
        _randomize_lora(pm, seed)
    pm.save_pretrained(out)
    return out


def peft_model(base_model: nn.Module, adapter_dirs: dict, *, is_trainable: bool = False) -> nn.Module:
    """PEFT's ``PeftModel`` on a deep copy of ``base_model`` with ``{name: dir}`` loaded in
    order (the first through ``PeftModel.from_pretrained``). PEFT leaves the first one active."""
    import peft

    items = list(adapter_dirs.items())
    name0, dir0 = items[0]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), dir0, adapter_name=name0, is_trainable=is_trainable)
    for n, d in items[1:]:
        pm.load_adapter(d, adapter_name=n, is_trainable=is_trainable)
    return pm.eval()


#: One PEFT config per method for tiny_llama-shaped models (q / v / down projections; IA3
#: scales down_proj's input), as factories: PEFT objects are mutable.
LLAMA_METHOD_CONFIGS = {
    "lora": lambda: __import__("peft").LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  lora_dropout=0.0),
    "adalora": lambda: __import__("peft").AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, total_step=10,
                                                        target_modules=["q_proj", "v_proj", "down_proj"]),
    "ia3": lambda: __import__("peft").IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"], init_ia3_weights=False),
}


# ---------------------------------------------------------------------- outputs
def canon_name(name: str) -> str:
    """A parameter name in a form shared by PEFT and peftcore: no PeftModel prefix, no
    wrapper infixes, no adapter name, no trailing '.weight' of LoRA factors."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for a, b in ((".base_layer.", "."), (".original_module.", "."), (".modules_to_save.default.", ".copy."),
                 (".default.weight", ""), (".default", "")):
        name = name.replace(a, b)
    return name


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    return out[0]


def logits(model: nn.Module, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output of ``model`` on ``input_ids`` (default ``INPUT_IDS``) in eval mode and no_grad.
    Every module's ``training`` flag is restored afterwards."""
    x = INPUT_IDS if input_ids is None else input_ids
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return _main_output(model(x)).detach().clone()
    finally:
        for m, f in flags:
            m.training = f


# ---------------------------------------------------------------------- snapshots
def _adapter_names(model: nn.Module) -> Optional[list]:
    """Names of the adapters peftcore holds for ``model`` (None when none were ever added)."""
    from peftcore.state import get_state

    st = get_state(model)
    return None if st is None else sorted(st.configs)


def model_snapshot(model: nn.Module, input_ids: Optional[torch.Tensor] = None) -> dict:
    """Everything ``assert_unchanged`` compares, copied (later in-place changes do not leak in)."""
    import peftcore

    return {
        "modules": [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "training": [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": {k: (p.detach().clone(), p.requires_grad)
                   for k, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {k: b.detach().clone() for k, b in model.named_buffers(remove_duplicate=False)},
        "active": list(peftcore.active_adapters(model)),
        "adapters": _adapter_names(model),
        "input_ids": input_ids,
        "logits": logits(model, input_ids),
    }


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a, b)


def assert_unchanged(model: nn.Module, snapshot: dict) -> None:
    """Assert ``model`` is exactly as when ``snapshot`` was taken: same module tree (names
    and types), bitwise-equal parameters/buffers/state_dict with the same ``requires_grad``,
    same ``training`` flags, same active and loaded adapters, bitwise-equal logits."""
    import peftcore

    now = model_snapshot(model, snapshot["input_ids"])
    assert now["modules"] == snapshot["modules"], _diff("module tree", snapshot["modules"], now["modules"])
    assert now["training"] == snapshot["training"], "training/eval flags changed"
    for key in ("state_dict", "buffers"):
        assert list(now[key]) == list(snapshot[key]), _diff(key + " keys", list(snapshot[key]), list(now[key]))
        changed = [k for k in now[key] if not _same_tensor(now[key][k], snapshot[key][k])]
        assert not changed, f"{key} tensors changed: {changed[:10]}"
    assert list(now["params"]) == list(snapshot["params"]), _diff(
        "parameter names", list(snapshot["params"]), list(now["params"]))
    changed = [k for k, (t, rg) in now["params"].items()
               if not _same_tensor(t, snapshot["params"][k][0]) or rg != snapshot["params"][k][1]]
    assert not changed, f"parameters (values or requires_grad) changed: {changed[:10]}"
    assert peftcore.active_adapters(model) == snapshot["active"], (
        f"active adapters changed: {snapshot['active']} -> {peftcore.active_adapters(model)}")
    assert now["adapters"] == snapshot["adapters"], f"loaded adapters changed: {snapshot['adapters']} -> {now['adapters']}"
    assert _same_tensor(now["logits"], snapshot["logits"]), (
        f"logits changed (max abs diff {(now['logits'] - snapshot['logits']).abs().max().item():g})")


def _diff(what: str, before: list, after: list) -> str:
    b, a = set(map(str, before)), set(map(str, after))
    return f"{what} changed: removed {sorted(b - a)[:8]}, added {sorted(a - b)[:8]}"


# ---------------------------------------------------------------------- differential-test bases
ARCHS = {
    "opt": dict(build=tiny_opt, attn=["q_proj", "v_proj"]),
    "llama": dict(build=tiny_llama, attn=["q_proj", "v_proj"]),
    "gpt2": dict(build=tiny_gpt2, attn=["c_attn"]),
    "bert": dict(build=lambda: tiny_bert(num_labels=3), attn=["query", "value"]),
}


def fresh_base(arch: str):
    """(model, inputs) of architecture ``arch``: the same weights and inputs on every call,
    with random non-zero biases so that bias handling shows in the outputs."""
    model = ARCHS[arch]["build"]()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, {"input_ids": INPUT_IDS, "attention_mask": torch.ones_like(INPUT_IDS)}


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int = 0) -> None:
    """Give every trainable tensor (LoRA factors, trained biases, modules_to_save copies)
    a seeded random offset, so that each of them shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------- bitsandbytes-quantized bases
#: Sizes of the quantized tiny models. bitsandbytes' CPU path needs in_features to be a
#: multiple of the blocksize and out_features a multiple of 32 (its packed CPU layout;
#: smaller layers crash in bitsandbytes' first eval forward), so these are 4x tiny_*.
QUANT_SIZES = {
    "llama": dict(hidden_size=128, intermediate_size=256),
    "opt": dict(hidden_size=128, ffn_dim=256, word_embed_proj_dim=128),
}


def saved_tiny(tmp_path, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Save ``tiny_<arch>(seed, **QUANT_SIZES[arch], **overrides)`` (fp32) to ``tmp_path/base_<arch>``
    (once) and return the folder, for ``quantized_model`` / ``from_pretrained``."""
    out = os.path.join(os.fspath(tmp_path), f"base_{arch}_{seed}")
    if not os.path.exists(os.path.join(out, "config.json")):
        build = {"llama": tiny_llama, "opt": tiny_opt}[arch]
        build(seed, **{**QUANT_SIZES[arch], **overrides}).save_pretrained(out)
    return out


def quantized_model(model_dir: str, bits: int = 4, *, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype=torch.float32, torch_dtype=None, threshold: float = 6.0,
                    quant_storage=torch.uint8):
    """The model in ``model_dir`` loaded by transformers with bitsandbytes quantization on
    CPU (``device_map="cpu"``), in eval mode.

    bits=4: ``Linear4bit`` (quant_type, double quant, compute dtype); transformers always
    uses blocksize 64, so another ``blocksize`` re-quantizes every Linear4bit from the
    checkpoint's fp32 weights with it; ``quant_storage`` is the packed bytes' storage dtype. bits=8: ``Linear8bitLt`` (``threshold``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 8:
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_quant_storage=quant_storage)
    kw = {} if torch_dtype is None else {"dtype": torch_dtype}
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, device_map="cpu", **kw)
    if bits == 4 and blocksize != 64:
        import bitsandbytes as bnb

        dense = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = dense[name + ".weight"].to(m.weight.quant_state.dtype)
                p = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
                                      quant_type=quant_type, quant_storage=m.weight.quant_storage, module=m)
                m.weight = p.to("cpu")  # bitsandbytes quantizes on .to(device)
    return model.eval()


class DequantLinear(nn.Linear):
    """Oracle for a bitsandbytes layer: nn.Linear holding bitsandbytes' own dequantization
    of the layer's weight (float32), optionally rounding x to ``round_to`` first (what
    Linear4bit does with a narrower ``compute_dtype``)."""

    round_to = None

    def forward(self, x):
        if self.round_to is not None and self.round_to != x.dtype:
            x = x.to(self.round_to).to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def bnb_dense_weight(layer: nn.Module) -> torch.Tensor:
    """bitsandbytes' dequantization (float32) of a Linear4bit / Linear8bitLt weight, read in
    its standard layout (a packed CPU layout is read through bitsandbytes' dequantizer of
    a deep copy after bitsandbytes' own inverse conversion)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    if isinstance(layer, bnb.nn.Linear4bit):
        w = layer.weight
        qs = w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("weight is in bitsandbytes' packed CPU layout; read it before a bnb forward")
        return bf.dequantize_4bit(w.data, qs).float()
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    return bf.int8_vectorwise_dequant(layer.weight.data, scb).float()


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a bitsandbytes-quantized model whose Linear4bit / Linear8bitLt layers
    are ``DequantLinear`` with bitsandbytes' dequantized weight: the exact oracle peftcore's
    quantized kernels are specified against. The model's ``is_loaded_in_*`` flags are
    dropped so that PEFT treats the copies as plain nn.Linear."""
    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        out.__dict__.pop(flag, None)
    for name, m in list(out.named_modules()):
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            lin = DequantLinear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight = nn.Parameter(bnb_dense_weight(m), requires_grad=False)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
            cdt = getattr(m, "compute_dtype", None)
            if isinstance(m, bnb.nn.Linear4bit) and cdt is not None:
                lin.round_to = cdt
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, lin)
    return out.eval()
