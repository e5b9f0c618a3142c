"""Mixed batches: every row of one batch with its own adapter.

``with peftcore.mixed_batch(model, ["a", "b", "__base__", "a"]): model(...) / model.generate(...)``
runs row i with adapter ``adapter_names[i]`` alone (``"__base__"``: no adapter), whatever
is active. Each adapter layer then calls one batched op (``peftcore::*_mixed``) over its
adapters in slot order (the layer's adapter order, kept current by add / load / delete)
with a per-row slot index (-1 = base): the base weight is read once for all rows, each
used adapter once, and no Python loop runs over adapters. modules_to_save copies (whole
modules) run once per run of consecutive rows that share one.

Rows are the leading dimension of the inputs. A batch may be larger than the list by a
whole factor (generate's beams and num_return_sequences repeat each row consecutively):
row i then belongs to entry i // factor. Inference only; merged adapters must be unmerged
first; LoRA on embedding layers has no mixed kernel yet (refused).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn

from .errors import AdapterNameError, PeftcoreError, UnsupportedAdapterError
from .layers import AdapterLayer, LoraEmbedding, ModulesToSaveWrapper
from .state import AdapterState, bind_rows, require_state

BASE = "__base__"


def _unbind(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            m.__dict__["_mixed"] = None
        elif isinstance(m, ModulesToSaveWrapper):
            m.mixed_names = None


def _check(model: nn.Module, st: AdapterState, names: list[str]) -> None:
    if st.mixed is not None:
        raise PeftcoreError(f"mixed_batch: a mixed batch over {st.mixed} is already open on this model")
    if not names:
        raise AdapterNameError("mixed_batch needs one adapter name per batch row (got an empty list)")
    unknown = sorted({n for n in names if n != BASE and n not in st.configs})
    if unknown:
        raise AdapterNameError(
            f"mixed_batch: unknown adapter(s) {unknown}; loaded: {sorted(st.configs)} (or {BASE!r} for the base model)"
        )
    if model.training:
        raise PeftcoreError("mixed_batch runs inference only (as PEFT's adapter_names): call model.eval() first")
    used = set(names)
    for path, m in model.named_modules():
        if isinstance(m, AdapterLayer) and m.merged_adapters:
            raise PeftcoreError(
                f"mixed_batch: adapter(s) {m.merged_adapters} are merged into {path!r}; "
                "call peftcore.unmerge_adapter(model) first"
            )
        if isinstance(m, LoraEmbedding) and used & set(m.adapter_names):
            raise UnsupportedAdapterError(
                f"mixed_batch: {path!r} is a LoRA embedding layer, which has no mixed-batch kernel yet; "
                "run one batch per adapter with peftcore.set_adapter"
            )


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """Inside the block, row i of every batch the model sees uses ``adapter_names[i]``
    alone (``"__base__"`` = the base model), in forward and in generate (greedy, sampling,
    beam search, num_return_sequences). Rows may use adapters of any method loaded on the
    model and of different ranks. On exit the active set and enabled state apply again.

    Raises ``AdapterNameError`` for an unknown name or an empty list, ``PeftcoreError`` in
    training mode, with merged adapters or when a block is already open, and (on the model's
    forward) for a batch whose size is not a whole multiple of ``len(adapter_names)``."""
    st = require_state(model)
    if isinstance(adapter_names, str):
        raise AdapterNameError("mixed_batch takes one adapter name per row (a list), not a single string")
    names = list(adapter_names)
    _check(model, st, names)

    def check_batch(module, args, kwargs):
        # The layers only see rows (some models flatten tokens into them): the batch size
        # is checked here, where it is still the leading dim of the model's input.
        x = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None),
                 next((a for a in args if isinstance(a, torch.Tensor)), None))
        if x is not None and x.dim() >= 1 and x.shape[0] % len(names):
            raise PeftcoreError(
                f"mixed_batch: the batch has {x.shape[0]} rows but {len(names)} adapter names were given; "
                "give one name per row (a batch may be a whole multiple of that: beams, return sequences)"
            )

    st.mixed = names
    hook = model.register_forward_pre_hook(check_batch, with_kwargs=True)
    try:
        bind_rows(model, st)
        yield model
    finally:
        hook.remove()
        st.mixed = None
        _unbind(model)
