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
            merged_adapters=[],  # adapters whose delta is merged into the base weight (scale 0 here)
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
        # A merged adapter is already in the base weight: its kernel scale stays 0.
        merged = self.merged_adapters
        vals = [self.scaling[n] if enabled and n in active and n not in merged else 0.0 for n in self.scaling]
        if vals == self._written:
            return
        if len(set(vals)) == 1:
            self.lora_scales.fill_(vals[0])
        else:
            self.lora_scales.copy_(torch.tensor(vals, dtype=torch.float32))
        self.__dict__["_written"] = vals

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]} scaling={self.scaling[n]:g}" for n in self.adapter_names)

    def _dropped(self, x: torch.Tensor):
        """PEFT drops out the LoRA input only, independently for each adapter (training only)."""
        if self.training and any(p > 0 for p in self.dropout_p.values()):
            return [F.dropout(x, p, True) if p > 0 else x for p in self.dropout_p.values()]
        return None


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
        lora_x = self._dropped(x)
        return torch.ops.peftcore.lora_linear(x, weight, base.bias, lora_A, lora_B, self.lora_scales, lora_x)


# ---------------------------------------------------------------- bitsandbytes bases
# bitsandbytes is optional: nothing below imports it at module import time.
def bnb_kind(module: nn.Module) -> str | None:
    """"4bit" for ``bitsandbytes.nn.Linear4bit``, "8bit" for ``Linear8bitLt``, "other" for any
    other bitsandbytes module (Embedding4bit, ...), None for a module not from bitsandbytes."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return "other"


def unpack_cpu_4bit(base: nn.Module) -> bool:
    """Undo bitsandbytes' CPU (AVX512-BF16) packed layout of a ``Linear4bit`` weight, exactly.

    bitsandbytes converts a Linear4bit on its first eval-mode no-grad CPU forward
    (``functional._convert_weight_packed_for_cpu``): the nibbles are interleaved in
    [N, K/2] tiles, absmax becomes bfloat16 [K/blocksize, N] and double quantization is
    dropped. Its own inverse re-quantizes absmax (lossy); here the nibbles are
    un-interleaved bit for bit and ``absmax = packed_absmax.T.reshape(-1).float()``
    (bf16 -> fp32 is exact), so the layer computes the very weight bitsandbytes used.
    The result is bitsandbytes' standard layout (non-nested), which bitsandbytes itself
    still runs (it re-packs on its next eligible forward). Returns True if it converted."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or not getattr(qs, "packing_format_for_cpu", False):
        return False
    packed = w.data.view(torch.uint8)
    N, K_half = packed.shape
    K, BLOCK_N = 2 * K_half, 32
    # packed rows of 32 bytes hold 64 codes: low nibbles are tile entries 0..31, high 32..63.
    tiles = packed.reshape(-1, 32)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # [-1, 64]
    codes = codes.reshape(N // BLOCK_N, K_half, BLOCK_N, 2).transpose(1, 2).reshape(N, K)
    flat = codes.reshape(-1)
    qweight = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8)
    qweight = qweight.reshape(qs.original_qshape)
    storage = getattr(qs, "original_storage_type", None)
    if storage is not None:
        qweight = qweight.view(storage)
    qs.absmax = qs.absmax.t().reshape(-1).float().contiguous()
    qs.nested = False
    qs.state2 = None
    qs.offset = None
    qs.dtype = qs.original_dtype
    qs.packing_format_for_cpu = False
    w.data = qweight
    if getattr(base, "quant_state", None) is not None:
        base.quant_state = qs
    return True


def stored_4bit(base: nn.Module) -> tuple:
    """A ``Linear4bit``'s stored weight as the quantized ops take it (standard layout):
    (qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
    nested_blocksize), the nested entries None / 0 without double quantization."""
    w = base.weight
    qs = w.quant_state
    if qs.nested:  # nested_offset: bitsandbytes' 0-dim float32 tensor, passed as it is
        nested = (qs.state2.absmax, qs.state2.code, qs.offset, int(qs.state2.blocksize))
    else:
        nested = (None, None, None, 0)
    return (w.data, qs.absmax, qs.code, int(qs.blocksize), *nested)


class LoraLinear4bit(LoraLayer):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (nf4 / fp4, optional double quantization).

    The forward runs ``peftcore::lora_linear_4bit`` on the layer's packed bytes and
    quant state (never bitsandbytes' forward, never a dequantized weight). As bitsandbytes
    does, x is cast to the layer's ``compute_dtype`` for the base product and the result is
    returned in x's dtype. The LoRA branch sees the *original* x, as in PEFT:

    * compute dtype narrower than x (fp32 x, bf16 compute): the base product reads x rounded
      to the compute dtype (as bitsandbytes), kept in x's dtype, and the original x goes to
      the LoRA terms as ``lora_x``; everything is summed at x's precision.
    * compute dtype wider (bf16 x, fp32 compute): the upcast is exact, so base and LoRA
      read it, are summed in fp32 and rounded to x's dtype once (PEFT rounds the base and
      the LoRA output to x's dtype separately before adding: a one-ulp difference).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        unpack_cpu_4bit(base_layer)  # no-op unless bitsandbytes already ran it on CPU
        self.__dict__.update(in_features=base_layer.in_features, out_features=base_layer.out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        unpack_cpu_4bit(base)  # no-op unless bitsandbytes ran the base directly since injection
        lora_A, lora_B = self._lists()
        lora_x = self._dropped(x)
        in_dtype = x.dtype
        cdt = base.compute_dtype if getattr(base, "compute_type_is_set", base.compute_dtype is not None) else None
        xc = x
        if cdt is not None and cdt != in_dtype and x.is_floating_point():
            if torch.finfo(cdt).bits < torch.finfo(in_dtype).bits:
                # bitsandbytes rounds x to the compute dtype for the base product: do the
                # same, but keep x's dtype so that the LoRA terms (on the original x, as
                # PEFT feeds them) are added at x's precision.
                xc = x.to(cdt).to(in_dtype)
                if lora_x is None:
                    lora_x = [x] * len(lora_A)
            else:  # an exact upcast: the LoRA branch may read it
                xc = x.to(cdt)
        out = torch.ops.peftcore.lora_linear_4bit(
            xc, *stored_4bit(base), self.out_features, base.bias, lora_A, lora_B, self.lora_scales, lora_x
        )
        return out.to(in_dtype)


def int8_state(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB float32 [out]) of a ``Linear8bitLt``: CB is the weight's data;
    SCB is on the weight until bitsandbytes' first forward moves it to ``state.SCB``."""
    scb = getattr(base.weight, "SCB", None)
    if scb is None:
        scb = base.state.SCB
    return base.weight.data, scb


class LoraLinear8bit(LoraLayer):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8, ``has_fp16_weights=False``).

    The forward runs ``peftcore::lora_linear_int8`` on CB / SCB in x's dtype. The layer's
    ``threshold`` (outlier decomposition) plays no part: peftcore computes against the exact
    dequantized weight CB·SCB/127, which is what the outlier path approximates."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.__dict__.update(in_features=base_layer.in_features, out_features=base_layer.out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        cb, scb = int8_state(base)
        lora_A, lora_B = self._lists()
        return torch.ops.peftcore.lora_linear_int8(
            x, cb, scb, base.bias, lora_A, lora_B, self.lora_scales, self._dropped(x)
        )


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
