"""Adapter layers: a base module plus the adapters attached to it.

All adapter state lives in tensors: per-adapter ``lora_A`` / ``lora_B`` parameters and one
float32 ``lora_scales`` buffer holding each adapter's effective scale (0 when it is inactive
or adapters are disabled). Switching adapters writes that buffer in place, so it never
rebuilds modules and never makes a ``torch.compile``d model recompile; the fused kernel
skips adapters whose scale is 0, so the base output is exact when none is active.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # transformers is optional: GPT-2 style Conv1D is supported when it is installed.
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLayer(nn.Module):
    """Common state of LoRA layers. ``a_name`` / ``b_name`` are the parameter dicts' names."""

    a_name = "lora_A"
    b_name = "lora_B"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        # A load creates one of these per adapted module (hundreds), and nn.Module's
        # __setattr__ walks isinstance chains on every assignment: register submodules and
        # the buffer directly, and keep plain attributes in __dict__.
        self._modules["base_layer"] = base_layer
        self._modules[self.a_name] = nn.ParameterDict()
        self._modules[self.b_name] = nn.ParameterDict()
        self._buffers["lora_scales"] = torch.zeros(0, dtype=torch.float32)
        self._non_persistent_buffers_set.add("lora_scales")
        self.__dict__.update(
            scaling={},  # name -> configured scale (alpha / r or alpha / sqrt(r))
            r={},  # name -> rank
            dropout_p={},  # name -> LoRA dropout probability (training only)
            _written=[],  # what lora_scales holds, to skip redundant writes
        )

    # Order of adapters = order of the ParameterDict = order of lora_scales entries.
    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.a_name).keys())

    def adapter_weights(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, self.a_name)[name], getattr(self, self.b_name)[name]

    def _lists(self):
        # Read straight from the dicts' parameter registries: ParameterDict.values() goes
        # through __getattr__ per entry, a visible cost when called for every layer of
        # every decode step.
        return (
            list(self._modules[self.a_name]._parameters.values()),
            list(self._modules[self.b_name]._parameters.values()),
        )

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout_p: float) -> None:
        getattr(self, self.a_name)[name] = nn.Parameter(A, requires_grad=False)
        getattr(self, self.b_name)[name] = nn.Parameter(B, requires_grad=False)
        self.scaling[name] = scaling
        self.r[name] = A.shape[0]
        self.dropout_p[name] = dropout_p
        self._new_scales()

    def remove(self, name: str) -> None:
        del getattr(self, self.a_name)[name]
        del getattr(self, self.b_name)[name]
        for d in (self.scaling, self.r, self.dropout_p):
            d.pop(name)
        self._new_scales()

    def _new_scales(self) -> None:
        # Adding or removing an adapter changes the module's structure anyway; switching
        # (set_active) only ever writes into this tensor in place.
        n = len(self.scaling)
        self._buffers["lora_scales"] = torch.zeros(n, dtype=torch.float32, device=self.lora_scales.device)
        self.__dict__["_written"] = [0.0] * n

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() would round the scales (alpha / sqrt(r) is rarely
        # exact in 8 bits): keep them float32, rebuilt from the exact values written.
        super()._apply(fn, recurse)
        if self.lora_scales.dtype != torch.float32:
            self._buffers["lora_scales"] = torch.tensor(self._written, dtype=torch.float32, device=self.lora_scales.device)
        return self

    @torch.no_grad()
    def set_active(self, active: list[str], enabled: bool) -> None:
        """Write the effective scales in place: ``scaling`` for active adapters, 0 otherwise."""
        vals = [self.scaling[n] if enabled and n in active else 0.0 for n in self.scaling]
        if vals == self._written:
            return
        if len(set(vals)) == 1:
            self.lora_scales.fill_(vals[0])
        else:
            self.lora_scales.copy_(torch.tensor(vals, dtype=torch.float32))
        self.__dict__["_written"] = vals

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]} scaling={self.scaling[n]:g}" for n in self.adapter_names)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or transformers ``Conv1D`` (whose weight is stored (in, out))."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        conv1d = bool(Conv1D) and isinstance(base_layer, Conv1D)
        w = base_layer.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        self.__dict__.update(is_conv1d=conv1d, in_features=in_f, out_features=out_f)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        weight = base.weight.t() if self.is_conv1d else base.weight
        lora_A, lora_B = self._lists()
        lora_x = None
        if self.training and any(p > 0 for p in self.dropout_p.values()):
            # PEFT drops out the LoRA input only, independently for each adapter.
            lora_x = [F.dropout(x, p, True) if p > 0 else x for p in self.dropout_p.values()]
        return torch.ops.peftcore.lora_linear(x, weight, base.bias, lora_A, lora_B, self.lora_scales, lora_x)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: A is (r, num_embeddings), B is (embedding_dim, r); no dropout."""

    a_name = "lora_embedding_A"
    b_name = "lora_embedding_B"

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.__dict__.update(in_features=base_layer.num_embeddings, out_features=base_layer.embedding_dim)

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        lora_A, lora_B = self._lists()
        pad = -1 if base.padding_idx is None else base.padding_idx
        return torch.ops.peftcore.lora_embedding(input_ids, base.weight, lora_A, lora_B, self.lora_scales, pad)


class ModulesToSaveWrapper(nn.Module):
    """A module trained and saved in full for some adapters (PEFT's ``modules_to_save``).

    ``original_module`` stays frozen; ``modules_to_save[name]`` is each adapter's copy.
    The copy of the first active adapter that has one runs, else the original. (This is a
    choice between modules, so under ``torch.compile`` switching it recompiles once.)
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None

    def forward(self, *args, **kwargs):
        if self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def set_active(self, active: list[str], enabled: bool) -> None:
        self.active_adapter = next((n for n in active if n in self.modules_to_save), None) if enabled else None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())
