"""The six mixed-batch ops (peftcore::*_mixed: one adapter slot per row group, -1 = base)
over every sample of tests/op_db.py:

  * each row group equals the op's single-adapter twin (lora_linear, with lora_E where given,
    ia3_linear and their quantized forms) run on the whole batch with that group's adapter
    as the only active one — the same base pass, so only the low-rank / scaling order can
    differ (tests/helpers.py tolerances);
  * every op against reference.py (the spec): the dense ones within tests/helpers.py's
    tolerances, the quantized ones group by group within their single op's bound;
  * groups of the base alone, and batches of only base rows, are bit for bit the base;
  * NaN in an adapter no row uses, or in a slot whose scale is 0, never shows;
  * boundary errors name the op, the argument and the values; torch.compile(fullgraph).
"""
from __future__ import annotations

import math

import pytest
import torch

from peftcore import reference
from tests.helpers import assert_no_worse_than_reference, assert_within, quantized_bound, tol
from tests.op_db import OPS, samples, to_exact

MIXED = [n for n in OPS if n.endswith("_mixed")]
CASES = [pytest.param(n, *p[1:], id=f"{n}-{p[0]}") for n in MIXED
         for p in samples(n)]
P = torch.ops.peftcore


def _twin_args(name, args, slot):
    """(single-adapter op, its arguments): the same batch with adapter `slot` alone active (-1: none)."""
    def only(n, value):
        s = torch.zeros(n)
        if slot >= 0:
            s[slot] = value
        return s

    if name == "lora_linear_mixed":
        x, w, b, A, B, E, scales, rows = args
        st = only(len(A), scales[slot].item() if slot >= 0 else 0.0)
        return "lora_linear", (x, w, b, A, B, E, st, None)
    if name == "ia3_linear_mixed":
        x, w, b, l, rows, ff = args
        return "ia3_linear", (x, w, b, l, only(len(l), 1.0), ff)
    if name == "lora_linear_4bit_mixed":
        x, *q, out, b, A, B, E, scales, rows, lx = args
        st = only(len(A), scales[slot].item() if slot >= 0 else 0.0)
        return "lora_linear_4bit", (x, *q, out, b, A, B, E, st, None if lx is None else [lx] * len(A))
    if name == "lora_linear_int8_mixed":
        x, cb, scb, b, A, B, E, scales, rows = args
        return "lora_linear_int8", (x, cb, scb, b, A, B, E, only(len(A), scales[slot].item() if slot >= 0 else 0.0),
                                    None)
    if name == "ia3_linear_4bit_mixed":
        x, *q, out, b, l, rows, ff = args
        return "ia3_linear_4bit", (x, *q, out, b, l, only(len(l), 1.0), ff)
    if name == "ia3_linear_int8_mixed":
        x, cb, scb, b, l, rows, ff = args
        return "ia3_linear_int8", (x, cb, scb, b, l, only(len(l), 1.0), ff)
    raise AssertionError(name)


def _twin(name, args, slot):
    single, single_args = _twin_args(name, args, slot)
    return getattr(P, single)(*single_args)


def _rows(args):
    return next(a for a in reversed(args) if isinstance(a, torch.Tensor) and not a.is_floating_point()
                and a.dim() == 1)


def _flat(y):
    return y.reshape(math.prod(y.shape[:-1]), y.shape[-1])


@pytest.mark.parametrize("name,dtype,adapter_dtype,s", CASES)
def test_each_group_equals_its_adapter_alone(name, dtype, adapter_dtype, s):
    y = OPS[name].op(*s.args)
    x = s.args[0]
    assert y.dtype == x.dtype and y.shape[:-1] == x.shape[:-1]
    assert torch.isfinite(y).all()  # NaN only in unused / scale-0 slots
    rows = _rows(s.args).tolist()
    per = math.prod(x.shape[:-1]) // len(rows)
    yf = _flat(y)
    for slot in sorted(set(rows)):
        want = _flat(_twin(name, s.args, slot))
        sel = [i for g, r in enumerate(rows) if r == slot for i in range(g * per, (g + 1) * per)]
        got, exp = yf[sel], want[sel]
        if slot < 0 and "ia3" not in name:  # the base alone: the very same base pass
            assert torch.equal(got, exp), f"{name}: base rows differ from the base op"
        else:
            torch.testing.assert_close(got, exp, **tol(dtype), msg=lambda m: f"{name} slot {slot}: {m}")


