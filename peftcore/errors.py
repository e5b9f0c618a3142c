"""Errors raised by peftcore. Each names the file, key or module at fault."""
from __future__ import annotations


class PeftcoreError(ValueError):
    """Base class: bad adapter input (config, weights, names). The model is left unchanged."""


class AdapterConfigError(PeftcoreError):
    """adapter_config.json is missing a required field, garbled, or invalid."""


class UnsupportedAdapterError(PeftcoreError):
    """The adapter needs a PEFT feature peftcore does not implement (named in the message)."""


class AdapterWeightsError(PeftcoreError):
    """The weights file is unreadable, or a tensor is missing, unbound, mis-shaped or not finite."""


class AdapterNameError(PeftcoreError):
    """An adapter name is invalid, already taken, or unknown."""


class AdapterFileNotFoundError(FileNotFoundError):
    """A file the adapter needs (config or weights) does not exist locally or on the Hub."""
