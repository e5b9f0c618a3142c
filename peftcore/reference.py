"""Readable pure-PyTorch versions of every peftcore op.

Each function here is three things at once:
  * the specification of the op (shapes, dtypes, rounding),
  * the oracle that tests compare the C++ kernels against,
  * the fallback kernel registered for devices (or builds) without a native one.

Numerics follow PEFT's unmerged forward (``peft/tuners/lora/layer.py``): the base
output is computed in the input dtype, the low-rank branch in float32 (float64 for
float64 inputs), the two are added in that precision and the sum is cast back to the input dtype once.
AdaLoRA is the same op with ``lora_E``: the singular values E scale x·Aᵀ per rank;
(IA)³ (``ia3_linear*``) follows ``peft/tuners/ia3/layer.py`` rounding for rounding.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _active(scales: torch.Tensor, lora_A: Sequence[torch.Tensor]) -> list[tuple[int, float]]:
    # An adapter with scale 0 (inactive or disabled) contributes exactly nothing,
    # even if its weights hold inf/NaN; rank-0 adapters (AdaLoRA pruning) likewise.
    vals = scales.detach().float().cpu().tolist()
    return [(a, s) for a, s in enumerate(vals) if s != 0.0 and lora_A[a].shape[0] > 0]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_E: Optional[Sequence[torch.Tensor]],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + Σ_a scales[a] · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ (E_a = 1 without lora_E).

    x: [..., in]; weight: [out, in] (any strides: a transposed view serves Conv1D);
    bias: [out] or None; lora_A[a]: [r_a, in]; lora_B[a]: [out, r_a]; scales: float32 [n];
    lora_x: None, or one tensor shaped like x per adapter (the dropped-out LoRA input).
    lora_E: None (LoRA), or AdaLoRA's r_a singular values per adapter ([r_a, 1] as PEFT
    stores them; any shape of r_a values), scaling the shrink result per rank. PEFT's
    ``SVDLinear`` computes ``x @ (A*E).T @ B.T * scaling / (ranknum + 1e-5)``: the caller
    passes scales[a] = scaling / (ranknum + 1e-5), so this matches PEFT up to rounding (E
    is applied to x·Aᵀ, not to A). Adapter tensors are float32 or x.dtype. Returns
    x.dtype, shape [..., out].
    """
    return _add_lowrank(F.linear(x, weight, bias), x, lora_A, lora_B, lora_E, scales, lora_x)


def _add_lowrank(out, x, lora_A, lora_B, lora_E, scales, lora_x):
    """out (the base output, already in x.dtype) + Σ_a s_a·((x_a·A_aᵀ) ⊙ E_a)·B_aᵀ, summed
    in float32 (float64 for float64 x) and cast back to x.dtype once."""
    terms = _active(scales, lora_A)
    if not terms:
        return out
    f = _acc(x)
    acc = out.to(f)
    for a, s in terms:
        xa = x if lora_x is None else lora_x[a]
        t = xa.to(f) @ lora_A[a].to(f).t()
        if lora_E is not None:
            t = t * lora_E[a].to(f).reshape(-1)
        acc = acc + (t @ lora_B[a].to(f).t()) * s
    return acc.to(x.dtype)


def ia3_vector(ia3_l: Sequence[torch.Tensor], active: torch.Tensor, f: torch.dtype) -> Optional[torch.Tensor]:
    """l = Π_{a: active[a] != 0} ia3_l[a] (flattened), multiplied in adapter order in f;
    None when no adapter is active. Inactive vectors (NaN allowed) are never read."""
    on = [a for a, v in enumerate(active.detach().float().cpu().tolist()) if v != 0.0]
    if not on:
        return None
    l = ia3_l[on[0]].reshape(-1).to(f)
    for a in on[1:]:
        l = l * ia3_l[a].reshape(-1).to(f)
    return l


