"""What every adapter method provides, and the helpers they share.

A method (lora.py, adalora.py, ia3.py) is one ``Method`` object. The verbs ask it,
through ``methods.method_for(peft_type)``, instead of laddering on method names:

* ``prepare_config``: fields PEFT resolves when it injects (IA3's feedforward modules);
* ``make_layer``: the adapter layer of the method for a base module (its base kind:
  dense, bitsandbytes 4-bit or int8, embedding where the method has one);
* ``feedforward``: whether a targeted module scales its input (IA3; False elsewhere);
* ``new`` / ``bind``: a new adapter's tensors with PEFT's initialisation, or a file's
  tensors bound to a module (keys in PEFT's format, shapes checked), as the keyword
  arguments of the layer's ``add``;
* ``saved``: the tensors PEFT writes for one adapter of one layer, by key suffix;
* ``merge``: the adapters' effect folded into a dense float copy of the base weight;
* ``combine``: ``add_weighted_adapter``'s combination of several adapters into one;
* ``check_swap`` / ``swap``: hot-swapping an adapter's tensors in place.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from .. import inject, peft_format
from ..errors import AdapterConfigError, AdapterWeightsError, UnsupportedAdapterError
from ..layers import AdapterLayer


def shape_in_out(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, is_embedding) of a base module or of its adapter layer."""
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    n_in, n_out = inject.base_shape(base)
    return n_in, n_out, isinstance(base, nn.Embedding)


def base_weight(module: nn.Module) -> torch.Tensor:
    return (module.base_layer if isinstance(module, AdapterLayer) else module).weight


def adapter_kw(module: nn.Module) -> dict:
    """dtype and device of a module's adapter tensors. PEFT's default
    (autocast_adapter_dtype): fp16 / bf16 adapters are kept in float32; so are adapters
    on bitsandbytes bases (uint8 / int8 weights)."""
    w = base_weight(module)
    return dict(dtype=torch.float64 if w.dtype == torch.float64 else torch.float32, device=w.device)


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank/alpha_pattern lookup: first key (in dict order) that matches a dot-aligned suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


def take(remaining: dict, source: str, path: str, suffixes) -> list[torch.Tensor]:
    """Pop ``<path>.<suffix>`` for each suffix, or raise naming the missing keys."""
    keys = [f"{path}.{k}" for k in suffixes]
    missing = [k for k in keys if k not in remaining]
    if missing:
        raise AdapterWeightsError(
            f"{source}: no weights for targeted module {path!r} (missing {[peft_format.PREFIX + k for k in missing]})"
        )
    return [remaining.pop(k) for k in keys]


def fill(slot: torch.Tensor, new: Optional[torch.Tensor], rows: bool) -> None:
    """slot ← new, zero-padded along the rank dim (dim 0 if ``rows``, else dim 1); None:
    zeros. Each element is written once (the copy, then zeros past the new rank only)."""
    if new is None:
        slot.zero_()
        return
    k = new.shape[0] if rows else new.shape[1]
    head, tail = (slot[:k], slot[k:]) if rows else (slot[:, :k], slot[:, k:])
    head.copy_(new)
    if tail.numel():
        tail.zero_()


def union_modules(values: list, what: str):
    """PEFT's union of target (or feedforward) modules: sets joined, regexes OR-ed."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) > 1:
        raise AdapterConfigError(f"add_weighted_adapter: the adapters' {what} mix lists and regex strings: {values}")
    if kinds == {str}:
        return "|".join(f"({v})" for v in values)
    return sorted({m for v in values if v for m in v})


class Method:
    """The hooks of one adapter method (see the module docstring)."""

    peft_type = ""
    label = ""  # the method's name in messages
    default_targets: dict = {}  # PEFT's target_modules for None, per transformers model_type
    on_embeddings = False  # adapts nn.Embedding (PEFT then also saves a targeted embedding's table)
    trains_alone = False  # only one adapter of this method may train at a time (AdaLoRA's rank allocation)

    def make_layer(self, module: nn.Module, feedforward: bool) -> AdapterLayer:
        raise NotImplementedError

    def prepare_config(self, model: nn.Module, config) -> None:
        """Fields PEFT resolves in the config when it injects (beyond target_modules)."""

    def feedforward(self, config, path: str, module: nn.Module) -> bool:
        return False

    def new(self, config, path: str, module: nn.Module, feedforward: bool) -> dict:
        raise NotImplementedError

    def bind(self, config, path: str, module: nn.Module, feedforward: bool, remaining: dict, source: str) -> dict:
        raise NotImplementedError

    def saved(self, layer: AdapterLayer, name: str, config, path: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merge(self, layer: AdapterLayer, names: list[str], sign: float, acc: torch.Tensor,
              bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) with adapters ``names`` merged (``sign`` +1) or unmerged (-1), in
        order; ``acc`` is the base weight as stored ([in, out] for Conv1D), in float32
        (float64), ``bias`` the base bias in that precision or None."""
        raise NotImplementedError

    def merges_bias(self, layer: AdapterLayer) -> bool:
        """Whether merging changes the base bias (IA3 scaling the output)."""
        return False

    def combine(self, config, configs: list, layers: list, adapters: list[str], weights: list[float],
                options: dict) -> list[tuple[str, nn.Module, dict]]:
        """``add_weighted_adapter``: (path, layer, add kwargs) of the combined adapter on each
        of ``layers`` (the (path, layer) pairs carrying a source adapter), with ``config``
        (a copy of the first source's, target_modules already joined) adjusted in place."""
        raise UnsupportedAdapterError(f"add_weighted_adapter: {self.peft_type} adapters cannot be combined")

    def check_swap(self, layer: AdapterLayer, name: str, new: dict, path: str, source: str) -> None:
        """Raise if ``new`` (a bound adapter) does not fit adapter ``name``'s slot."""

    def swap(self, layer: AdapterLayer, name: str, new: Optional[dict]) -> None:
        """Write ``new`` into adapter ``name``'s tensors in place (None: this module is not
        adapted by the new adapter: the neutral element)."""
        raise NotImplementedError
