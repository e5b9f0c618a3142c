"""Which adapters are active, and whether adapters are enabled: written into each layer's
state tensor (``lora_scales`` / ``ia3_active``) and each modules_to_save wrapper's
choice, never by rebuilding."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Union

import torch.nn as nn

from .config import AdapterConfig
from .errors import AdapterNameError, PeftcoreError
from .layers import AdapterLayer, ModulesToSaveWrapper

_STATE_ATTR = "_peftcore_adapters"


@dataclass
class AdapterState:
    """Per-model bookkeeping, kept in ``model.__dict__`` (not a module, not saved)."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    targets: dict[str, object] = field(default_factory=dict)  # resolved target_modules per adapter
    active: list[str] = field(default_factory=list)
    enabled: bool = True


def get_state(model: nn.Module, create: bool = False) -> AdapterState | None:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = AdapterState()
        model.__dict__[_STATE_ATTR] = st
    return st


def _require_state(model: nn.Module) -> AdapterState:
    st = get_state(model)
    if st is None or not st.configs:
        raise PeftcoreError(f"{type(model).__name__} has no peftcore adapters; add or load one first")
    return st


def adapter_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]


def apply_state(model: nn.Module, st: AdapterState) -> None:
    """Write the active set and the enabled flag into every adapter layer."""
    for m in adapter_layers(model):
        m.set_active(st.active, st.enabled)


def set_adapter(model: nn.Module, name_or_names: Union[str, list[str]]) -> None:
    """Make ``name_or_names`` the active adapter(s); several active LoRA / AdaLoRA adapters
    are summed, several IA3 adapters multiply (as in PEFT).

    Only scale tensors are written: no module is rebuilt and a compiled model does not
    recompile. Raises ``AdapterNameError`` for an unknown name (nothing changes)."""
    st = _require_state(model)
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    if not names:
        raise AdapterNameError("set_adapter needs at least one adapter name")
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown}; loaded: {sorted(st.configs)}")
    if names != st.active:
        _unmerge_first(model, "set_adapter")
    st.active = names
    apply_state(model, st)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters, in activation order ([] when the model has none)."""
    st = get_state(model)
    return list(st.active) if st else []


def enable_adapters(model: nn.Module) -> None:
    """Run the active adapters again after ``disable_adapters`` (modules_to_save included)."""
    st = _require_state(model)
    st.enabled = True
    apply_state(model, st)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model alone: every LoRA layer gives its base output exactly and
    modules_to_save modules run their originals. Biases that an adapter with
    ``bias != "none"`` wrote into the base stay (as in PEFT)."""
    st = _require_state(model)
    _unmerge_first(model, "disable_adapters")
    st.enabled = False
    apply_state(model, st)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with peftcore.adapters_disabled(model): ...`` runs the base model, then restores
    the previous enabled state."""
    st = _require_state(model)
    prev = st.enabled
    disable_adapters(model)  # unmerges merged adapters first (as PEFT does)
    try:
        yield model
    finally:
        st.enabled = prev
        apply_state(model, st)


def _unmerge_first(model: nn.Module, why: str) -> None:
    from .merge import unmerge_for_switch  # merge imports this module

    unmerge_for_switch(model, why)


def after_delete(model: nn.Module, st: AdapterState, name: str) -> None:
    """PEFT's rule: remaining active adapters stay active; if none is left, the
    alphabetically first remaining adapter becomes active (with a warning)."""
    st.active = [n for n in st.active if n != name]
    if not st.active and st.configs:
        first = sorted(st.configs)[0]
        warnings.warn(f"deleted adapter {name!r} was the only active one; activating {first!r}")
        st.active = [first]
    apply_state(model, st)
