"""Where a model's adapter state lives, and how it reaches the layers.

``AdapterState`` (kept in ``model.__dict__``) holds the loaded configs, the active set, the
enabled flag and an open mixed batch. ``apply_state`` writes it into each layer's state
tensor (``lora_scales`` / ``ia3_active``), each modules_to_save wrapper's choice and, inside
``peftcore.mixed_batch``, each layer's per-row slot index: never by rebuilding.

Every layer's state tensor is a view of one float32 tensor per device (``StateTable``),
so a switch is one copy per device, whatever the number of layers (a 168-layer model
switches in tens of microseconds). Structural changes (add, load, delete, merge, hotswap)
rebuild the table; a model moved with ``.to()`` is noticed (its buffers are new tensors)
and the table is rebuilt on the next switch.

The verbs that change this state live in switching.py (active set, enable / disable),
mixed.py, merge.py and api.py; they all import this module, which imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import AdapterConfig
from .errors import PeftcoreError
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
    table: "StateTable | None" = field(default=None, repr=False, compare=False)


class StateTable:
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


def drop_state(model: nn.Module) -> None:
    """Forget the model's adapter bookkeeping (its last adapter is gone)."""
    if model.__dict__.pop(_STATE_ATTR, None) is not None:
        model.__dict__.pop("peft_config", None)


def get_state(model: nn.Module, create: bool = False) -> AdapterState | None:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = AdapterState()
        model.__dict__[_STATE_ATTR] = st
        # transformers' adapter mixin keeps {name: config} in model.peft_config: so does
        # peftcore, the state's own dict (always current). Its other marker,
        # _hf_peft_config_loaded, is answered only while peftcore.patch_transformers() is in
        # force (transformers' unpatched save_pretrained would hand the model to PEFT).
        model.__dict__["peft_config"] = st.configs
    return st


def require_state(model: nn.Module) -> AdapterState:
    st = get_state(model)
    if st is None or not st.configs:
        raise PeftcoreError(f"{type(model).__name__} has no peftcore adapters; add or load one first")
    return st


def state_table(model: nn.Module, st: AdapterState, rebuild: bool = False) -> StateTable:
    """The model's state table, rebuilt when asked (after a structural change) or stale."""
    if rebuild or st.table is None or not st.table.valid():
        st.table = StateTable(model)
    return st.table


def apply_state(model: nn.Module, st: AdapterState, rebuild: bool = True) -> None:
    """Write the active set and the enabled flag into every adapter layer. Callers that
    only switch (the set is unchanged) pass rebuild=False; everything else rebuilds."""
    state_table(model, st, rebuild).write(st.active, st.enabled)
    if st.mixed is not None:
        bind_rows(model, st)



def bind_rows(model: nn.Module, st: AdapterState) -> None:
    """Give every adapter layer its (rows, scales) for st.mixed, and every modules_to_save
    wrapper its per-row module choice (called on entry and after any structural change)."""
    names = st.mixed
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            slots = m.adapter_names
            pos = {n: i for i, n in enumerate(slots)}
            dev = m._buffers[m.state_name].device
            rows = torch.tensor([pos.get(n, -1) for n in names], dtype=torch.int64, device=dev)
            scales = torch.tensor([m._on_value(n) for n in slots], dtype=torch.float32, device=dev)
            m.__dict__["_mixed"] = (rows, scales)
        elif isinstance(m, ModulesToSaveWrapper):
            m.mixed_names = list(names)