DENSE = [p for p in CASES if p.values[0] in ("lora_linear_mixed", "ia3_linear_mixed")]


@pytest.mark.parametrize("name,dtype,adapter_dtype,s", DENSE)
def test_dense_matches_reference(name, dtype, adapter_dtype, s):
    info = OPS[name]
    y, r = info.op(*s.args), info.ref(*s.args)
    torch.testing.assert_close(y, r, **tol(dtype))
    if dtype in (torch.bfloat16, torch.float16):
        assert_no_worse_than_reference(y, r, info.ref(*to_exact(s.args)))


QUANTIZED = [p for p in CASES if p.values[0] not in ("lora_linear_mixed", "ia3_linear_mixed")]


def group_bound(name, dtype, args, slot):
    """tests/helpers.quantized_bound of the single-adapter twin of slot `slot` (whole batch)
    against reference.py: a quantized mixed op's rows of that slot lie within it."""
    single, targs = _twin_args(name, args, slot)
    return quantized_bound(single, dtype, targs, getattr(reference, single)(*targs))


@pytest.mark.parametrize("name,dtype,adapter_dtype,s", QUANTIZED)
def test_quantized_matches_reference(name, dtype, adapter_dtype, s):
    """Native against reference.py's mixed op, group by group within the bound of the
    group's single-adapter op (tests/helpers.py quantized_bound: the quantized base's
    product rounding plus the accumulation order)."""
    info = OPS[name]
    y, r = info.op(*s.args), info.ref(*s.args)
    assert r.shape == y.shape and r.dtype == y.dtype
    rows = _rows(s.args).tolist()
    per = math.prod(s.args[0].shape[:-1]) // len(rows)
    yf, rf = _flat(y), _flat(r)
    for slot in sorted(set(rows)):
        bound = _flat(group_bound(name, dtype, s.args, slot))
        sel = [i for g, q in enumerate(rows) if q == slot for i in range(g * per, (g + 1) * per)]
        assert_within(yf[sel], rf[sel], bound[sel], f"{name} slot {slot} vs reference")


def _with_rows(args, rows):
    i = max(k for k, a in enumerate(args) if a is _rows(args))
    return (*args[:i], rows, *args[i + 1:])


@pytest.mark.parametrize("name", MIXED)
def test_all_base_rows_are_the_base_op(name):
    s = next(s for s in OPS[name].sample_inputs(torch.float32, torch.float32) if s.name == "6rows_3adapters")
    y = OPS[name].op(*_with_rows(s.args, torch.full((6,), -1)))
    assert torch.equal(y, _twin(name, s.args, -1))


@pytest.mark.parametrize("name", MIXED)
def test_bad_rows_are_named(name):
    s = next(s for s in OPS[name].sample_inputs(torch.float32, torch.float32) if s.name == "6rows_3adapters")
    op = OPS[name].op
    with pytest.raises(RuntimeError, match=rf"{name}: x has 6 rows .* rows holds 4 adapter indices"):
        op(*_with_rows(s.args, torch.tensor([0, 1, 2, 0])))
    with pytest.raises(RuntimeError, match=rf"{name}: rows\[1\] = 3 is not an adapter slot"):
        op(*_with_rows(s.args, torch.tensor([0, 3])))
    with pytest.raises(RuntimeError, match=rf"{name}: rows has dtype Float"):
        op(*_with_rows(s.args, torch.tensor([0.0, 1.0])))
    with pytest.raises(RuntimeError, match=rf"{name}: rows must be 1-D with at least one entry"):
        op(*_with_rows(s.args, torch.zeros(0, dtype=torch.int64)))


@pytest.mark.parametrize("name", MIXED)
def test_compiled_matches_eager(name):
    s = next(s for s in OPS[name].sample_inputs(torch.float32, torch.float32) if s.name == "beams_2groups_of_3")
    op = OPS[name].op
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    torch.testing.assert_close(compiled(*s.args), op(*s.args), rtol=0, atol=0)
