"""Which modules an adapter config targets, with PEFT's matching rules, and the wrappers
that carry adapters. Nothing here changes the model: callers commit the plan."""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from .config import LoraConfig
from .errors import AdapterConfigError, UnsupportedAdapterError
from .layers import (
    Conv1D,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    LoraLinear4bit,
    LoraLinear8bit,
    ModulesToSaveWrapper,
    bnb_kind,
    int8_state,
)

# PEFT's defaults for target_modules=None, per transformers model_type (LoRA).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

_INTERNAL_CHILDREN = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def adapter_modules(model: nn.Module):
    """(name, module) for modules an adapter may target: peftcore's own wrappers count
    as the module they wrap, and their internals are skipped."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            skip.append(name + ".")
        yield name, module


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear: PEFT's "all-linear" takes them too.
    return isinstance(_base(module), nn.Linear) or (bool(Conv1D) and isinstance(_base(module), Conv1D))


def resolve_target_modules(model: nn.Module, config: LoraConfig):
    """The effective ``target_modules``: the per-architecture default for None, and the
    full module names for ``"all-linear"`` (PEFT leaves out the output head)."""
    tm = config.target_modules
    if tm is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in DEFAULT_TARGETS:
            raise AdapterConfigError(
                f"target_modules is not set and peftcore knows no default for model_type={mt!r}; "
                "name the modules to adapt"
            )
        return list(DEFAULT_TARGETS[mt])
    if isinstance(tm, str) and tm.lower() == "all-linear":
        names = {n for n, m in adapter_modules(model) if n and _is_linear(m)}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            names -= {n for n, m in model.named_modules() if m is head or (isinstance(m, LoraLayer) and m.base_layer is head)}
        elif config.task_type == "SEQ_CLS":
            for h in ("classifier", "score"):
                if isinstance(getattr(model, h, None), nn.Module):
                    names.discard(h)
                    break
        return sorted(names)
    return tm


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    idxs = config.layers_to_transform
    if idxs is None or (isinstance(idxs, list) and not idxs):
        return True
    pats = config.layers_pattern
    match = None
    if not pats:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pats] if isinstance(pats, str) else pats:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    i = int(match.group("idx"))
    return i == idxs if isinstance(idxs, int) else i in idxs


def is_target(config: LoraConfig, targets, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a resolved target list / regex."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return False
        elif key in ex or any(key.endswith("." + e) for e in ex):
            return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    return any(key.endswith("." + t) for t in targets) and _layer_index_ok(config, key)


def find_targets(model: nn.Module, config: LoraConfig) -> tuple[list[str], list[tuple[str, nn.Module]]]:
    """Resolved target_modules and the (name, module) pairs they select.

    Raises if nothing matches, or a matched module is of a type peftcore cannot adapt."""
    targets = resolve_target_modules(model, config)
    found = [(n, m) for n, m in adapter_modules(model) if n and is_target(config, targets, n)]
    if not found:
        raise AdapterConfigError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
        )
    for n, m in found:
        if isinstance(m, ModulesToSaveWrapper):
            raise AdapterConfigError(f"module {n!r} is a modules_to_save module of another adapter; it cannot also get LoRA")
        b = _base(m)
        if not (_is_linear(m) or isinstance(b, nn.Embedding)):
            raise UnsupportedAdapterError(
                f"module {n!r} is a {type(b).__name__}; peftcore's LoRA supports nn.Linear, "
                "transformers Conv1D and nn.Embedding"
            )
        w = getattr(b, "weight", None)
        kind = bnb_kind(b)
        if kind is not None:
            check_quantized(n, b, kind)
        elif w is not None and not w.is_floating_point():
            raise UnsupportedAdapterError(
                f"module {n!r} is a {type(b).__module__}.{type(b).__name__} with a {w.dtype} weight; peftcore "
                "adapts floating-point layers and bitsandbytes Linear4bit / Linear8bitLt only"
            )
        if isinstance(b, nn.Embedding) and (b.max_norm is not None or b.sparse or hasattr(b, "embed_scale")):
            raise UnsupportedAdapterError(
                f"module {n!r}: embeddings with max_norm, sparse gradients or embed_scale are not supported"
            )
    return targets, found


def quantized_device(b: nn.Module) -> torch.device:
    """Where a bitsandbytes layer's quantized weight lives (a hook the tests patch to fake CUDA)."""
    return b.weight.device


