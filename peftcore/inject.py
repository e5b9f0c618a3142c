"""Which modules an adapter config targets, with PEFT's matching rules, and the wrappers
that carry adapters. Nothing here changes the model: callers commit the plan."""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from ._ops import OPS
from .config import AdapterConfig
from .errors import AdapterConfigError, UnsupportedAdapterError
from .layers import (
    BASE_KINDS,
    AdapterLayer,
    Conv1D,
    ModulesToSaveWrapper,
    bnb_kind,
    follow_mode,
    int8_state,
    module_shape,
)



def adapter_modules(model: nn.Module):
    """(name, module) for modules an adapter may target: peftcore's own wrappers count
    as the module they wrap, and their internals are skipped."""
    # named_modules walks depth first, so a wrapper's internals follow it directly: only
    # the last wrapper's prefix needs checking (a list of all of them made this quadratic).
    skip = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            skip = name + "."
        yield name, module


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear: PEFT's "all-linear" takes them too.
    return isinstance(_base(module), nn.Linear) or (bool(Conv1D) and isinstance(_base(module), Conv1D))


def model_type(model: nn.Module):
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_target_modules(model: nn.Module, config: AdapterConfig, method):
    """The effective ``target_modules``: the per-architecture default of the method
    (``method.default_targets``) for None, and the full module names for ``"all-linear"``
    (PEFT leaves out the output head)."""
    tm = config.target_modules
    if tm is None:
        mt = model_type(model)
        defaults = method.default_targets
        if mt not in defaults:
            raise AdapterConfigError(
                f"target_modules is not set and peftcore knows no {config.peft_type} default for "
                f"model_type={mt!r}; name the modules to adapt"
            )
        return list(defaults[mt])
    if isinstance(tm, str) and tm.lower() == "all-linear":
        names = {n for n, m in adapter_modules(model) if n and _is_linear(m)}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            names -= {n for n, m in model.named_modules() if m is head or (isinstance(m, AdapterLayer) and m.base_layer is head)}
        elif config.task_type == "SEQ_CLS":
            for h in ("classifier", "score"):
                if isinstance(getattr(model, h, None), nn.Module):
                    names.discard(h)
                    break
        return sorted(names)
    return tm


def is_feedforward(feedforward, key: str) -> bool:
    """PEFT's rule: a regex string is a full match; a list entry is a plain ``endswith``."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, key) is not None
    return any(key.endswith(t) for t in feedforward)


def _layer_index_ok(config: AdapterConfig, key: str) -> bool:
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


def is_target(config: AdapterConfig, targets, key: str) -> bool:
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


def find_targets(model: nn.Module, config: AdapterConfig, method) -> tuple[list[str], list[tuple[str, nn.Module]]]:
    """Resolved target_modules and the (name, module) pairs they select, for ``method``
    (a ``methods.Method``: its default targets, whether it adapts embeddings).

    Raises if nothing matches, or a matched module is of a type peftcore cannot adapt."""
    targets = resolve_target_modules(model, config, method)
    found = [(n, m) for n, m in adapter_modules(model) if n and is_target(config, targets, n)]
    if not found:
        raise AdapterConfigError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
        )
    for n, m in found:
        if isinstance(m, ModulesToSaveWrapper):
            raise AdapterConfigError(
                f"module {n!r} is a modules_to_save module of another adapter; it cannot also get {config.peft_type}"
            )
        if isinstance(m, AdapterLayer) and m.peft_type != config.peft_type:
            raise UnsupportedAdapterError(
                f"module {n!r} carries {m.peft_type} adapters {m.adapter_names}; adapters of one module share a "
                f"method, so it cannot also get {config.peft_type}"
            )
        b = _base(m)
        if method.on_embeddings:
            if not (_is_linear(m) or isinstance(b, nn.Embedding)):
                raise UnsupportedAdapterError(
                    f"module {n!r} is a {type(b).__name__}; peftcore's {method.label} supports nn.Linear, "
                    "transformers Conv1D and nn.Embedding"
                )
        elif not _is_linear(m):
            raise UnsupportedAdapterError(
                f"module {n!r} is a {type(b).__name__}; peftcore's {config.peft_type} supports nn.Linear, "
                "transformers Conv1D and bitsandbytes Linear4bit / Linear8bitLt"
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
        # CUDA bases need this build's CUDA kernels (a CPU-only build falls back to nothing
        # sensible for bitsandbytes' GPU layout): refuse where they are missing.
        from .native import native_available

        ops = [n for n, d in OPS.items() if d.base == BASE_KINDS[kind].suffix]  # every method's, and mixed
        if dev.type != "cuda" or not all(native_available(op, "cuda") for op in ops):
            raise UnsupportedAdapterError(
                f"{where} is quantized and on device {dev}; this build of peftcore has no {dev.type} kernel for it. "
                "Load the base with device_map='cpu' (or build peftcore with CUDA for a CUDA base)"
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
    """(in_features, out_features) of a targetable base module (num_embeddings /
    embedding_dim for embeddings; a bitsandbytes layer's own sizes, its weight is packed)."""
    d = module_shape(base)
    return d["in_features"], d["out_features"]


def new_wrapper(module: nn.Module, device: torch.device, method, feedforward: bool = False) -> AdapterLayer:
    """``method``'s adapter layer (``methods.Method.make_layer``) that will carry adapters
    for a plain base module, its state tensor on ``device`` (the base weight's).
    ``feedforward``: IA3's input scaling. It takes ``module``'s training mode."""
    layer = method.make_layer(module, feedforward)
    if device.type != "cpu":
        layer._buffers[layer.state_name] = layer._buffers[layer.state_name].to(device)
    follow_mode(layer, module)
    return layer


def find_modules_to_save(model: nn.Module, names: Optional[list[str]]) -> list[tuple[str, nn.Module]]:
    """Modules whose name ends with an entry of ``modules_to_save`` (PEFT: plain endswith)."""
    if not names:
        return []
    out = []
    for n, m in adapter_modules(model):
        if n and any(n.endswith(k) for k in names):
            if isinstance(m, AdapterLayer):
                raise AdapterConfigError(f"modules_to_save entry matches {n!r}, which already carries {m.peft_type} adapters")
            out.append((n, m))
    # Nested matches (a parent and its child both matching) keep the outermost.
    out = [(n, m) for n, m in out if not any(n.startswith(o + ".") for o, _ in out)]
    return out


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
