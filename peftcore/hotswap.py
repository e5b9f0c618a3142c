"""``hotswap_adapter``: replace a loaded adapter's weights in place (PEFT's hot-swap).

The new adapter is read and checked like any load (``api.plan_load``: every key bound,
every shape checked) before anything changes. Then its tensors are copied into the
existing parameters: no module is rebuilt, no tensor is replaced, so a ``torch.compile``d
model does not recompile. A smaller rank is zero-padded into the existing slot (the extra
rows of A / columns of B, and entries of AdaLoRA's E, are zero); a larger rank is refused
(load the first adapter at the largest rank you will swap in). Modules the old adapter
adapted but the new one does not get zeros (IA3: ones). The scales follow the new
config. What a slot holds and how it is filled is the method's (``methods``: check_swap
and swap).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn

from . import hub, peft_format
from .api import plan_load
from .config import CONFIG_NAME
from .errors import AdapterConfigError, AdapterNameError, PeftcoreError, UnsupportedAdapterError
from .layers import AdapterLayer
from .methods import method_for
from .state import apply_state, require_state


def hotswap_adapter(
    model: nn.Module,
    path_or_repo_id: Union[str, os.PathLike],
    adapter_name: str,
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    token=None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
) -> None:
    """Load the adapter at ``path_or_repo_id`` into the slot of loaded adapter
    ``adapter_name`` (same method, modules among the old adapter's, rank no larger). Every
    failure raises naming the file, key or module, with the model unchanged."""
    st = require_state(model)
    if adapter_name not in st.configs:
        raise AdapterNameError(f"hotswap_adapter: no adapter named {adapter_name!r}; loaded: {sorted(st.configs)}")

    def resolve(filename, required):
        return hub.resolve_file(
            path_or_repo_id, filename, revision=revision, subfolder=subfolder, token=token,
            cache_dir=cache_dir, local_files_only=local_files_only, required=required,
        )

    config_path = resolve(CONFIG_NAME, True)
    config = peft_format.read_config(config_path)
    old = st.configs[adapter_name]
    if config.peft_type != old.peft_type:
        raise UnsupportedAdapterError(
            f"{config_path}: peft_type={config.peft_type!r}, but adapter {adapter_name!r} is {old.peft_type}"
        )
    config.check_supported()
    weights_path = peft_format.find_weights(resolve)
    sd = peft_format.strip_prefix(peft_format.read_weights(weights_path))
    try:
        plan = plan_load(model, adapter_name, config, sd, weights_path)
    except AdapterConfigError as e:
        raise AdapterConfigError(f"{config_path}: {e}") from None
    if plan.mts or plan.writes:
        raise UnsupportedAdapterError(
            f"{config_path}: hot-swapping modules_to_save or base biases is not supported (only adapter weights)"
        )
    method = method_for(old.peft_type)
    slots = {p: m for p, m in model.named_modules() if isinstance(m, AdapterLayer) and adapter_name in m.adapter_names}
    for e in plan.lora:
        layer = slots.get(e.path)
        if layer is None:
            raise AdapterConfigError(
                f"{weights_path}: module {e.path!r} has no slot of adapter {adapter_name!r}; a hot-swap keeps the "
                "old adapter's modules (load the new adapter instead)"
            )
        if layer.merged_adapters:
            raise PeftcoreError(f"hotswap_adapter: module {e.path!r} has merged adapters; unmerge first")
        method.check_swap(layer, adapter_name, e.add_kwargs, e.path, weights_path)

    # Checked: now only in-place copies.
    bound = {e.path: e.add_kwargs for e in plan.lora}
    with torch.no_grad():
        for path, layer in slots.items():
            new = bound.get(path)  # None: the new adapter leaves this module alone -> zeros
            method.swap(layer, adapter_name, new)
    plan.config.inference_mode = old.inference_mode
    st.configs[adapter_name] = plan.config
    st.targets[adapter_name] = plan.targets
    apply_state(model, st)  # writes the state tensors in place where the new scales differ
