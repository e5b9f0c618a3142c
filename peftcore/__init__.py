"""peftcore: PEFT-format adapters (LoRA, AdaLoRA, IA3) run through fused C++ kernels."""
from __future__ import annotations

import os
import warnings

from . import native as _native  # imports no op module: _C must come before _ops

try:  # _C first: it registers C++ kernels before the Python schemas are defined (see _ops).
    if os.environ.get("PEFTCORE_DISABLE_C", "") not in ("", "0"):
        # Escape hatch (and how the tests exercise the fallback): run the reference.
        raise ImportError("disabled by PEFTCORE_DISABLE_C")
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by the no-_C test in a subprocess
    _native._C_ERROR = str(e)
    warnings.warn(
        f"peftcore._C could not be loaded ({e}); running the pure-PyTorch reference kernels. "
        "Build it with `pip install --no-build-isolation -e .`.",
        stacklevel=2,
    )

from . import _ops  # noqa: E402,F401
from .native import native_available, show_config  # noqa: E402

__version__ = "0.1.0"

from .api import (  # noqa: E402
    add_adapter,
    delete_adapter,
    from_pretrained,
    get_adapter_state_dict,
    get_nb_trainable_parameters,
    load_adapter,
    print_trainable_parameters,
    save_pretrained,
)
from .adalora import adalora_orthogonal_loss, update_and_allocate  # noqa: E402
from .combine import add_weighted_adapter  # noqa: E402
from .hotswap import hotswap_adapter  # noqa: E402
from .transformers_patch import patch_transformers, unpatch_transformers  # noqa: E402
from .mixed import mixed_batch  # noqa: E402
from .config import AdaLoraConfig, AdapterConfig, IA3Config, LoraConfig  # noqa: E402
from .merge import merge_adapter, merge_and_unload, unload, unmerge_adapter  # noqa: E402
from .errors import (  # noqa: E402
    AdapterConfigError,
    AdapterFileNotFoundError,
    AdapterNameError,
    AdapterWeightsError,
    PeftcoreError,
    UnsupportedAdapterError,
)
from .switching import (  # noqa: E402
    active_adapters,
    adapters_disabled,
    disable_adapters,
    enable_adapters,
    set_adapter,
)

__all__ = [
    "LoraConfig",
    "AdaLoraConfig",
    "IA3Config",
    "AdapterConfig",
    "load_adapter",
    "add_adapter",
    "set_adapter",
    "active_adapters",
    "enable_adapters",
    "disable_adapters",
    "adapters_disabled",
    "delete_adapter",
    "get_adapter_state_dict",
    "save_pretrained",
    "from_pretrained",
    "print_trainable_parameters",
    "update_and_allocate",
    "add_weighted_adapter",
    "hotswap_adapter",
    "patch_transformers",
    "unpatch_transformers",
    "mixed_batch",
    "adalora_orthogonal_loss",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "get_nb_trainable_parameters",
    "PeftcoreError",
    "AdapterConfigError",
    "AdapterFileNotFoundError",
    "AdapterNameError",
    "AdapterWeightsError",
    "UnsupportedAdapterError",
    "native_available",
    "show_config",
]
