"""Which adapters are active, and whether adapters are enabled: the verbs. They change the
model's ``AdapterState`` and write it into the layers with ``state.apply_state`` (one copy
of a cached vector per device: no module is rebuilt)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Union

import torch.nn as nn

from .errors import AdapterNameError
from .merge import unmerge_for_switch
from .state import AdapterState, apply_state, get_state, require_state, state_table


def set_adapter(model: nn.Module, name_or_names: Union[str, list[str]]) -> None:
    """Make ``name_or_names`` the active adapter(s); several active LoRA / AdaLoRA adapters
    are summed, several IA3 adapters multiply (as in PEFT).

    Only scale tensors are written: no module is rebuilt and a compiled model does not
    recompile. Raises ``AdapterNameError`` for an unknown name (nothing changes)."""
    st = require_state(model)
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    if not names:
        raise AdapterNameError("set_adapter needs at least one adapter name")
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown}; loaded: {sorted(st.configs)}")
    if names != st.active:
        _unmerge_first(model, st, "set_adapter")
    st.active = names
    apply_state(model, st, rebuild=False)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters, in activation order ([] when the model has none)."""
    st = get_state(model)
    return list(st.active) if st else []


def enable_adapters(model: nn.Module) -> None:
    """Run the active adapters again after ``disable_adapters`` (modules_to_save included)."""
    st = require_state(model)
    st.enabled = True
    apply_state(model, st, rebuild=False)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model alone: every LoRA layer gives its base output exactly and
    modules_to_save modules run their originals. Biases that an adapter with
    ``bias != "none"`` wrote into the base stay (as in PEFT)."""
    st = require_state(model)
    _unmerge_first(model, st, "disable_adapters")
    st.enabled = False
    apply_state(model, st, rebuild=False)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with peftcore.adapters_disabled(model): ...`` runs the base model, then restores
    the previous enabled state."""
    st = require_state(model)
    prev = st.enabled
    disable_adapters(model)  # unmerges merged adapters first (as PEFT does)
    try:
        yield model
    finally:
        st.enabled = prev
        apply_state(model, st, rebuild=False)


def _unmerge_first(model: nn.Module, st: AdapterState, why: str) -> None:
    if state_table(model, st).merged:  # the table knows: no walk over the model
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
