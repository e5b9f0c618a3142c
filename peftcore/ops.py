"""Typed entry points of the peftcore ops (schemas in ``_ops.py``, math in ``reference.py``).

For callers outside the adapter layers; ``layers.py`` calls ``torch.ops.peftcore.*``
directly, one Python call fewer on every forward. Every forward op takes ``out=``: the
result is then written into that buffer (see ``_call``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _list(tensors):
    return None if tensors is None else list(tensors)


def _call(op, out, *args):
    """The functional op, or (out given) its ``.out`` overload writing the result into
    ``out``, a buffer of the result's exact shape, dtype and device (never resized: for
    CUDA graphs and other static buffers; inference only). Returns the result."""
    if out is None:
        return op(*args)
    op.out(*args, out=out)
    return out


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]] = None,
    *,
    lora_E: Optional[Sequence[torch.Tensor]] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``x·Wᵀ + b + Σ_a scales[a]·((x·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ`` (E_a = 1 without lora_E).

    x [..., in]; weight [out, in] (a transposed view for Conv1D); bias [out] or None;
    lora_A[a] [r_a, in]; lora_B[a] [out, r_a] (float32 or x.dtype); scales float32 [n]
    (0 = adapter off, skipped); lora_x: optional per-adapter LoRA inputs (dropout);
    lora_E: AdaLoRA's singular values, r_a per adapter ([r_a, 1], PEFT's layout).
    Returns [..., out] in x.dtype. See ``reference.lora_linear`` for the exact numerics.
    """
    return _call(torch.ops.peftcore.lora_linear, out, x, weight, bias, list(lora_A), list(lora_B), _list(lora_E),
                 scales, _list(lora_x))


def adalora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_E: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """AdaLoRA's ``x·Wᵀ + b + Σ_a scales[a]·((x·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ``: ``lora_linear`` with
    ``lora_E``, in PEFT's argument order (A, E, B). scales[a] = scaling / (ranknum + 1e-5)
    as PEFT divides (0 = adapter off)."""
    return lora_linear(x, weight, bias, lora_A, lora_B, scales, lora_x, lora_E=lora_E, out=out)


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: Sequence[torch.Tensor],
    active: Optional[torch.Tensor] = None,
    feedforward: bool = False,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PEFT's (IA)³ linear layer: ``round(float(x·Wᵀ + b) ⊙ l)``, or with feedforward
    ``round(float(x) ⊙ l)·Wᵀ + b``, l = Π of the active ia3_l vectors.

    ia3_l[a]: PEFT's (out, 1) / (1, in) vectors (float32 or x.dtype); active: float32 [n],
    nonzero = on (default: all on). Bit for bit PEFT's forward (``reference.ia3_linear``).
    """
    if active is None:
        active = torch.ones(len(ia3_l))
    return _call(torch.ops.peftcore.ia3_linear, out, x, weight, bias, list(ia3_l), active, feedforward)


def lora_embedding(
    indices: torch.Tensor,
    weight: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    padding_idx: int = -1,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``W[idx] + Σ_a scales[a]·(A_aᵀ[idx]·B_aᵀ)``.

    indices integer [...]; weight [V, D]; lora_A[a] [r_a, V]; lora_B[a] [D, r_a];
    scales float32 [n]. Returns [..., D] in weight.dtype (``reference.lora_embedding``).
    """
    return _call(torch.ops.peftcore.lora_embedding, out, indices, weight, list(lora_A), list(lora_B), scales, padding_idx)


def dequantize_4bit(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    nested_offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes nf4 / fp4 layer, in dtype
    (``reference.dequantize_4bit`` gives the format)."""
    return torch.ops.peftcore.dequantize_4bit(
        qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
        out_features, in_features, dtype,
    )


def lora_linear_4bit(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out_features: int,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]] = None,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    nested_offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
    *,
    lora_E: Optional[Sequence[torch.Tensor]] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``x·Wᵀ + b + Σ_a scales[a]·((x·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ`` over a bitsandbytes 4-bit W,
    read packed (on the CPU never dequantized whole). See ``reference.lora_linear_4bit``."""
    return _call(torch.ops.peftcore.lora_linear_4bit, out,
        x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
        out_features, bias, list(lora_A), list(lora_B), _list(lora_E), scales, _list(lora_x),
    )


def dequantize_int8(weight: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes LLM.int8 layer (CB, SCB), in dtype."""
    return torch.ops.peftcore.dequantize_int8(weight, row_scale, dtype)


def lora_linear_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    row_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]] = None,
    *,
    lora_E: Optional[Sequence[torch.Tensor]] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``x·Wᵀ + b + Σ_a scales[a]·((x·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ`` over a bitsandbytes int8 W
    (CB int8 [out, in], SCB float32 [out]). See ``reference.lora_linear_int8``."""
    return _call(torch.ops.peftcore.lora_linear_int8, out,
        x, weight, row_scale, bias, list(lora_A), list(lora_B), _list(lora_E), scales, _list(lora_x)
    )


def ia3_linear_4bit(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out_features: int,
    bias: Optional[torch.Tensor],
    ia3_l: Sequence[torch.Tensor],
    active: Optional[torch.Tensor] = None,
    feedforward: bool = False,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    nested_offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``ia3_linear`` over a bitsandbytes 4-bit W (the base of ``lora_linear_4bit``),
    the scaling fused into the quantized GEMM. See ``reference.ia3_linear_4bit``."""
    if active is None:
        active = torch.ones(len(ia3_l))
    return _call(torch.ops.peftcore.ia3_linear_4bit, out, 
        x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
        out_features, bias, list(ia3_l), active, feedforward,
    )


def ia3_linear_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    row_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: Sequence[torch.Tensor],
    active: Optional[torch.Tensor] = None,
    feedforward: bool = False,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``ia3_linear`` over a bitsandbytes int8 W (CB int8 [out, in], SCB float32 [out]),
    the scaling fused into the quantized GEMM. See ``reference.ia3_linear_int8``."""
    if active is None:
        active = torch.ones(len(ia3_l))
    return _call(torch.ops.peftcore.ia3_linear_int8, out, x, weight, row_scale, bias, list(ia3_l), active, feedforward)
