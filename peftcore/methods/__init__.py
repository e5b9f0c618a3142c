"""The adapter methods, one module each: ``lora.py``, ``adalora.py``, ``ia3.py`` (the
hooks every method provides: ``base.py``). The verbs (api, peft_format, merge, hotswap)
dispatch to ``method_for(peft_type)`` instead of laddering on method names."""
from __future__ import annotations

from .adalora import ADALORA
from .base import Method
from .ia3 import IA3
from .lora import LORA

METHODS: dict[str, Method] = {m.peft_type: m for m in (LORA, ADALORA, IA3)}


def method_for(peft_type: str) -> Method:
    return METHODS[peft_type]


__all__ = ["METHODS", "Method", "method_for"]
