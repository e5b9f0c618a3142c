"""``add_weighted_adapter``: a new adapter made from weighted existing ones (PEFT's verb).

How adapters combine is their method's (``methods/<method>.py``, ``combine``): LoRA by
"cat" (exact), "linear" (PEFT's approximation) or "svd", at scale exactly 1; IA3 by the
weighted sum of the vectors; AdaLoRA not at all (as in PEFT).

The new adapter is frozen (as in PEFT) and becomes the active adapter (peftcore's rule for
every added adapter). Nothing is changed unless every check passes.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from .api import Entry, Plan, check_name, check_not_merged, commit
from .errors import AdapterConfigError, AdapterNameError, UnsupportedAdapterError
from .layers import AdapterLayer
from .methods import method_for
from .methods.base import union_modules
from .state import require_state


def add_weighted_adapter(
    model: torch.nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
) -> None:
    """Add adapter ``adapter_name`` = the weighted combination of ``adapters`` (see the module
    docstring). ``combination_type``: "svd" (default, as PEFT), "linear" or "cat" for LoRA;
    ignored for IA3 (weighted sum). Raises (model unchanged) for unknown names, mixed
    methods, unequal ranks with "linear", or modules_to_save in the sources."""
    st = require_state(model)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise AdapterConfigError(
            f"add_weighted_adapter: give one weight per adapter (got {len(adapters)} adapters, {len(weights)} weights)"
        )
    unknown = [n for n in adapters if n not in st.configs]
    if unknown:
        raise AdapterNameError(f"add_weighted_adapter: unknown adapter(s) {unknown}; loaded: {sorted(st.configs)}")
    check_name(model, adapter_name)
    check_not_merged(model, "add_weighted_adapter")
    configs = [st.configs[n] for n in adapters]
    kind = configs[0].peft_type
    with_mts = [n for n, c in zip(adapters, configs) if c.modules_to_save]
    if with_mts:
        raise UnsupportedAdapterError(
            f"add_weighted_adapter: adapter(s) {with_mts} have modules_to_save, which peftcore does not combine yet"
        )
    layers = [(p, m) for p, m in model.named_modules()
              if isinstance(m, AdapterLayer) and any(n in m.adapter_names for n in adapters)]
    config = copy.deepcopy(configs[0])
    config.target_modules = union_modules([c.target_modules for c in configs], "target_modules")
    plan = Plan(adapter_name, config, config.target_modules)

    options = dict(combination_type=combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                   svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
    for path, m, kwargs in method_for(kind).combine(config, configs, layers, adapters, weights, options):
        plan.lora.append(Entry(path, m, kwargs))
    commit(model, plan, trainable=False)
