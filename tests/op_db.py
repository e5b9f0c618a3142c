"""The single source of op samples for the op tests.

Every ``peftcore::`` op has an ``OpInfo`` in ``OPS``: the op, its reference.py
version, and a generator of ``SampleInput``s over small and awkward shapes (rank 1,
odd in/out, batch 1, empty batch, 3-D inputs, non-contiguous x, transposed weight
views, 0/1/3 adapters of different ranks, a rank-0 adapter, a scale-0 adapter full of
NaN, per-adapter lora_x, ...; for (IA)³ both directions, inactive vectors full of NaN,
entries 0). The quantized-base ops (``dequantize_4bit``, ``lora_linear_4bit``,
``dequantize_int8``, ``lora_linear_int8``) get weights quantized by bitsandbytes itself,
over odd shapes, every blocksize from 32 to 4096 (blocks straddling rows, a block larger
than the weight), nf4 / fp4, nested statistics or not (bitsandbytes is a test dependency: without it
the run fails, see tests/conftest.py). Generators take the compute dtype, the adapter dtype
(float32 or the compute dtype) and whether the differentiable inputs require grad.
Samples are deterministic (seeded per case).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

import peftcore  # noqa: F401  (registers the ops)
from peftcore import reference
from peftcore._ops import OPS as OP_TABLE

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_combos() -> list[tuple[torch.dtype, torch.dtype]]:
    """(compute dtype, adapter dtype): adapters in float32 (PEFT's default) or the model dtype."""
    return [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
    ]


@dataclass
class SampleInput:
    name: str
    args: tuple  # positional arguments in schema order
    # Properties the tests key on:
    all_scales_zero: bool = False  # the output must equal the base op bit for bit
    n_elements: int = 0  # total elements of the differentiable inputs (gradcheck cost)
    meta: dict = field(default_factory=dict)

    def __repr__(self):
        return f"SampleInput({self.name})"


@dataclass
class OpInfo:
    name: str
    op: Callable  # torch.ops.peftcore.<name>
    ref: Callable  # reference.<name>
    sample_inputs: Callable[..., Iterator[SampleInput]]
    differentiable: bool  # has an autograd formula (the forward ops)


def _gen(name: str, dtype: torch.dtype) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{name}:{dtype}".encode()))


def _randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _scales(g, n, zero=()):
    # magnitudes around 1 with mixed signs, like alpha/r in practice (and negative for edge)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.5
    s = torch.where(torch.rand(n, generator=g) < 0.3, -s, s).float()
    for i in zero:
        s[i] = 0.0
    return s


# ------------------------------------------------------------------ lora_linear
# name: (leading dims of x, in, out, adapter ranks, options)
LINEAR_CASES = {
    "basic": ((5,), 16, 24, (4,), {}),
    "rank1_odd_7x13": ((3,), 7, 13, (1,), {"bias": False}),
    "3adapters_3d_33x65": ((2, 3), 33, 65, (8, 2, 5), {}),
    "decode_batch1": ((1,), 64, 80, (16,), {}),
    "x_1d": ((), 16, 8, (4,), {}),
    "empty_batch": ((0,), 16, 8, (4,), {}),
    "empty_3d": ((2, 0), 16, 8, (4, 2), {}),
    "noncontig_x": ((6,), 16, 12, (4, 3), {"noncontig_x": True}),
    "conv1d_weight_view": ((4,), 20, 28, (4,), {"weight_t": True}),
    "no_adapters": ((3,), 16, 24, (), {}),
    "rank0_adapter": ((3,), 16, 24, (4, 0, 2), {}),
    "scale0_nan_adapter": ((3,), 16, 24, (4, 3), {"zero": (1,), "nan": (1,)}),
    "lora_x": ((2, 3), 16, 24, (4, 2), {"lora_x": True}),
    "all_scales_zero": ((5,), 16, 24, (4, 4), {"zero": (0, 1)}),
    "blocked_37x257x300": ((37,), 257, 300, (16, 8), {}),
    # One row with a costly shrink (rows·R·in >= 32768): on 2+ threads T is computed by all
    # threads first (lowrank_parallel.h), split by ranks on 8-rank boundaries (here inside
    # the middle adapter), or, with a single 8-rank block, by in_features.
    "decode_split_ranks_1x1400x50": ((1,), 1400, 50, (6, 13, 9), {}),
    "decode_split_in_1x4200x70": ((1,), 4200, 70, (8,), {"bias": False}),
}


def _lora_linear_plain(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight, bias, lora_A, lora_B, lora_E = None, scales, lora_x)."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, ranks, o) in LINEAR_CASES.items():
        g = _gen(name, dtype)
        if o.get("noncontig_x"):
            x = _randn(g, fin, *lead, dtype=dtype).movedim(0, -1)  # [.., in] with stride(-1) != 1
            assert not x.is_contiguous()
        else:
            x = _randn(g, *lead, fin, dtype=dtype)
        if o.get("weight_t"):  # GPT-2 Conv1D stores [in, out]; the op gets the transposed view
            w_base = _randn(g, fin, fout, dtype=dtype, scale=fin**-0.5).requires_grad_(requires_grad)
            weight = w_base.t()
        else:
            weight = _randn(g, fout, fin, dtype=dtype, scale=fin**-0.5).requires_grad_(requires_grad)
        bias = _randn(g, fout, dtype=dtype).requires_grad_(requires_grad) if o.get("bias", True) else None
        lora_A, lora_B = [], []
        for a, r in enumerate(ranks):
            A = _randn(g, r, fin, dtype=adapter_dtype, scale=fin**-0.5)
            B = _randn(g, fout, r, dtype=adapter_dtype, scale=max(r, 1) ** -0.5)
            if a in o.get("nan", ()):
                A.fill_(float("nan"))
                B.fill_(float("nan"))
            lora_A.append(A.requires_grad_(requires_grad))
            lora_B.append(B.requires_grad_(requires_grad))
        scales = _scales(g, len(ranks), o.get("zero", ()))
        lora_x = None
        if o.get("lora_x"):
            lora_x = [_randn(g, *x.shape, dtype=dtype).requires_grad_(requires_grad) for _ in ranks]
        x.requires_grad_(requires_grad)
        n_el = x.numel() * (1 + len(ranks) * bool(lora_x)) + weight.numel() + sum(
            t.numel() for t in (*lora_A, *lora_B)
        )
        yield SampleInput(
            name,
            (x, weight, bias, lora_A, lora_B, None, scales, lora_x),
            all_scales_zero=bool(ranks) and len(o.get("zero", ())) == len(ranks),
            n_elements=n_el,
        )


LINEAR_MASKS = ([True, True, True, True], [False, True, False, True], [True, False, True, False])


def sample_lora_linear_backward(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    for s in _lora_linear_plain(dtype, adapter_dtype, requires_grad=False):
        x, weight, bias, lora_A, lora_B, _, scales, lora_x = s.args
        g = _gen("grad:" + s.name, dtype)
        grad_out = _randn(g, *x.shape[:-1], weight.shape[0], dtype=dtype)
        for mask in LINEAR_MASKS:
            tag = "".join("xwba"[i] if m else "-" for i, m in enumerate(mask))
            yield SampleInput(
                f"{s.name}[{tag}]",
                (grad_out, x, weight, lora_A, lora_B, scales, lora_x, list(mask)),
                all_scales_zero=s.all_scales_zero,
            )


# ------------------------------------------------- lora_E (AdaLoRA) on the LoRA ops
# Every LoRA op takes AdaLoRA's singular values as its optional lora_E: each adapter's r
# values ([r, 1], PEFT's layout), signs mixed and one exactly 0 (a pruned rank) where
# r > 2, NaN with a NaN adapter. The "adalora_<case>" samples are the plain cases with E.


def _lora_E(g, lora_A, adapter_dtype, requires_grad):
    lora_E = []
    for A in lora_A:
        E = _randn(g, A.shape[0], 1, dtype=adapter_dtype)
        if A.shape[0] > 2:
            E[1] = 0.0
        if torch.isnan(A).any():
            E.fill_(float("nan"))
        lora_E.append(E.requires_grad_(requires_grad))
    return lora_E


def _and_adalora(samples, e, dtype, adapter_dtype, requires_grad, cases=None):
    """Each sample, then (for the names in `cases`, default all) the same with lora_E, the
    argument at position `e` (after lora_A, lora_B), which the plain sample leaves None."""
    for s in samples:
        yield s
        if cases is not None and s.name not in cases:
            continue
        args = list(s.args)
        assert args[e] is None and isinstance(args[e - 2], list), s.name
        lora_E = _lora_E(_gen("E:" + s.name, dtype), args[e - 2], adapter_dtype or dtype, requires_grad)
        args[e] = lora_E
        yield SampleInput("adalora_" + s.name, tuple(args), all_scales_zero=s.all_scales_zero,
                          n_elements=s.n_elements + sum(E.numel() for E in lora_E), meta=s.meta)


def sample_lora_linear(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Every LINEAR_CASES case, plain and with lora_E."""
    return _and_adalora(_lora_linear_plain(dtype, adapter_dtype, requires_grad), 5, dtype, adapter_dtype,
                        requires_grad)


# ------------------------------------------------------------------- ia3_linear
# name: (leading dims of x, in, out, number of IA3 vectors, options). "ff": feedforward
# (vectors over in_features); "inactive": vectors switched off (active = 0); "nan": vectors
# full of NaN (always inactive ones); "flat": 1-D vectors instead of PEFT's (out, 1) / (1, in);
# "zeros": a few entries exactly 0 (the backward must not divide by l).
IA3_CASES = {
    "attn_5x16x24": ((5,), 16, 24, 1, {}),
    "ff_5x16x24": ((5,), 16, 24, 1, {"ff": True}),
    "3vectors_odd_7x13": ((3,), 7, 13, 3, {"bias": False}),
    "ff_3vectors_3d_33x65": ((2, 3), 33, 65, 3, {"ff": True}),
    "x_1d": ((), 16, 8, 1, {}),
    "ff_x_1d_2vectors": ((), 16, 8, 2, {"ff": True}),
    "empty_batch": ((0,), 16, 8, 1, {}),
    "ff_empty_3d": ((2, 0), 16, 8, 2, {"ff": True}),
    "noncontig_x": ((6,), 16, 12, 2, {"noncontig_x": True}),
    "ff_noncontig_x": ((6,), 16, 12, 1, {"ff": True, "noncontig_x": True}),
    "conv1d_weight_view": ((4,), 20, 28, 1, {"weight_t": True}),
    "ff_conv1d_weight_view": ((4,), 20, 28, 2, {"ff": True, "weight_t": True}),
    "no_vectors": ((3,), 16, 24, 0, {}),
    "ff_no_vectors": ((3,), 16, 24, 0, {"ff": True}),
    "inactive_nan": ((3,), 16, 24, 3, {"inactive": (1,), "nan": (1,)}),
    "ff_inactive_nan": ((3,), 16, 24, 2, {"ff": True, "inactive": (0,), "nan": (0,)}),
    "all_inactive": ((5,), 16, 24, 2, {"inactive": (0, 1)}),
    "ff_all_inactive_nan": ((5,), 16, 24, 2, {"ff": True, "inactive": (0, 1), "nan": (1,)}),
    "flat_vectors_zeros": ((4,), 16, 24, 2, {"flat": True, "zeros": True}),
    "ff_flat_vectors_zeros": ((4,), 16, 24, 2, {"ff": True, "flat": True, "zeros": True}),
    "blocked_37x257x300": ((37,), 257, 300, 2, {}),
    "ff_blocked_37x257x300": ((37,), 257, 300, 1, {"ff": True}),
}


def _ia3_vectors(g, n, feats, ff, adapter_dtype, o, requires_grad):
    """n IA3 vectors around 1 (PEFT initialises them to ones) and the active flags."""
    vecs = []
    for a in range(n):
        v = 1.0 + _randn(g, feats, dtype=torch.float64, scale=0.3)
        if o.get("zeros"):
            v[:: max(1, feats // 3)] = 0.0
        if a in o.get("nan", ()):
            v.fill_(float("nan"))
        shape = (feats,) if o.get("flat") else ((1, feats) if ff else (feats, 1))
        vecs.append(v.reshape(shape).to(adapter_dtype).requires_grad_(requires_grad))
    # any nonzero value means "on" (0.5 checks it is a flag, not a factor)
    active = torch.tensor([0.0 if a in o.get("inactive", ()) else (0.5 if a == 2 else 1.0) for a in range(n)])
    return vecs, active


def sample_ia3_linear(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight, bias, ia3_l, active, feedforward)."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, n, o) in IA3_CASES.items():
        g = _gen("ia3:" + name, dtype)
        x = _x(g, lead, fin, dtype, o)
        if o.get("weight_t"):  # GPT-2 Conv1D stores [in, out]; the op gets the transposed view
            weight = _randn(g, fin, fout, dtype=dtype, scale=fin**-0.5).requires_grad_(requires_grad).t()
        else:
            weight = _randn(g, fout, fin, dtype=dtype, scale=fin**-0.5).requires_grad_(requires_grad)
        bias = _randn(g, fout, dtype=dtype).requires_grad_(requires_grad) if o.get("bias", True) else None
        ff = o.get("ff", False)
        vecs, active = _ia3_vectors(g, n, fin if ff else fout, ff, adapter_dtype, o, requires_grad)
        x.requires_grad_(requires_grad)
        yield SampleInput(
            name,
            (x, weight, bias, vecs, active, ff),
            all_scales_zero=n > 0 and len(o.get("inactive", ())) == n,
            n_elements=x.numel() + weight.numel() + fout + sum(v.numel() for v in vecs),
        )


# --------------------------------------------------------------- lora_embedding
# name: (indices shape, V, D, ranks, options)
EMBEDDING_CASES = {
    "basic": ((4,), 10, 8, (3,), {}),
    "3adapters_2d_idx_pad": ((2, 3), 7, 13, (1, 4, 2), {"padding_idx": 2}),
    "index_0d": ((), 9, 5, (2,), {}),
    "empty": ((0,), 6, 8, (2,), {}),
    "wide_33x65_pad0": ((5, 7), 33, 65, (8,), {"padding_idx": 0}),
    "int32_indices": ((6,), 11, 10, (3,), {"int32": True}),
    "noncontig_weight": ((5,), 12, 9, (2,), {"weight_t": True}),
    "no_adapters": ((4,), 10, 8, (), {}),
    "rank0_adapter": ((4,), 10, 8, (3, 0), {}),
    "scale0_nan_adapter": ((4,), 10, 8, (2, 3), {"zero": (1,), "nan": (1,)}),
    "all_scales_zero": ((4,), 10, 8, (2, 2), {"zero": (0, 1)}),
    "blocked_37x300": ((37,), 50, 300, (16, 8), {"padding_idx": 3}),
}


def sample_lora_embedding(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    adapter_dtype = adapter_dtype or dtype
    for name, (ishape, V, D, ranks, o) in EMBEDDING_CASES.items():
        g = _gen(name, dtype)
        idx = torch.randint(0, V, ishape, generator=g)
        pad = o.get("padding_idx", -1)
        if pad >= 0 and idx.numel() > 1:
            idx.view(-1)[:: max(1, idx.numel() // 3)] = pad  # make sure padding tokens occur
        if o.get("int32"):
            idx = idx.int()
        if o.get("weight_t"):
            weight = _randn(g, D, V, dtype=dtype).requires_grad_(requires_grad).t()
        else:
            weight = _randn(g, V, D, dtype=dtype).requires_grad_(requires_grad)
        lora_A, lora_B = [], []
        for a, r in enumerate(ranks):
            A = _randn(g, r, V, dtype=adapter_dtype)
            B = _randn(g, D, r, dtype=adapter_dtype, scale=max(r, 1) ** -0.5)
            if a in o.get("nan", ()):
                A.fill_(float("nan"))
                B.fill_(float("nan"))
            lora_A.append(A.requires_grad_(requires_grad))
            lora_B.append(B.requires_grad_(requires_grad))
        scales = _scales(g, len(ranks), o.get("zero", ()))
        yield SampleInput(
            name,
            (idx, weight, lora_A, lora_B, scales, pad),
            all_scales_zero=bool(ranks) and len(o.get("zero", ())) == len(ranks),
            n_elements=weight.numel() + sum(t.numel() for t in (*lora_A, *lora_B)),
        )


EMBEDDING_MASKS = ([True, True], [True, False], [False, True])


def sample_lora_embedding_backward(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    for s in sample_lora_embedding(dtype, adapter_dtype, requires_grad=False):
        idx, weight, lora_A, lora_B, scales, pad = s.args
        g = _gen("grad:" + s.name, dtype)
        grad_out = _randn(g, *idx.shape, weight.shape[1], dtype=dtype)
        for mask in EMBEDDING_MASKS:
            tag = "".join("wa"[i] if m else "-" for i, m in enumerate(mask))
            yield SampleInput(
                f"{s.name}[{tag}]",
                (grad_out, idx, weight, lora_A, lora_B, scales, pad, list(mask)),
                all_scales_zero=s.all_scales_zero,
            )


# ------------------------------------------------------- bitsandbytes-quantized bases
# The quantized weights are made by bitsandbytes itself (its own packing, block
# scales, nested statistics), so the samples test peftcore against the real format.
# bitsandbytes is a test dependency (tests/conftest.py fails the run without it).


def bnb_functional():
    """``bitsandbytes.functional`` (imported once, with its import-time log quieted: it
    reports a CPU kernel hub it cannot reach, which is not our business)."""
    import logging

    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbF
    finally:
        logger.setLevel(level)
    return bnbF


def _quant_weight(g, fout, fin, zero_row=False):
    # A float32 weight with rows of different magnitudes (so row / block scales differ)
    w = torch.randn(fout, fin, generator=g, dtype=torch.float64) * fin**-0.5
    w = w * (0.25 + 1.75 * torch.rand(fout, 1, generator=g, dtype=torch.float64))
    if zero_row and fout > 1:
        w[fout // 2] = 0.0  # an all-zero row: block scale / row scale 0
    return w.float()


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str, nested: bool, quant_storage=torch.uint8):
    """bitsandbytes' own 4-bit quantization of w ([out, in] float32), as the op's
    arguments: dict(qweight, absmax, code, blocksize, nested_absmax, nested_code,
    nested_offset, nested_blocksize) plus ``state`` (bitsandbytes' QuantState)."""
    bnbF = bnb_functional()
    q, st = bnbF.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type, quant_storage=quant_storage
    )
    d = dict(qweight=q, absmax=st.absmax, code=st.code, blocksize=st.blocksize, nested_absmax=None,
             nested_code=None, nested_offset=None, nested_blocksize=256, state=st)
    if nested:
        d.update(nested_absmax=st.state2.absmax, nested_code=st.state2.code,
                 nested_offset=st.offset.reshape(()).float(), nested_blocksize=st.state2.blocksize)
    return d


def quantize_int8(w: torch.Tensor):
    """bitsandbytes' LLM.int8 row-wise quantization of w: (CB int8 [out, in], SCB float32 [out])."""
    CB, SCB, _ = bnb_functional().int8_vectorwise_quant(w.half())
    return CB, SCB


def _adapters(g, o, fin, fout, ranks, adapter_dtype, requires_grad):
    lora_A, lora_B = [], []
    for a, r in enumerate(ranks):
        A = _randn(g, r, fin, dtype=adapter_dtype, scale=fin**-0.5)
        B = _randn(g, fout, r, dtype=adapter_dtype, scale=max(r, 1) ** -0.5)
        if a in o.get("nan", ()):
            A.fill_(float("nan"))
            B.fill_(float("nan"))
        lora_A.append(A.requires_grad_(requires_grad))
        lora_B.append(B.requires_grad_(requires_grad))
    return lora_A, lora_B


def _x(g, lead, fin, dtype, o):
    if o.get("noncontig_x"):
        x = _randn(g, fin, *lead, dtype=dtype).movedim(0, -1)  # [.., in] with stride(-1) != 1
        assert not x.is_contiguous()
        return x
    return _randn(g, *lead, fin, dtype=dtype)


# name: (leading dims of x, in, out, blocksize, quant type, nested, adapter ranks, options)
# Awkward on purpose: the native kernel has SIMD fast paths (out in multiples of 16/32,
# in in multiples of 64, blocks inside a row) and generic tails for everything else.
# "numerics_only": a kernel-path variant (shape / blocksize) that exercises nothing new
# for the schema, fake kernel or autograd registration: tests/ops/test_opcheck.py skips
# it (opcheck costs ~0.15 s a sample), the numerical tests run it.
QUANT4_CASES = {
    "nf4_5x64x24_bs64": ((5,), 64, 24, 64, "nf4", False, (4,), {}),
    "fp4_decode_7x13_bs32": ((1,), 7, 13, 32, "fp4", False, (1,), {"bias": False}),
    "nested_3d_65x33_bs64": ((2, 3), 65, 33, 64, "nf4", True, (8, 2, 5), {}),
    "tiny_1x1_bs64": ((2,), 1, 1, 64, "nf4", False, (1,), {}),  # blocksize > numel, half a byte
    "in1_out100_bs32": ((5,), 1, 100, 32, "fp4", False, (2,), {"numerics_only": True}),
    "straddle_31x3_bs32_fp4_nested": ((5,), 31, 3, 32, "fp4", True, (2,), {"numerics_only": True}),
    "straddle_63x100_bs128_fp4_nested": ((7,), 63, 100, 128, "fp4", True, (4,), {"numerics_only": True}),
    "straddle_100x33_bs256": ((16,), 100, 33, 256, "nf4", False, (3, 5), {"zero_row": True, "numerics_only": True}),
    "straddle_130x13_bs1024_nested": ((2,), 130, 13, 1024, "nf4", True, (2,), {"numerics_only": True}),
    "bs4096_gt_numel_65x3_fp4": ((5,), 65, 3, 4096, "fp4", False, (2,), {"numerics_only": True}),
    "bs4096_256x100_nested_33tok": ((33,), 256, 100, 4096, "nf4", True, (16,), {"numerics_only": True}),
    "nested_800blocks_256x100_bs32": ((5,), 256, 100, 32, "nf4", True, (4,), {"numerics_only": True}),
    # panels whose blocks cross a nested group (256 blocks) at an offset that is not a
    # multiple of 16 (regression: the AVX-512 nested-scale loop skipped such blocks)
    "nested_group_cross_257x300_bs128": ((3,), 257, 300, 128, "nf4", True, (2,), {"numerics_only": True}),
    "fast_16x256x64_bs64": ((16,), 256, 64, 64, "nf4", False, (16, 8), {"numerics_only": True}),
    "fast_3d_512x32_bs128_fp4": ((3, 11), 512, 32, 128, "fp4", False, (8,), {"numerics_only": True}),
    # 150 token rows of 4096: several row blocks (the kernel blocks x by ~512 KB)
    "row_blocks_150tok_4096x13": ((150,), 4096, 13, 64, "nf4", True, (4,), {"numerics_only": True}),
    # 130 token rows: the tiled decode + GEMM path for bf16 products (bf16 x, and float32 x by
    # default; from 12 rows with AMX, 96 without) and exact float32 ones (from 128 rows with
    # AMX), over several ~2 MB tiles of W (256 rows in bf16, 128 in float32) with a tail
    "gemm_tiles_130tok_4096x600": ((130,), 4096, 600, 64, "nf4", True, (4,),
                                   {"numerics_only": True, "forward_only": True}),
    # bf16 products from 3 token rows on (x bf16, and float32 by default): the fused register
    # kernel in groups of <= 4 token rows (7 = 4 + 3, 9 = 3 + 3 + 3), one block per row
    # (bs = K) or several (nested), a tail panel (out % 4) on decode + panel_dot
    "fused_7tok_256x36_bs256": ((7,), 256, 36, 256, "nf4", False, (4,), {"numerics_only": True}),
    "fused_9tok_192x22_bs64_nested_fp4": ((9,), 192, 22, 64, "fp4", True, (2,), {"numerics_only": True}),
    # either side of the tiled GEMM path's first row count without AMX (96) and with it (12)
    "gemm_edge_95tok_128x24": ((95,), 128, 24, 64, "nf4", True, (4,), {"numerics_only": True, "forward_only": True}),
    "gemm_edge_96tok_128x24": ((96,), 128, 24, 64, "nf4", True, (4,), {"numerics_only": True, "forward_only": True}),
    "gemm_edge_11tok_128x24": ((11,), 128, 24, 64, "nf4", False, (4,), {"numerics_only": True}),
    "gemm_edge_12tok_128x24": ((12,), 128, 24, 64, "nf4", False, (4,), {"numerics_only": True}),
    "storage_bf16_64x24": ((2,), 64, 24, 64, "nf4", True, (4,), {"storage": torch.bfloat16}),
    "x_1d": ((), 31, 13, 64, "nf4", False, (2,), {}),
    "empty_batch": ((0,), 64, 16, 64, "nf4", False, (4,), {}),
    "empty_3d": ((2, 0), 64, 16, 64, "fp4", True, (4, 2), {}),
    "noncontig_x": ((6,), 64, 33, 64, "nf4", False, (4, 3), {"noncontig_x": True}),
    "no_adapters": ((3,), 100, 13, 64, "nf4", True, (), {}),
    "rank0_adapter": ((3,), 64, 24, 64, "fp4", False, (4, 0, 2), {}),
    "scale0_nan_adapter": ((3,), 64, 24, 128, "nf4", False, (4, 3), {"zero": (1,), "nan": (1,)}),
    "lora_x": ((2, 3), 64, 24, 64, "nf4", True, (4, 2), {"lora_x": True}),
    "all_scales_zero": ((5,), 64, 24, 64, "nf4", False, (4, 4), {"zero": (0, 1)}),
}


# The dequantize ops have no autograd and one output: opcheck needs only these
# (plain, nested, non-uint8 storage, half a byte); the rest is numerics.
DEQUANT_OPCHECK = {"nf4_5x64x24_bs64", "fp4_decode_7x13_bs32", "nested_3d_65x33_bs64", "tiny_1x1_bs64",
                   "storage_bf16_64x24", "basic_5x64x24", "decode_7x13", "zero_row_64x16"}


def _quant4_case(name, fin, fout, bs, qt, nested, o):
    # The weight depends on the case only (not the compute dtype): same quantized layer
    # seen through every dtype.
    g = _gen("w4:" + name, torch.float32)
    w = _quant_weight(g, fout, fin, o.get("zero_row", False))
    return w, quantize_4bit(w, bs, qt, nested, o.get("storage", torch.uint8))


def _quant4_args(q, fout):
    return (q["qweight"], q["absmax"], q["code"], q["blocksize"], q["nested_absmax"], q["nested_code"],
            q["nested_offset"], q["nested_blocksize"], fout)


# The quantized cases that also run with lora_E (AdaLoRA): the ones where E meets
# something of its own (several adapters and ranks, a pruned rank, NaN, lora_x, rank 0).
QUANT_E_CASES = {"nested_3d_65x33_bs64", "3adapters_3d_65x33", "scale0_nan_adapter", "lora_x", "rank0_adapter",
                 "x_1d"}


def sample_lora_linear_4bit(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Every QUANT4_CASES case, and QUANT_E_CASES with lora_E."""
    return _and_adalora(_lora_linear_4bit_plain(dtype, adapter_dtype, requires_grad), 13, dtype, adapter_dtype,
                        requires_grad, QUANT_E_CASES)


def _lora_linear_4bit_plain(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
    nested_blocksize, out_features, bias, lora_A, lora_B, lora_E = None, scales, lora_x)."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, bs, qt, nested, ranks, o) in QUANT4_CASES.items():
        w, q = _quant4_case(name, fin, fout, bs, qt, nested, o)
        g = _gen(name, dtype)
        x = _x(g, lead, fin, dtype, o)
        bias = _randn(g, fout, dtype=dtype).requires_grad_(requires_grad) if o.get("bias", True) else None
        lora_A, lora_B = _adapters(g, o, fin, fout, ranks, adapter_dtype, requires_grad)
        scales = _scales(g, len(ranks), o.get("zero", ()))
        lora_x = [_randn(g, *x.shape, dtype=dtype).requires_grad_(requires_grad) for _ in ranks] if o.get("lora_x") else None
        x.requires_grad_(requires_grad)
        n_el = x.numel() * (1 + len(ranks) * bool(lora_x)) + (fout if bias is not None else 0) + sum(
            t.numel() for t in (*lora_A, *lora_B)
        )
        yield SampleInput(
            name,
            (x, *_quant4_args(q, fout), bias, lora_A, lora_B, None, scales, lora_x),
            all_scales_zero=bool(ranks) and len(o.get("zero", ())) == len(ranks),
            n_elements=n_el,
            meta=dict(weight=w, state=q["state"], quant_type=qt, in_features=fin,
                      opcheck=not o.get("numerics_only", False), forward_only=o.get("forward_only", False)),
        )


def sample_dequantize_4bit(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
    nested_blocksize, out_features, in_features, dtype); one per distinct quantized weight."""
    seen = set()
    for name, (lead, fin, fout, bs, qt, nested, ranks, o) in QUANT4_CASES.items():
        key = (fin, fout, bs, qt, nested, o.get("storage"), o.get("zero_row", False))
        if key in seen:
            continue
        seen.add(key)
        w, q = _quant4_case(name, fin, fout, bs, qt, nested, o)
        yield SampleInput(
            name,
            (*_quant4_args(q, fout), fin, dtype),
            meta=dict(weight=w, state=q["state"], quant_type=qt, in_features=fin, opcheck=name in DEQUANT_OPCHECK),
        )


# name: (leading dims of x, in, out, adapter ranks, options)
INT8_CASES = {
    "basic_5x64x24": ((5,), 64, 24, (4,), {}),
    "decode_7x13": ((1,), 7, 13, (1,), {"bias": False}),
    "3adapters_3d_65x33": ((2, 3), 65, 33, (8, 2, 5), {}),
    "tiny_1x1": ((2,), 1, 1, (1,), {"numerics_only": True}),
    "31x3": ((5,), 31, 3, (2,), {"numerics_only": True}),
    "63x100_7tok": ((7,), 63, 100, (4,), {"numerics_only": True}),
    "100x33_16tok": ((16,), 100, 33, (3, 5), {"numerics_only": True}),
    "130x13": ((2,), 130, 13, (2,), {"numerics_only": True}),
    "256x100_33tok": ((33,), 256, 100, (16,), {"numerics_only": True}),
    "fast_16x256x64": ((16,), 256, 64, (16, 8), {"numerics_only": True}),
    "fast_3d_512x32": ((3, 11), 512, 32, (8,), {"numerics_only": True}),
    "row_blocks_150tok_4096x13": ((150,), 4096, 13, (4,), {"numerics_only": True}),
    # the tiled decode + GEMM path over several tiles (bf16 products from 48 rows with AMX,
    # 128 without; exact float32 from 128 with AMX)
    "gemm_tiles_130tok_4096x600": ((130,), 4096, 600, (4,), {"numerics_only": True, "forward_only": True}),
    # either side of the tiled GEMM path's first row count without AMX (128) and with it (48);
    # K = 100: the SIMD tile decoder's masked tail
    "gemm_edge_127tok_100x20": ((127,), 100, 20, (4,), {"numerics_only": True, "forward_only": True}),
    "gemm_edge_128tok_100x20": ((128,), 100, 20, (4,), {"numerics_only": True, "forward_only": True}),
    "gemm_edge_48tok_100x20": ((48,), 100, 20, (4,), {"numerics_only": True, "forward_only": True}),
    "zero_row_64x16": ((5,), 64, 16, (2,), {"zero_row": True, "numerics_only": True}),
    "x_1d": ((), 31, 13, (2,), {}),
    "empty_batch": ((0,), 64, 16, (4,), {}),
    "empty_3d": ((2, 0), 64, 16, (4, 2), {}),
    "noncontig_x": ((6,), 64, 33, (4, 3), {"noncontig_x": True}),
    "no_adapters": ((3,), 100, 13, (), {}),
    "rank0_adapter": ((3,), 64, 24, (4, 0, 2), {}),
    "scale0_nan_adapter": ((3,), 64, 24, (4, 3), {"zero": (1,), "nan": (1,)}),
    "lora_x": ((2, 3), 64, 24, (4, 2), {"lora_x": True}),
    "all_scales_zero": ((5,), 64, 24, (4, 4), {"zero": (0, 1)}),
}


def _int8_case(name, fin, fout, o):
    g = _gen("w8:" + name, torch.float32)
    w = _quant_weight(g, fout, fin, o.get("zero_row", False))
    return w, *quantize_int8(w)


def sample_lora_linear_int8(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Every INT8_CASES case, and QUANT_E_CASES with lora_E."""
    return _and_adalora(_lora_linear_int8_plain(dtype, adapter_dtype, requires_grad), 6, dtype, adapter_dtype,
                        requires_grad, QUANT_E_CASES)


def _lora_linear_int8_plain(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight_int8, row_scale, bias, lora_A, lora_B, lora_E = None, scales, lora_x)."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, ranks, o) in INT8_CASES.items():
        w, CB, SCB = _int8_case(name, fin, fout, o)
        g = _gen(name, dtype)
        x = _x(g, lead, fin, dtype, o)
        bias = _randn(g, fout, dtype=dtype).requires_grad_(requires_grad) if o.get("bias", True) else None
        lora_A, lora_B = _adapters(g, o, fin, fout, ranks, adapter_dtype, requires_grad)
        scales = _scales(g, len(ranks), o.get("zero", ()))
        lora_x = [_randn(g, *x.shape, dtype=dtype).requires_grad_(requires_grad) for _ in ranks] if o.get("lora_x") else None
        x.requires_grad_(requires_grad)
        n_el = x.numel() * (1 + len(ranks) * bool(lora_x)) + (fout if bias is not None else 0) + sum(
            t.numel() for t in (*lora_A, *lora_B)
        )
        yield SampleInput(
            name,
            (x, CB, SCB, bias, lora_A, lora_B, None, scales, lora_x),
            all_scales_zero=bool(ranks) and len(o.get("zero", ())) == len(ranks),
            n_elements=n_el,
            meta=dict(weight=w, opcheck=not o.get("numerics_only", False), forward_only=o.get("forward_only", False)),
        )


def sample_dequantize_int8(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (weight_int8, row_scale, dtype); one per distinct quantized weight."""
    seen = set()
    for name, (lead, fin, fout, ranks, o) in INT8_CASES.items():
        key = (fin, fout, o.get("zero_row", False))
        if key in seen:
            continue
        seen.add(key)
        w, CB, SCB = _int8_case(name, fin, fout, o)
        yield SampleInput(name, (CB, SCB, dtype), meta=dict(weight=w, opcheck=name in DEQUANT_OPCHECK))


# (IA)³ over the quantized bases: a few weights of QUANT4_CASES / INT8_CASES' kinds, both
# directions. name: (leading dims, in, out, blocksize, quant type, nested, vectors, options)
IA3_QUANT4_CASES = {
    "nf4_5x64x24_bs64": ((5,), 64, 24, 64, "nf4", False, 1, {}),
    "ff_nf4_5x64x24_bs64": ((5,), 64, 24, 64, "nf4", False, 1, {"ff": True}),
    "ff_fp4_decode_7x13_bs32": ((1,), 7, 13, 32, "fp4", False, 2, {"ff": True, "bias": False}),
    "fp4_decode_2tok_64x32": ((2,), 64, 32, 64, "fp4", True, 1, {}),
    "nested_3d_65x33_bs64_3vectors": ((2, 3), 65, 33, 64, "nf4", True, 3, {}),
    "ff_nested_3d_65x33_bs64": ((2, 3), 65, 33, 64, "nf4", True, 2, {"ff": True}),
    "x_1d": ((), 31, 13, 64, "nf4", False, 1, {}),
    "ff_x_1d": ((), 31, 13, 64, "nf4", False, 1, {"ff": True}),
    "empty_batch": ((0,), 64, 16, 64, "nf4", False, 1, {}),
    "ff_empty_3d": ((2, 0), 64, 16, 64, "fp4", True, 2, {"ff": True}),
    "noncontig_x": ((6,), 64, 33, 64, "nf4", False, 1, {"noncontig_x": True}),
    "ff_noncontig_x": ((6,), 64, 33, 64, "nf4", False, 2, {"ff": True, "noncontig_x": True}),
    "no_vectors": ((3,), 100, 13, 64, "nf4", True, 0, {}),
    "inactive_nan": ((3,), 64, 24, 128, "nf4", False, 2, {"inactive": (1,), "nan": (1,)}),
    "ff_all_inactive_nan": ((3,), 64, 24, 64, "nf4", False, 2, {"ff": True, "inactive": (0, 1), "nan": (0,)}),
    "fast_16x256x64_bs64": ((16,), 256, 64, 64, "nf4", False, 1, {"numerics_only": True}),
    "ff_fast_3d_512x32_bs128_fp4": ((3, 11), 512, 32, 128, "fp4", False, 2, {"ff": True, "numerics_only": True}),
    "ff_straddle_100x33_bs256_zeros": ((16,), 100, 33, 256, "nf4", False, 1,
                                       {"ff": True, "zeros": True, "numerics_only": True}),
    # 130 rows: the tiled GEMM path (bf16 >= 12 rows, float32 >= 128) with IA3's scales
    "gemm_130tok_256x300_bs64": ((130,), 256, 300, 64, "nf4", True, 2, {"numerics_only": True}),
    "ff_gemm_130tok_256x300_bs64": ((130,), 256, 300, 64, "nf4", True, 1, {"ff": True, "numerics_only": True}),
}

IA3_INT8_CASES = {
    "basic_5x64x24": ((5,), 64, 24, 1, {}),
    "ff_basic_5x64x24": ((5,), 64, 24, 1, {"ff": True}),
    "decode_7x13": ((1,), 7, 13, 2, {"bias": False}),
    "ff_decode_2tok_64x32": ((2,), 64, 32, 1, {"ff": True}),
    "3vectors_3d_65x33": ((2, 3), 65, 33, 3, {}),
    "x_1d": ((), 31, 13, 1, {}),
    "ff_x_1d": ((), 31, 13, 1, {"ff": True}),
    "empty_batch": ((0,), 64, 16, 1, {}),
    "ff_empty_3d": ((2, 0), 64, 16, 2, {"ff": True}),
    "ff_noncontig_x": ((6,), 64, 33, 2, {"ff": True, "noncontig_x": True}),
    "noncontig_x": ((6,), 64, 33, 1, {"noncontig_x": True}),
    "no_vectors": ((3,), 100, 13, 0, {}),
    "inactive_nan": ((3,), 64, 24, 2, {"inactive": (0,), "nan": (0,)}),
    "ff_all_inactive_nan": ((3,), 64, 24, 2, {"ff": True, "inactive": (0, 1), "nan": (1,)}),
    "fast_16x256x64": ((16,), 256, 64, 2, {"numerics_only": True}),
    "ff_33tok_256x100_zeros": ((33,), 256, 100, 1, {"ff": True, "zeros": True, "numerics_only": True}),
    # 130 rows: the tiled GEMM path (bf16 >= 48 rows, float32 >= 128) with IA3's scales
    "gemm_130tok_256x300": ((130,), 256, 300, 2, {"numerics_only": True}),
    "ff_gemm_130tok_256x300": ((130,), 256, 300, 1, {"ff": True, "numerics_only": True}),
}


def _ia3_quant_sample(name, g, lead, fin, fout, n, o, dtype, adapter_dtype, requires_grad, quant_args, meta):
    x = _x(g, lead, fin, dtype, o)
    bias = _randn(g, fout, dtype=dtype).requires_grad_(requires_grad) if o.get("bias", True) else None
    ff = o.get("ff", False)
    vecs, active = _ia3_vectors(g, n, fin if ff else fout, ff, adapter_dtype, o, requires_grad)
    x.requires_grad_(requires_grad)
    return SampleInput(
        name,
        (x, *quant_args, bias, vecs, active, ff),
        all_scales_zero=n > 0 and len(o.get("inactive", ())) == n,
        n_elements=x.numel() + (fout if bias is not None else 0) + sum(v.numel() for v in vecs),
        meta=dict(meta, opcheck=not o.get("numerics_only", False)),
    )


def sample_ia3_linear_4bit(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
    nested_blocksize, out_features, bias, ia3_l, active, feedforward)."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, bs, qt, nested, n, o) in IA3_QUANT4_CASES.items():
        w, q = _quant4_case("ia3:" + name, fin, fout, bs, qt, nested, o)
        g = _gen("ia3:" + name, dtype)
        yield _ia3_quant_sample(name, g, lead, fin, fout, n, o, dtype, adapter_dtype, requires_grad,
                                _quant4_args(q, fout), dict(weight=w, state=q["state"], in_features=fin))


def sample_ia3_linear_int8(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight_int8, row_scale, bias, ia3_l, active, feedforward)."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, n, o) in IA3_INT8_CASES.items():
        w, CB, SCB = _int8_case("ia3:" + name, fin, fout, o)
        g = _gen("ia3:" + name, dtype)
        yield _ia3_quant_sample(name, g, lead, fin, fout, n, o, dtype, adapter_dtype, requires_grad, (CB, SCB),
                                dict(weight=w))


# --------------------------------------------------------------------- mixed batches
# name: (leading dims of x, in, out, adapter ranks, rows (one adapter slot per row group,
# -1 = base), options). The groups split x's leading rows evenly: one row each, or several
# (generate's beams / return sequences, or a sequence's tokens). "E": AdaLoRA's lora_E
# (every LoRA *_mixed op); "ff": IA3 feedforward; "int32": int32 rows; other options as above.
# The same cases serve the six *_mixed ops (IA3 uses one vector per rank entry).
MIXED_CASES = {
    "6rows_3adapters": ((6,), 16, 24, (4, 2, 5), [0, 2, -1, 1, 0, 0], {}),
    "beams_2groups_of_3": ((6,), 16, 24, (4, 3), [1, 0], {"E": True}),
    "3d_2seqs_of_3": ((2, 3), 33, 65, (8, 2), [1, 0], {"ff": True}),
    "runs_merge_odd_7x13": ((5,), 7, 13, (1, 3), [0, 0, 0, 1, 1], {"bias": False, "int32": True}),
    "all_base": ((4,), 16, 24, (4, 2), [-1, -1], {}),
    "one_group": ((3,), 16, 24, (4, 2), [1], {"ff": True}),
    "x_1d": ((), 16, 8, (2, 4), [1], {}),
    "empty_batch": ((0,), 16, 8, (4,), [0], {}),
    "noncontig_x": ((6,), 16, 12, (4, 3), [1, -1, 0], {"noncontig_x": True, "ff": True}),
    "conv1d_weight_view": ((4,), 20, 28, (4, 2), [1, 0, 1, 0], {"weight_t": True, "E": True}),
    "rank0_slot": ((4,), 16, 24, (4, 0), [1, 0, 1, 0], {}),
    "scale0_nan_slot": ((3,), 16, 24, (4, 3), [1, 0, 1], {"zero": (1,), "nan": (1,)}),
    "unused_nan_slot": ((3,), 16, 24, (4, 3, 2), [0, 2, 0], {"nan": (1,), "ff": True}),
    "decode_32rows_8adapters": ((32,), 64, 80, (16,) * 8, [i % 9 - 1 for i in range(32)], {"numerics_only": True}),
    "prefill_4seqs_257x300": ((4, 17), 257, 300, (16, 1, 8), [2, 0, 1, 2], {"E": True, "numerics_only": True}),
}


def _mixed_parts(name, dtype, adapter_dtype, lead, fin, fout, ranks, rows, o):
    """(generator, x, bias, lora_A, lora_B, scales, rows tensor, ia3 vectors) of a mixed case."""
    g = _gen("mixed:" + name, dtype)
    x = _x(g, lead, fin, dtype, o)
    bias = _randn(g, fout, dtype=dtype) if o.get("bias", True) else None
    lora_A, lora_B = _adapters(g, o, fin, fout, ranks, adapter_dtype, False)
    scales = _scales(g, len(ranks), o.get("zero", ()))
    rows_t = torch.tensor(rows, dtype=torch.int32 if o.get("int32") else torch.int64)
    ff = o.get("ff", False)
    # IA3 has no scale to switch a slot off: NaN vectors only in slots no row uses.
    o_ia3 = dict(o, nan=[a for a in o.get("nan", ()) if a not in rows])
    vecs, _ = _ia3_vectors(g, len(ranks), fin if ff else fout, ff, adapter_dtype, o_ia3, False)
    return g, x, bias, lora_A, lora_B, scales, rows_t, vecs


def _mixed_E(g, o, ranks, adapter_dtype):
    return [_randn(g, r, 1, dtype=adapter_dtype) for r in ranks] if o.get("E") else None


def _mixed_meta(o, **kw):
    return dict(kw, opcheck=not o.get("numerics_only", False))


def sample_lora_linear_mixed(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight, bias, lora_A, lora_B, lora_E, scales, rows). Inference only."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, ranks, rows, o) in MIXED_CASES.items():
        g, x, bias, lora_A, lora_B, scales, rows_t, _ = _mixed_parts(name, dtype, adapter_dtype, lead, fin, fout,
                                                                     ranks, rows, o)
        if o.get("weight_t"):
            weight = _randn(g, fin, fout, dtype=dtype, scale=fin**-0.5).t()
        else:
            weight = _randn(g, fout, fin, dtype=dtype, scale=fin**-0.5)
        yield SampleInput(name, (x, weight, bias, lora_A, lora_B, _mixed_E(g, o, ranks, adapter_dtype or dtype),
                                 scales, rows_t), meta=_mixed_meta(o))


def sample_ia3_linear_mixed(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight, bias, ia3_l, rows, feedforward). Inference only."""
    adapter_dtype = adapter_dtype or dtype
    for name, (lead, fin, fout, ranks, rows, o) in MIXED_CASES.items():
        g, x, bias, _, _, _, rows_t, vecs = _mixed_parts(name, dtype, adapter_dtype, lead, fin, fout, ranks, rows, o)
        if o.get("weight_t"):
            weight = _randn(g, fin, fout, dtype=dtype, scale=fin**-0.5).t()
        else:
            weight = _randn(g, fout, fin, dtype=dtype, scale=fin**-0.5)
        yield SampleInput(name, (x, weight, bias, vecs, rows_t, o.get("ff", False)), meta=_mixed_meta(o))


# The quantized mixed ops: every mixed case over a 4-bit / int8 weight of its shape (the
# 4-bit kind and blocksize vary by case); 4-bit LoRA also with a separate lora_x.
_MIXED_QUANT4 = [("nf4", False, 64), ("fp4", True, 32), ("nf4", True, 128)]


def _mixed_quant(kind, dtype, adapter_dtype):
    """Each mixed case over a `kind` ("4bit" / "int8") weight of its shape: (name, o, the
    weight's op arguments, meta, _mixed_parts(...)). Nothing without bitsandbytes."""
    adapter_dtype = adapter_dtype or dtype
    for k, (name, (lead, fin, fout, ranks, rows, o)) in enumerate(MIXED_CASES.items()):
        if kind == "4bit":
            qt, nested, bs = _MIXED_QUANT4[k % len(_MIXED_QUANT4)]
            w, q = _quant4_case("mixed:" + name, fin, fout, bs, qt, nested, o)
            weight_args, meta = _quant4_args(q, fout), _mixed_meta(o, weight=w, in_features=fin)
        else:
            w, CB, SCB = _int8_case("mixed:" + name, fin, fout, o)
            weight_args, meta = (CB, SCB), _mixed_meta(o, weight=w)
        yield name, o, weight_args, meta, _mixed_parts(name, dtype, adapter_dtype, lead, fin, fout, ranks, rows, o)


def sample_lora_linear_4bit_mixed(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
    nested_blocksize, out_features, bias, lora_A, lora_B, lora_E, scales, rows, lora_x)."""
    for name, o, wargs, meta, (g, x, bias, lora_A, lora_B, scales, rows_t, _) in _mixed_quant("4bit", dtype,
                                                                                             adapter_dtype):
        lora_x = _randn(g, *x.shape, dtype=dtype) if o.get("E") else None  # a separate LoRA input in some cases
        lora_E = _mixed_E(g, o, [A.shape[0] for A in lora_A], adapter_dtype or dtype)
        yield SampleInput(name, (x, *wargs, bias, lora_A, lora_B, lora_E, scales, rows_t, lora_x), meta=meta)


def sample_ia3_linear_4bit_mixed(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
    nested_blocksize, out_features, bias, ia3_l, rows, feedforward)."""
    for name, o, wargs, meta, (_, x, bias, _, _, _, rows_t, vecs) in _mixed_quant("4bit", dtype, adapter_dtype):
        yield SampleInput(name, (x, *wargs, bias, vecs, rows_t, o.get("ff", False)), meta=meta)


def sample_lora_linear_int8_mixed(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight_int8, row_scale, bias, lora_A, lora_B, lora_E, scales, rows)."""
    for name, o, wargs, meta, (g, x, bias, lora_A, lora_B, scales, rows_t, _) in _mixed_quant("int8", dtype,
                                                                                             adapter_dtype):
        lora_E = _mixed_E(g, o, [A.shape[0] for A in lora_A], adapter_dtype or dtype)
        yield SampleInput(name, (x, *wargs, bias, lora_A, lora_B, lora_E, scales, rows_t), meta=meta)


def sample_ia3_linear_int8_mixed(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    """Args: (x, weight_int8, row_scale, bias, ia3_l, rows, feedforward)."""
    for name, o, wargs, meta, (_, x, bias, _, _, _, rows_t, vecs) in _mixed_quant("int8", dtype, adapter_dtype):
        yield SampleInput(name, (x, *wargs, bias, vecs, rows_t, o.get("ff", False)), meta=meta)


# One OpInfo per op of peftcore's table (peftcore._ops.OPS): the op, reference.<name>,
# sample_<name> above, and whether it has autograd. A new op without samples fails here.
OPS: dict[str, OpInfo] = {
    name: OpInfo(name, getattr(torch.ops.peftcore, name), getattr(reference, name), globals()[f"sample_{name}"],
                 d.trains)
    for name, d in OP_TABLE.items()
}


def to_exact(args: tuple) -> tuple:
    """The same arguments with every floating tensor widened to float64 (ground truth)."""

    def conv(a):
        if isinstance(a, torch.Tensor):
            return a.detach().double() if a.is_floating_point() else a
        if isinstance(a, list):
            return [conv(t) for t in a]
        return a

    return tuple(conv(a) for a in args)


def native_loaded() -> bool:
    from peftcore import native

    return native._C_ERROR is None


def samples(op_name: str, combos: Optional[list] = None, requires_grad=False):
    """(id, dtype, adapter dtype, sample) for every dtype combo; for pytest.parametrize."""
    info = OPS[op_name]
    for dt, adt in combos or dtype_combos():
        for s in info.sample_inputs(dt, adt, requires_grad):
            yield f"{str(dt)[6:]}-{str(adt)[6:]}-{s.name}", dt, adt, s
