"""The single source of op samples for the op tests.

Every ``peftcore::`` op has an ``OpInfo`` in ``OPS``: the op, its reference.py
version, and a generator of ``SampleInput``s over small and awkward shapes (rank 1,
odd in/out, batch 1, empty batch, 3-D inputs, non-contiguous x, transposed weight
views, 0/1/3 adapters of different ranks, a rank-0 adapter, a scale-0 adapter full of
NaN, per-adapter lora_x, ...). Generators take the compute dtype, the adapter dtype
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
}


def sample_lora_linear(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
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
            (x, weight, bias, lora_A, lora_B, scales, lora_x),
            all_scales_zero=bool(ranks) and len(o.get("zero", ())) == len(ranks),
            n_elements=n_el,
        )


LINEAR_MASKS = ([True, True, True, True], [False, True, False, True], [True, False, True, False])


def sample_lora_linear_backward(dtype, adapter_dtype=None, requires_grad=False) -> Iterator[SampleInput]:
    for s in sample_lora_linear(dtype, adapter_dtype, requires_grad=False):
        x, weight, bias, lora_A, lora_B, scales, lora_x = s.args
        g = _gen("grad:" + s.name, dtype)
        grad_out = _randn(g, *x.shape[:-1], weight.shape[0], dtype=dtype)
        for mask in LINEAR_MASKS:
            tag = "".join("xwba"[i] if m else "-" for i, m in enumerate(mask))
            yield SampleInput(
                f"{s.name}[{tag}]",
                (grad_out, x, weight, lora_A, lora_B, scales, lora_x, list(mask)),
                all_scales_zero=s.all_scales_zero,
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


OPS: dict[str, OpInfo] = {
    "lora_linear": OpInfo(
        "lora_linear", torch.ops.peftcore.lora_linear, reference.lora_linear, sample_lora_linear, True
    ),
    "lora_linear_backward": OpInfo(
        "lora_linear_backward",
        torch.ops.peftcore.lora_linear_backward,
        reference.lora_linear_backward,
        sample_lora_linear_backward,
        False,
    ),
    "lora_embedding": OpInfo(
        "lora_embedding", torch.ops.peftcore.lora_embedding, reference.lora_embedding, sample_lora_embedding, True
    ),
    "lora_embedding_backward": OpInfo(
        "lora_embedding_backward",
        torch.ops.peftcore.lora_embedding_backward,
        reference.lora_embedding_backward,
        sample_lora_embedding_backward,
        False,
    ),
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
