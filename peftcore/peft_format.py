"""PEFT's on-disk adapter format, in one place.

Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (``adapter_model.bin``
only as a fallback, read with ``torch.load(weights_only=True)``). Keys are
``base_model.model.<module path>.<suffix>``; the adapter name never appears. Suffixes:

* each method's own tensors: its module in ``peftcore/methods/`` (``bind`` reads them,
  ``saved`` writes them),
* ``<path>.base_layer.bias`` / ``<path>.bias`` for ``bias`` "lora_only" / "all",
* ``<path>.<param>`` for each parameter of a ``modules_to_save`` module,
* ``<path>.base_layer.weight`` for a targeted embedding's base table (PEFT saves it).
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import uuid

import torch
import torch.nn as nn

from . import methods
from .config import CONFIG_NAME, AdapterConfig
from .errors import AdapterFileNotFoundError, AdapterWeightsError
from .layers import AdapterLayer, ModulesToSaveWrapper

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# ---------------------------------------------------------------- reading
def read_config(path: str) -> AdapterConfig:
    """The config of any supported method (``peft_type`` picks LoRA / AdaLoRA / IA3)."""
    return AdapterConfig.from_json_file(path)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; every failure names the file."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterWeightsError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AdapterWeightsError(
                f"{path}: refused or unreadable (read with torch.load(weights_only=True): {msg})"
            ) from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise AdapterWeightsError(f"{path}: expected a flat dict of name -> tensor")
    if not sd:
        raise AdapterWeightsError(f"{path}: holds no tensors")
    for k, t in sd.items():
        if not t.is_floating_point():
            raise AdapterWeightsError(f"{path}: tensor {k!r} has dtype {t.dtype}; adapter tensors must be floating point")
    bad = [k for k in _maybe_not_finite(sd) if not bool(torch.isfinite(sd[k]).all())]
    if bad:
        raise AdapterWeightsError(f"{path}: tensor {bad[0]!r} contains NaN or inf")
    return sd


def _maybe_not_finite(sd: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensor may hold NaN/inf, found with one float32 sum per tensor (NaN and
    inf propagate through a sum; a float32 overflow of huge finite values only makes a
    false hit). This is several times faster than ``isfinite().all()`` per tensor (and
    than float64 sums); callers confirm the few hits."""
    if not sd:
        return []
    keys = list(sd)
    sums = torch.stack([sd[k].sum(dtype=torch.float64 if sd[k].dtype == torch.float64 else torch.float32)
                        for k in keys])
    return [keys[i] for i in (~torch.isfinite(sums)).nonzero().flatten().tolist()]


def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove PEFT's 'base_model.model.' prefix (keys written by the transformers mixin
    without it bind the same way)."""
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in sd.items()}


# ---------------------------------------------------------------- writing
def embedding_is_targeted(model: nn.Module, config: AdapterConfig, targets) -> bool:
    """PEFT's save_embedding_layers="auto": embeddings named in target_modules (methods that
    adapt embeddings)."""
    if not methods.method_for(config.peft_type).on_embeddings:
        return False
    if isinstance(targets, str):
        return any(
            re.fullmatch(targets, n)
            for n, _ in model.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES)
        )
    return any(e in (targets or []) for e in EMBEDDING_LAYER_NAMES)


def adapter_state_dict(model: nn.Module, name: str, config: AdapterConfig, targets) -> dict[str, torch.Tensor]:
    """PEFT's on-disk state dict of adapter ``name`` (keys with 'base_model.model.')."""
    out: dict[str, torch.Tensor] = {}
    lora_layers = [(p, m) for p, m in model.named_modules() if isinstance(m, AdapterLayer)]
    for path, m in lora_layers:
        if name in m.adapter_names:
            for suffix, t in methods.method_for(m.peft_type).saved(m, name, config, path).items():
                out[f"{path}.{suffix}"] = t
    for path, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save:
            for k, v in m.modules_to_save[name].state_dict().items():
                out[f"{path}.{k}"] = v.detach()
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for k, p in model.named_parameters():
            if k.endswith(".bias") and ".modules_to_save." not in k and ".original_module." not in k:
                out[k] = p.detach()
    elif bias == "lora_only":
        for path, m in lora_layers:
            if getattr(m.base_layer, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = m.base_layer.bias.detach()
    if embedding_is_targeted(model, config, targets) and hasattr(model, "get_input_embeddings"):
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            for path, m in lora_layers:
                if emb is m or emb is m.base_layer:
                    for k, v in m.base_layer.state_dict().items():
                        out[f"{path}.base_layer.{k}"] = v.detach()
    return {PREFIX + k: v for k, v in out.items()}


def write_adapter(directory: str, config: AdapterConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write adapter_model.safetensors (metadata {"format": "pt"}) and adapter_config.json
    as one unit: both go to temporary names first, an existing pair is moved aside, the
    new pair is renamed in, and any failure restores the old pair. An interrupted save
    never leaves a half-written file, nor a new weights file beside an old config."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; PEFT clones likewise.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    text = config.to_json_string()
    finals = [os.path.join(directory, SAFETENSORS_NAME), os.path.join(directory, CONFIG_NAME)]

    def tmp_name(final: str) -> str:
        fd, path = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(final), dir=directory)
        os.close(fd)
        return path

    temps: list[str] = []
    backups: list[tuple[str, str]] = []
    installed: list[str] = []
    try:
        temps.append(tmp_name(finals[0]))
        save_file(tensors, temps[0], metadata={"format": "pt"})
        temps.append(tmp_name(finals[1]))
        with open(temps[1], "w", encoding="utf-8") as f:
            f.write(text)
        for final in finals:
            if os.path.exists(final):
                # A name, not a file: nothing is created unless the rename succeeds.
                backup = os.path.join(directory, f".old-{uuid.uuid4().hex}-{os.path.basename(final)}")
                os.replace(final, backup)
                backups.append((backup, final))
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
            installed.append(final)
    except BaseException:
        for path in temps + installed:
            if os.path.exists(path):
                os.remove(path)
        for backup, final in backups:
            os.replace(backup, final)
        raise
    for backup, _ in backups:
        os.remove(backup)


def find_weights(resolve) -> str:
    """Path of the weights: safetensors first, then bin (``resolve(name, required)``)."""
    p = resolve(SAFETENSORS_NAME, False) or resolve(BIN_NAME, False)
    if p is None:
        raise AdapterFileNotFoundError(f"neither {SAFETENSORS_NAME} nor {BIN_NAME} found")
    return p

