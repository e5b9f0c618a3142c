"""Merging adapters into the base weights (PEFT's ``merge_adapter`` family).

``merge_adapter`` adds ``s·B·A`` of each named LoRA adapter (AdaLoRA: ``s·B·(A ⊙ E)``)
into the weight of every layer that carries it, or multiplies the weight by an IA3
vector (``W ⊙ l`` over output rows, bias included, or over input columns for
feedforward modules); the layer then keeps the adapter with kernel state 0
(``lora_scales`` / ``ia3_active``), so the merged part is never applied twice, and records
it in ``layer.merged_adapters``. ``unmerge_adapter`` subtracts it again (IA3: divides by
``l + 1e-8``, PEFT's lossy inverse, with a warning), ``merge_and_unload`` merges and gives
back the plain model, ``unload`` gives back the plain model without merging.

Floating-point bases (nn.Linear, transformers Conv1D, nn.Embedding): ``W += Δ`` in place,
with Δ computed in float32 (float64 for float64 adapters) and the sum rounded to the
weight's dtype once, as PEFT does. Unmerge subtracts the same Δ (exact up to that one
rounding per direction).

bitsandbytes bases (dequantize -> add -> re-quantize, as PEFT does):

* ``Linear4bit``: ``W = dequantize_4bit(data, quant_state)`` (peftcore's op); ``W + Δ`` (fp32)
  is re-quantized by ``bnb.functional.quantize_4bit`` with the layer's blocksize,
  quant_type, double quantization (``compress_statistics``) and quant_storage, and the new
  bytes / quant state are stored back into the same ``Params4bit``.
* ``Linear8bitLt``: ``W = dequantize_int8(CB, SCB)`` (= CB·SCB/127, peftcore's op);
  ``W + Δ`` is rounded to float16 and re-quantized by ``int8_vectorwise_quant`` (what
  ``Int8Params`` does), and CB / SCB are stored back where the layer keeps them.

The merged quantized model therefore runs ``quant(W + Δ)``, not ``W + Δ``. Unmerge is
PEFT's: dequantize, subtract Δ, re-quantize. It does not restore the original codes: each
re-quantization moves every element by up to half a quantization step of its block (4-bit:
half the largest gap between neighbouring code values times the block's absmax; int8:
SCB/254 per row), and the block scale itself changes with ``W ± Δ``. After merge +
unmerge, ``|W_after - W_before| <= g·(a + d)·(1 + g/4)`` per 4-bit block (g: the largest
code gap, 0.304 for nf4 and 0.333 for fp4 on bitsandbytes' [-1, 1] code tables; a: the
block's absmax; d: the block's max |Δ|) and ``<= (a + d)·(1/127 + 2**-10)`` per int8
row (a, d: the row's max |W| and max |Δ|; 2**-10: the float16 rounding, both ways), plus, with double quantization, the 8-bit error of the re-quantized block scales.
``tests/test_quantized.py`` measures it against these bounds.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from . import inject
from .errors import AdapterNameError, PeftcoreError
from .layers import (
    AdapterLayer,
    ModulesToSaveWrapper,
    bnb_kind,
    int8_state,
    stored_4bit,
    unpack_cpu_4bit,
)
from .methods import method_for
from .methods.ia3 import IA3
from .methods.lora import LORA
from .state import apply_state, drop_state, require_state


def lora_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(path, layer) of every adapter layer (any method)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def merged_in(model: nn.Module) -> dict[str, list[str]]:
    """Adapter name -> paths of the layers whose base weight has it merged."""
    out: dict[str, list[str]] = {}
    for path, m in lora_layers(model):
        for n in m.merged_adapters:
            out.setdefault(n, []).append(path)
    return out


def is_merged(model: nn.Module) -> bool:
    """True when some layer has an adapter merged into its base weight."""
    return any(m.merged_adapters for _, m in lora_layers(model))


# ---------------------------------------------------------------- per-layer weights
# What an adapter adds to a weight is its method's (methods/<method>.py ``merge``);
# LoRA's delta is kept here under its old name for callers of peftcore.merge.
delta_weight = LORA.delta_weight


def _dense(layer: AdapterLayer) -> torch.Tensor:
    """The base's weight as a float32 dense tensor (a copy for quantized bases), decoded by
    peftcore's own dequantize ops: the weight the forward kernels use. They equal
    bitsandbytes' dequantize bit for bit, except where bitsandbytes 0.50's CPU decoder is
    wrong (blocks straddling two rows, tests/ops/test_quantized_ops.py)."""
    base = layer.base_layer
    kind = bnb_kind(base)
    if kind == "4bit":
        unpack_cpu_4bit(base)
        return torch.ops.peftcore.dequantize_4bit(
            *stored_4bit(base), base.out_features, base.in_features, torch.float32
        )
    if kind == "8bit":
        cb, scb = int8_state(base)
        return torch.ops.peftcore.dequantize_int8(cb, scb, torch.float32)
    return base.weight.detach()


def _new_weight(layer: AdapterLayer, names: list[str], sign: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias or None) after merging (``sign`` +1) or unmerging (-1) adapters
    ``names`` in that order, computed in float32 (float64 for float64 adapters) and rounded
    once, to the weight's dtype (quantized bases: to what bitsandbytes re-quantizes from).
    The bias changes only for non-feedforward IA3."""
    params = [p for n in names for p in layer.adapter_params(n).values()]
    f = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    method = method_for(layer.peft_type)
    b = getattr(layer.base_layer, "bias", None)
    bias = b.detach().to(f) if b is not None and method.merges_bias(layer) else None
    acc, bias = method.merge(layer, names, sign, _dense(layer).to(f, copy=True), bias)
    if bias is not None:
        bias = bias.to(b.dtype)
    kind = bnb_kind(layer.base_layer)
    if kind == "8bit":
        return acc.to(torch.float16), bias  # what Int8Params quantizes from
    if kind == "4bit":
        return acc.float(), bias
    return acc.to(layer.base_layer.weight.dtype), bias