def _ia3(x, base, ia3_l, active, feedforward):
    """PEFT's (IA)³ forward around ``base`` (x -> base layer output in x.dtype)."""
    f = _acc(x)
    l = ia3_vector(ia3_l, active, f)
    if l is None:
        return base(x)
    if feedforward:  # PEFT: base_layer((x.to(l.dtype) * l).to(x.dtype))
        return base((x.to(f) * l).to(x.dtype))
    return (base(x).to(f) * l).to(x.dtype)  # PEFT: (base_layer(x) * l).to(result dtype)


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: Sequence[torch.Tensor],
    active: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """PEFT's (IA)³ ``Linear``, unmerged, with l = Π_{a: active[a] != 0} ia3_l[a]:

      feedforward=False: y = round_x(float(x·Wᵀ + b) ⊙ l)   (l over outputs; the bias is scaled)
      feedforward=True:  y = round_x(float(x) ⊙ l)·Wᵀ + b   (l over inputs)

    x [..., in]; weight [out, in] (any strides); bias [out] or None; ia3_l[a]: out (in)
    values, any shape (PEFT: (out, 1), or (1, in) for feedforward), float32 or x.dtype;
    active: float32 [n], entry != 0 = adapter a takes part. l and the product with it are
    float32 (float64 for float64 x), rounded to x.dtype once: PEFT's roundings, bit for
    bit for float32 adapters. No active adapter: exactly F.linear(x, weight, bias).
    """
    return _ia3(x, lambda t: F.linear(t, weight, bias), ia3_l, active, feedforward)


def lora_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]],
    output_mask: Sequence[bool],
):
    """Gradients of ``lora_linear``.

    output_mask = [x, weight, bias, adapters]. Returns
    (grad_x, grad_weight, grad_bias, grad_lora_A[], grad_lora_B[], grad_lora_x[]);
    an output not asked for is an empty tensor (lists are empty). grad_lora_x is
    empty unless lora_x was given. Inactive adapters get zero gradients.
    The base's products run in the base dtype, as ``F.linear``'s backward runs them (a
    bf16 / fp16 GEMM accumulates in float32 inside the library, its result rounded once;
    W is never copied to float32); the adapter terms are computed in float32 and added to
    the base's input gradient there; each gradient is returned in its input's dtype.
    """
    want_x, want_w, want_b, want_ad = output_mask
    in_f = x.shape[-1]
    out_f = grad_out.shape[-1]
    f = _acc(x)
    go = grad_out.reshape(-1, out_f)  # x's dtype, as W
    g = go.to(f)
    x2 = x.reshape(-1, in_f)
    # A fresh empty tensor per output not asked for: outputs of an op must not alias.
    gx = (go @ weight).to(f) if want_x else None
    gw = go.t() @ x2 if want_w else x.new_empty(0)
    gb = g.sum(0).to(grad_out.dtype) if want_b else x.new_empty(0)
    gA: list[torch.Tensor] = []
    gB: list[torch.Tensor] = []
    gxa: list[torch.Tensor] = []
    active = dict(_active(scales, lora_A))
    for a in range(len(lora_A)):
        A, B = lora_A[a], lora_B[a]
        xa2 = x2 if lora_x is None else lora_x[a].reshape(-1, in_f)
        s = active.get(a)
        if s is None:
            if want_ad:
                gA.append(A.new_zeros(A.shape))
                gB.append(B.new_zeros(B.shape))
            if lora_x is not None:
                gxa.append(lora_x[a].new_zeros(lora_x[a].shape))
            continue
        t = xa2.to(f) @ A.to(f).t()  # [n, r]
        gt = (g @ B.to(f)) * s  # [n, r]
        if want_ad:
            gA.append((gt.t() @ xa2.to(f)).to(A.dtype))
            gB.append(((g.t() @ t) * s).to(B.dtype))
        contrib = gt @ A.to(f)
        if lora_x is not None:
            gxa.append(contrib.reshape(lora_x[a].shape).to(lora_x[a].dtype))
        elif want_x:
            gx = gx + contrib
    gx = gx.reshape(x.shape).to(x.dtype) if want_x else x.new_empty(0)
    return gx, gw, gb, gA, gB, gxa


def lora_embedding(
    indices: torch.Tensor,
    weight: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    padding_idx: int = -1,
) -> torch.Tensor:
    """y = W[idx] + Σ_a scales[a] · (A_aᵀ[idx] · B_aᵀ), PEFT's LoRA ``Embedding``.

    indices: integer [...]; weight: [V, D]; lora_A[a]: [r_a, V]; lora_B[a]: [D, r_a];
    scales: float32 [n]. No dropout (PEFT applies none on embeddings). padding_idx
    (-1 = none) only matters for gradients: rows at padding_idx get none, as in
    ``F.embedding``. Returns weight.dtype, shape [..., D]; the sum is taken in
    float32 and cast back once.
    """
    out = F.embedding(indices, weight)
    terms = _active(scales, lora_A)
    if not terms:
        return out
    f = _acc(weight)
    acc = out.to(f)
    for a, s in terms:
        t = F.embedding(indices, lora_A[a].to(f).t())  # [..., r]
        acc = acc + (t @ lora_B[a].to(f).t()) * s
    return acc.to(weight.dtype)


