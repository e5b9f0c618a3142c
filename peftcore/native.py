"""What this build of peftcore runs natively, read from the dispatcher."""
from __future__ import annotations

import torch

# No op module is imported here: __init__ imports this module before peftcore._C,
# and _C must be loaded before _ops defines the schemas (see _ops' docstring).

_C_ERROR: str | None = None  # set by __init__ when peftcore._C failed to load


def native_available(op: str, device: str = "cpu") -> bool:
    """True when ``peftcore::<op>`` has a compiled kernel for ``device`` ("cpu" / "cuda");
    ``op`` may name an overload ("lora_linear.out")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"peftcore::{op}", key)


def _devices(op: str) -> str:
    devs = [d for d in ("cpu", "cuda") if native_available(op, d)]
    return ", ".join(devs) if devs else "none (reference only)"


def show_config() -> str:
    """One line per op: which devices have a native kernel (else the reference runs)."""
    from ._ops import FORWARD_OPS, SCHEMAS

    lines = [f"peftcore._C: {'loaded' if _C_ERROR is None else 'NOT loaded (' + _C_ERROR + ')'}"]
    for op in SCHEMAS:
        line = f"  {op}: native on {_devices(op)}"
        if op in FORWARD_OPS:
            line += f"; .out native on {_devices(op + '.out')}"
        lines.append(line)
    return "\n".join(lines)