def _write(layer: AdapterLayer, new: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    base = layer.base_layer
    if bias is not None:
        with torch.no_grad():
            base.bias.copy_(bias)
    kind = bnb_kind(base)
    if kind == "4bit":
        import bitsandbytes as bnb

        w = base.weight
        old = w.quant_state
        q, qs = bnb.functional.quantize_4bit(
            new.contiguous(), blocksize=old.blocksize, compress_statistics=w.compress_statistics,
            quant_type=old.quant_type, quant_storage=w.quant_storage,
        )
        qs.dtype = old.dtype  # bitsandbytes returns outputs in this dtype: keep the layer's
        w.data = q
        w.quant_state = qs
        if hasattr(base, "quant_state"):
            base.quant_state = qs
    elif kind == "8bit":
        import bitsandbytes as bnb

        cb, scb, _ = bnb.functional.int8_vectorwise_quant(new.contiguous())
        w = base.weight
        w.data = cb
        if getattr(w, "SCB", None) is not None:
            w.CB, w.SCB = cb, scb
        else:
            base.state.CB, base.state.SCB = cb, scb
        if hasattr(base.state, "reset_grads"):
            base.state.reset_grads()
    else:
        with torch.no_grad():
            base.weight.copy_(new)


def _check_finite(path: str, new: tuple, what: str) -> None:
    if not all(t is None or bool(torch.isfinite(t).all()) for t in new):
        raise PeftcoreError(
            f"safe_merge: {what} into module {path!r} gives non-finite weights (NaN/inf); nothing was merged"
        )


# ---------------------------------------------------------------- public API
def merge_adapter(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
    """Merge adapters into the base weights (default: the active adapters).

    Each merged adapter keeps its factors but runs with kernel scale 0, so outputs do not
    count it twice; ``unmerge_adapter`` undoes the merge (lossy on quantized bases, see the
    module docstring). Adapters already merged in a layer are skipped with a warning.
    ``safe_merge`` checks every new weight for NaN/inf first and raises
    ``PeftcoreError`` naming the module, leaving the model unchanged."""
    st = require_state(model)
    if not st.enabled:
        raise PeftcoreError("merge_adapter: adapters are disabled; call peftcore.enable_adapters(model) first")
    names = list(st.active) if adapter_names is None else (
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown}; loaded: {sorted(st.configs)}")
    work = []
    already = set()
    for path, layer in lora_layers(model):
        todo = [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]
        already.update(n for n in names if n in layer.merged_adapters)
        if todo:
            work.append((path, layer, todo))
    if already:
        warnings.warn(f"adapter(s) {sorted(already)} already merged in some layers; merging the rest only")
    if safe_merge:
        for path, layer, todo in work:
            _check_finite(path, _new_weight(layer, todo, +1.0), f"merging {todo}")
    for path, layer, todo in work:
        _write(layer, *_new_weight(layer, todo, +1.0))
        layer.merged_adapters.extend(todo)
    apply_state(model, st)


def unmerge_adapter(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again and give the adapters
    back their kernel scales. On quantized bases this re-quantizes (lossy, PEFT's method)."""
    st = require_state(model)
    if any(m.merged_adapters and m.peft_type == IA3.peft_type for _, m in lora_layers(model)):
        warnings.warn("unmerge_adapter: IA3 unmerge divides by l + 1e-8 (as PEFT): the result can be inaccurate")
    for _, layer in lora_layers(model):
        if layer.merged_adapters:
            merged = list(layer.merged_adapters)
            _write(layer, *_new_weight(layer, list(reversed(merged)), -1.0))
            layer.merged_adapters.clear()
    apply_state(model, st)


def _unload(model: nn.Module) -> nn.Module:
    for path, m in list(inject.adapter_modules(model)):
        if isinstance(m, AdapterLayer):
            parent, child = inject.get_parent(model, path)
            setattr(parent, child, m.base_layer)
        elif isinstance(m, ModulesToSaveWrapper):
            # PEFT keeps the active adapter's trained copy (else the original).
            keep = m.modules_to_save[m.active_adapter] if m.active_adapter is not None else m.original_module
            parent, child = inject.get_parent(model, path)
            setattr(parent, child, keep)
    drop_state(model)
    return model


def merge_and_unload(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> nn.Module:
    """Merge the adapters (default: the active ones) and return the model without any
    peftcore layer: plain nn.Linear / Conv1D / nn.Embedding, or re-quantized bitsandbytes
    layers. A modules_to_save module is replaced by the active adapter's copy (PEFT)."""
    merge_adapter(model, adapter_names, safe_merge)
    return _unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging and return the model with its original modules.
    As in PEFT, deltas merged earlier with ``merge_adapter`` stay in the weights (call
    ``unmerge_adapter`` first to take them out)."""
    require_state(model)
    return _unload(model)


def unmerge_for_switch(model: nn.Module, why: str) -> None:
    """PEFT unmerges (with a warning) before switching or disabling adapters."""
    if is_merged(model):
        warnings.warn(f"{why}: unmerging the merged adapters first (lossy on quantized bases)")
        unmerge_adapter(model)


__all__ = ["delta_weight", "is_merged", "merge_adapter", "merge_and_unload", "unload", "unmerge_adapter"]
