"""Which adapters are active, and whether adapters are enabled: written into each layer's
state tensor (``lora_scales`` / ``ia3_active``) and each modules_to_save wrapper's
choice, never by rebuilding.

Every layer's state tensor is a view of one float32 tensor per device (``_StateTable``),
so a switch is one copy per device, whatever the number of layers (a 168-layer model
switches in tens of microseconds). Structural changes (add, load, delete, merge, hotswap)
rebuild the table; a model moved with ``.to()`` is noticed (its buffers are new tensors)
and the table is rebuilt on the next switch."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Union

import torch
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
    mixed: list[str] | None = None  # the per-row adapters of an open peftcore.mixed_batch
    table: "_StateTable | None" = field(default=None, repr=False, compare=False)


class _StateTable:
    """The state buffers of every adapter layer of a model as views of one float32 tensor
    per device, plus each adapter's entries in it, so that an active set is written with
    one copy per device. Entries of merged adapters stay 0 (their delta is in the weight)."""

    def __init__(self, model: nn.Module):
        self.layers, self.wrappers = [], []
        for m in model.modules():
            if isinstance(m, AdapterLayer):
                self.layers.append(m)
            elif isinstance(m, ModulesToSaveWrapper):
                self.wrappers.append(m)
        self.merged = any(m.merged_adapters for m in self.layers)
        by_dev: dict[torch.device, list[AdapterLayer]] = {}
        for m in self.layers:
            by_dev.setdefault(m._buffers[m.state_name].device, []).append(m)
        self.flats: dict[torch.device, torch.Tensor] = {}
        self.entries: dict[str, dict[torch.device, tuple[list[int], list[float]]]] = {}
        self.views: list[tuple[AdapterLayer, torch.Tensor]] = []
        for dev, layers in by_dev.items():
            # The current values carry over (a model just moved keeps its active set).
            flat = torch.cat([m._buffers[m.state_name].reshape(-1) for m in layers])
            self.flats[dev] = flat
            off = 0
            for m in layers:
                names = m.adapter_names
                view = flat[off:off + len(names)]
                m._buffers[m.state_name] = view
                self.views.append((m, view))
                for i, n in enumerate(names):
                    if n not in m.merged_adapters:
                        idx, vals = self.entries.setdefault(n, {}).setdefault(dev, ([], []))
                        idx.append(off + i)
                        vals.append(m._on_value(n))
                off += len(names)
        self.cache: dict[tuple, dict[torch.device, torch.Tensor]] = {}

    def valid(self) -> bool:
        return all(m._buffers[m.state_name] is v for m, v in self.views)

    def write(self, active: list[str], enabled: bool) -> None:
        key = (tuple(active), enabled)
        vecs = self.cache.get(key)
        if vecs is None:
            vecs = {}
            for dev, flat in self.flats.items():
                v = torch.zeros(flat.numel(), dtype=torch.float32)
                for n in active if enabled else ():
                    idx, vals = self.entries.get(n, {}).get(dev, ((), ()))
                    v[list(idx)] = torch.tensor(vals, dtype=torch.float32)
                vecs[dev] = v
            self.cache[key] = vecs
        with torch.no_grad():
            for dev, flat in self.flats.items():
                flat.copy_(vecs[dev])
        for w in self.wrappers:
            w.set_active(active, enabled)


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


def state_table(model: nn.Module, st: AdapterState, rebuild: bool = False) -> _StateTable:
    """The model's state table, rebuilt when asked (after a structural change) or stale."""
    if rebuild or st.table is None or not st.table.valid():
        st.table = _StateTable(model)
    return st.table


def apply_state(model: nn.Module, st: AdapterState, rebuild: bool = True) -> None:
    """Write the active set and the enabled flag into every adapter layer. Callers that
    only switch (the set is unchanged) pass rebuild=False; everything else rebuilds."""
    state_table(model, st, rebuild).write(st.active, st.enabled)
    if st.mixed is not None:
        from .mixed import bind_rows  # mixed imports this module

        bind_rows(model, st)


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
        _unmerge_first(model, st, "set_adapter")
    st.active = names
    apply_state(model, st, rebuild=False)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters, in activation order ([] when the model has none)."""
    st = get_state(model)
    return list(st.active) if st else []


def enable_adapters(model: nn.Module) -> None:
    """Run the active adapters again after ``disable_adapters`` (modules_to_save included)."""
    st = _require_state(model)
    st.enabled = True
    apply_state(model, st, rebuild=False)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model alone: every LoRA layer gives its base output exactly and
    modules_to_save modules run their originals. Biases that an adapter with
    ``bias != "none"`` wrote into the base stay (as in PEFT)."""
    st = _require_state(model)
    _unmerge_first(model, st, "disable_adapters")
    st.enabled = False
    apply_state(model, st, rebuild=False)


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
        apply_state(model, st, rebuild=False)


def _unmerge_first(model: nn.Module, st: AdapterState, why: str) -> None:
    if not state_table(model, st).merged:  # the table knows: no walk over the model
        return
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