def lora_embedding_backward(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: torch.Tensor,
    padding_idx: int,
    output_mask: Sequence[bool],
):
    """Gradients of ``lora_embedding``: (grad_weight, grad_lora_A[], grad_lora_B[]).

    output_mask = [weight, adapters]; an output not asked for is empty. Rows at
    padding_idx receive no gradient (in W, and in the matching column of each A).
    """
    want_w, want_ad = output_mask
    V, D = weight.shape
    idx = indices.reshape(-1)
    f = _acc(weight)
    g = grad_out.reshape(-1, D).to(f)
    # F.embedding(padding_idx=p) stops gradients into row p of the table it reads:
    # W's row, and (PEFT passes padding_idx to the A lookup too) A's column p.
    # B still sees the padding tokens' activations.
    g_tab = g if padding_idx < 0 else g * (idx != padding_idx).unsqueeze(1).to(g.dtype)
    if want_w:
        gw = torch.zeros(V, D, dtype=f, device=weight.device).index_add_(0, idx, g_tab).to(weight.dtype)
    else:
        gw = weight.new_empty(0)
    gA: list[torch.Tensor] = []
    gB: list[torch.Tensor] = []
    if want_ad:
        active = dict(_active(scales, lora_A))
        for a in range(len(lora_A)):
            A, B = lora_A[a], lora_B[a]
            s = active.get(a)
            if s is None:
                gA.append(A.new_zeros(A.shape))
                gB.append(B.new_zeros(B.shape))
                continue
            t = A.to(f).t()[idx]  # [n, r]
            gt = (g_tab @ B.to(f)) * s  # [n, r]
            gAt = torch.zeros(V, A.shape[0], dtype=f, device=A.device).index_add_(0, idx, gt)
            gA.append(gAt.t().to(A.dtype).contiguous())  # every grad is contiguous (see _ops' fake kernels)
            gB.append(((g.t() @ t) * s).to(B.dtype))
    return gw, gA, gB


# ------------------------------------------------------ bitsandbytes-quantized bases
# The stored formats are bitsandbytes' own (see peft-format / bitsandbytes'
# functional.py); these functions decode them from the definitions, without calling
# bitsandbytes, so that bitsandbytes' dequantize can serve as an independent oracle.