def check_quantized(name: str, b: nn.Module, kind: str) -> None:
    """Refuse a bitsandbytes layer peftcore cannot run (the model is not touched)."""
    where = f"module {name!r} ({type(b).__name__})"
    if kind == "other":
        raise UnsupportedAdapterError(
            f"{where} is a bitsandbytes {type(b).__name__}; peftcore adapts bitsandbytes Linear4bit and "
            "Linear8bitLt only (not quantized embeddings or other bitsandbytes modules)"
        )
    w = b.weight
    dev = quantized_device(b)
    if dev.type != "cpu":
        raise UnsupportedAdapterError(
            f"{where} is quantized and on device {dev}; peftcore's quantized kernels run on CPU only "
            "(no CUDA kernel yet). Load the base with device_map='cpu'"
        )
    if kind == "4bit":
        qs = getattr(w, "quant_state", None)
        if qs is None or not getattr(w, "bnb_quantized", True):
            raise UnsupportedAdapterError(
                f"{where}: the Params4bit weight is not quantized yet (no quant_state); move the layer to its "
                "device (bitsandbytes quantizes on .to(device)) before adding adapters"
            )
        if qs.quant_type not in ("nf4", "fp4"):
            raise UnsupportedAdapterError(f"{where}: quant_type {qs.quant_type!r} is not supported (nf4 and fp4 are)")
        if len(qs.shape) != 2 or tuple(qs.shape) != (b.out_features, b.in_features):
            raise UnsupportedAdapterError(
                f"{where}: quantized shape {tuple(qs.shape)} does not match ({b.out_features}, {b.in_features})"
            )
    else:
        if getattr(b.state, "has_fp16_weights", False):
            raise UnsupportedAdapterError(
                f"{where} has has_fp16_weights=True: its weights are not int8-quantized (bitsandbytes' mixed "
                "training mode); peftcore adapts Linear8bitLt with has_fp16_weights=False only"
            )
        cb, scb = int8_state(b)
        if cb.dtype != torch.int8 or scb is None or tuple(cb.shape) != (b.out_features, b.in_features):
            raise UnsupportedAdapterError(
                f"{where}: the weight is not quantized yet (weight dtype {cb.dtype}, SCB "
                f"{'missing' if scb is None else 'present'}); move the layer to its device first"
            )


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a targetable base module."""
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if bnb_kind(base) in ("4bit", "8bit"):  # the weight is packed: trust the module's sizes
        return base.in_features, base.out_features
    w = base.weight
    if Conv1D and isinstance(base, Conv1D):
        return w.shape[0], w.shape[1]
    return w.shape[1], w.shape[0]


def new_wrapper(module: nn.Module, device: torch.device) -> LoraLayer:
    """The LoRA layer that will carry adapters for a plain base module (its scale
    tensor on ``device``, the base weight's)."""
    kind = bnb_kind(module)
    if kind == "4bit":
        layer = LoraLinear4bit(module)
    elif kind == "8bit":
        layer = LoraLinear8bit(module)
    else:
        layer = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
    if device.type != "cpu":
        layer._buffers["lora_scales"] = layer.lora_scales.to(device)
    return layer


def find_modules_to_save(model: nn.Module, names: Optional[list[str]]) -> list[tuple[str, nn.Module]]:
    """Modules whose name ends with an entry of ``modules_to_save`` (PEFT: plain endswith)."""
    if not names:
        return []
    out = []
    for n, m in adapter_modules(model):
        if n and any(n.endswith(k) for k in names):
            if isinstance(m, LoraLayer):
                raise AdapterConfigError(f"modules_to_save entry matches {n!r}, which already carries LoRA adapters")
            out.append((n, m))
    # Nested matches (a parent and its child both matching) keep the outermost.
    out = [(n, m) for n, m in out if not any(n.startswith(o + ".") for o, _ in out)]
    return out


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