def dequantize_4bit(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    nested_offset: Optional[torch.Tensor],
    nested_blocksize: int,
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes 4-bit (nf4 / fp4) layer.

    qweight: the packed bytes (any shape / storage dtype; viewed as uint8), row-major
    W flattened, two codes per byte, the *high* nibble first. code: float32 [16], the
    value of each 4-bit code. Element i belongs to block i // blocksize (blocks run
    over the flattened weight, so they may straddle rows) and is code[q_i]·absmax[block].
    absmax: float32 [n_blocks]; or, with double quantization (nested_* given), uint8
    codes with absmax[b] = nested_code[q_b]·nested_absmax[b // nested_blocksize] + nested_offset
    (float32). W = code·absmax in float32 (float64 if dtype is float64), returned in dtype.
    """
    f = torch.float64 if dtype == torch.float64 else torch.float32
    n = out_features * in_features
    q = qweight.reshape(-1).view(torch.uint8)
    idx = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[:n].long()
    # Block scales are float32 values, as bitsandbytes resolves them (in float32,
    # multiply then add), whatever the output dtype.
    if nested_absmax is not None:
        qa = absmax.reshape(-1).long()
        nb = torch.arange(qa.numel(), device=qa.device) // nested_blocksize
        scale = nested_code.float()[qa] * nested_absmax.float().reshape(-1)[nb] + nested_offset.float()
    else:
        scale = absmax.float().reshape(-1)
    scale = scale.to(f)
    blk = torch.arange(n, device=q.device) // blocksize
    w = code.to(f)[idx] * scale[blk]
    return w.reshape(out_features, in_features).to(dtype)


def lora_linear_4bit(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    nested_offset: Optional[torch.Tensor],
    nested_blocksize: int,
    out_features: int,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_E: Optional[Sequence[torch.Tensor]],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + Σ_a scales[a]·((x_a·A_aᵀ) ⊙ E_a)·B_aᵀ with W = dequantize_4bit(...).

    The specification: the base product is taken against the exact float32 W with
    float32 accumulation (+ bias in float32) and rounded to x.dtype once; the
    low-rank terms are then added as in ``lora_linear``. Native kernels may round x
    and W to bfloat16 for the products when x is bfloat16 / float16 (see the README's
    accuracy contract); for float32 x they match this to float32 rounding.
    """
    f = _acc(x)
    w = dequantize_4bit(
        qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
        out_features, x.shape[-1], f,
    )
    base = F.linear(x.to(f), w, None if bias is None else bias.to(f)).to(x.dtype)
    return _add_lowrank(base, x, lora_A, lora_B, lora_E, scales, lora_x)


def dequantize_int8(weight: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes LLM.int8 layer: W[o, i] = CB[o, i]·SCB[o]/127
    (bitsandbytes multiplies by the float32 constant 1/127 = 7.874015718698502e-3).
    weight: int8 [out, in]; row_scale: float32 [out] (SCB, each row's absmax)."""
    f = torch.float64 if dtype == torch.float64 else torch.float32
    inv127 = torch.tensor(7.874015718698502e-3, dtype=torch.float32).to(f)
    return (weight.to(f) * row_scale.to(f).reshape(-1, 1) * inv127).to(dtype)


def lora_linear_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    row_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_E: Optional[Sequence[torch.Tensor]],
    scales: torch.Tensor,
    lora_x: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + Σ_a scales[a]·((x_a·A_aᵀ) ⊙ E_a)·B_aᵀ with W = dequantize_int8(weight, row_scale).

    Same numerics as ``lora_linear_4bit``: exact float32 W, float32 accumulation,
    one rounding of the base to x.dtype, then the low-rank terms.
    """
    f = _acc(x)
    w = dequantize_int8(weight, row_scale, f)
    base = F.linear(x.to(f), w, None if bias is None else bias.to(f)).to(x.dtype)
    return _add_lowrank(base, x, lora_A, lora_B, lora_E, scales, lora_x)


def ia3_linear_4bit(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    nested_offset: Optional[torch.Tensor],
    nested_blocksize: int,
    out_features: int,
    bias: Optional[torch.Tensor],
    ia3_l: Sequence[torch.Tensor],
    active: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """``ia3_linear``'s scaling around the base of ``lora_linear_4bit`` (no adapters)."""
    quant = (qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize)
    none = torch.zeros(0)

    def base(t):
        return lora_linear_4bit(t, *quant, out_features, bias, [], [], None, none, None)

    return _ia3(x, base, ia3_l, active, feedforward)


def ia3_linear_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    row_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: Sequence[torch.Tensor],
    active: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """``ia3_linear``'s scaling around the base of ``lora_linear_int8`` (no adapters)."""
    none = torch.zeros(0)
    return _ia3(x, lambda t: lora_linear_int8(t, weight, row_scale, bias, [], [], None, none, None), ia3_l, active,
                feedforward)


# ---------------------------------------------------------------- mixed batches
# One adapter per row group (inference only): the spec is "each group alone, with its
# adapter as the only active one" — exactly what a mixed batch must equal.
def _row_groups(x: torch.Tensor, rows: torch.Tensor, n_slots: int) -> list[tuple[int, int, int]]:
    """[(slot, first row, end row)] over x's leading rows (flattened): rows.numel() = G
    consecutive groups of equal size, group g using adapter slot rows[g] (-1 = the base)."""
    M = math.prod(x.shape[:-1])
    slots = rows.detach().cpu().long().tolist()
    G = len(slots)
    if G == 0 or M % G:
        raise ValueError(f"x has {M} rows but rows holds {G} adapter indices; expected G >= 1 dividing the rows")
    bad = [s for s in slots if not -1 <= s < n_slots]
    if bad:
        raise ValueError(f"rows holds {bad}, not adapter slots of {n_slots} adapters (or -1)")
    per = M // G
    return [(s, g * per, (g + 1) * per) for g, s in enumerate(slots)]


def _per_group(x: torch.Tensor, rows: torch.Tensor, n_slots: int, out_features: int, run) -> torch.Tensor:
    """y [..., out_features]: run(i0, i1, slot) computes rows [i0, i1) of y (x's dtype)."""
    M = math.prod(x.shape[:-1])
    y = x.new_empty(M, out_features)
    for s, i0, i1 in _row_groups(x, rows, n_slots):
        y[i0:i1] = run(i0, i1, s)
    return y.reshape(*x.shape[:-1], out_features)


def _only(n: int, slot: int, value: float) -> torch.Tensor:
    """Scales / active flags with slot's entry alone set (none for slot -1)."""
    s = torch.zeros(n, dtype=torch.float32)
    if slot >= 0:
        s[slot] = value
    return s


def _rows_of(t: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])[i0:i1]


def lora_linear_mixed(x, weight, bias, lora_A, lora_B, lora_E, scales, rows):
    """Row group g of x gets ``lora_linear`` with adapter rows[g] alone at its scale
    scales[rows[g]]; rows[g] = -1: the base alone.
    rows: int [G], G dividing x's leading rows (consecutive groups of equal size)."""
    sc = scales.detach().float().cpu().tolist()
    n = len(lora_A)

    def run(i0, i1, s):
        one = _only(n, s, sc[s] if s >= 0 else 0.0)
        return lora_linear(_rows_of(x, i0, i1), weight, bias, lora_A, lora_B, lora_E, one)

    return _per_group(x, rows, n, weight.shape[0], run)


def ia3_linear_mixed(x, weight, bias, ia3_l, rows, feedforward):
    """Row group g of x gets ``ia3_linear`` with vector rows[g] alone (-1: the base alone)."""
    n = len(ia3_l)
    return _per_group(x, rows, n, weight.shape[0], lambda i0, i1, s: ia3_linear(
        _rows_of(x, i0, i1), weight, bias, ia3_l, _only(n, s, 1.0), feedforward))


def lora_linear_4bit_mixed(x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                           nested_blocksize, out_features, bias, lora_A, lora_B, lora_E, scales, rows, lora_x):
    """``lora_linear_4bit`` per row group, as ``lora_linear_mixed``; lora_x (x's shape, or
    None) is what the LoRA terms read instead of x (the 4-bit layers' narrower compute dtype)."""
    quant = (qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize)
    sc = scales.detach().float().cpu().tolist()
    n = len(lora_A)

    def run(i0, i1, s):
        one = _only(n, s, sc[s] if s >= 0 else 0.0)
        lx = None if lora_x is None else [_rows_of(lora_x, i0, i1)] * n
        return lora_linear_4bit(_rows_of(x, i0, i1), *quant, out_features, bias, lora_A, lora_B, lora_E, one, lx)

    return _per_group(x, rows, n, out_features, run)


def lora_linear_int8_mixed(x, weight, row_scale, bias, lora_A, lora_B, lora_E, scales, rows):
    """``lora_linear_int8`` per row group, as ``lora_linear_mixed``."""
    sc = scales.detach().float().cpu().tolist()
    n = len(lora_A)
    return _per_group(x, rows, n, weight.shape[0], lambda i0, i1, s: lora_linear_int8(
        _rows_of(x, i0, i1), weight, row_scale, bias, lora_A, lora_B, lora_E, _only(n, s, sc[s] if s >= 0 else 0.0)))


def ia3_linear_4bit_mixed(x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                          nested_blocksize, out_features, bias, ia3_l, rows, feedforward):
    """``ia3_linear_4bit`` per row group, as ``ia3_linear_mixed``."""
    quant = (qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize)
    n = len(ia3_l)
    return _per_group(x, rows, n, out_features, lambda i0, i1, s: ia3_linear_4bit(
        _rows_of(x, i0, i1), *quant, out_features, bias, ia3_l, _only(n, s, 1.0), feedforward))


def ia3_linear_int8_mixed(x, weight, row_scale, bias, ia3_l, rows, feedforward):
    """``ia3_linear_int8`` per row group, as ``ia3_linear_mixed``."""
    n = len(ia3_l)
    return _per_group(x, rows, n, weight.shape[0], lambda i0, i1, s: ia3_linear_int8(
        _rows_of(x, i0, i1), weight, row_scale, bias, ia3_l, _only(n, s, 1.0), feedforward))
