"""peftcore::lora_linear (+ backward): the registered CPU kernel against reference.py
over every sample of tests/op_db.py, plain LoRA and with lora_E (AdaLoRA, the
"adalora_" samples; tests/ops/test_adalora_linear.py checks the reference against PEFT). With the native extension disabled the op *is*
the reference, so these pass trivially there; the no-_C path is tested separately."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore import reference
from tests.helpers import assert_no_worse_than_reference, grad_tol, tol
from tests.op_db import native_loaded, samples, to_exact

FWD = list(samples("lora_linear"))
BWD = list(samples("lora_linear_backward"))
LOW = (torch.bfloat16, torch.float16)


def _params(ps):
    return dict(argvalues=[p[1:] for p in ps], ids=[p[0] for p in ps])


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD))
def test_forward_matches_reference(dtype, adapter_dtype, s):
    x, weight, bias, lora_A, lora_B, _, scales, lora_x = s.args
    y = torch.ops.peftcore.lora_linear(*s.args)
    r = reference.lora_linear(*s.args)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    # A scale-0 adapter full of NaN must contribute exactly nothing.
    assert torch.isfinite(y).all()
    active = [a for a in range(len(lora_A)) if scales[a] != 0 and lora_A[a].shape[0] > 0]
    if not active:  # no adapter at work: bit-identical to the frozen layer
        assert torch.equal(y, F.linear(x, weight, bias))
        return
    torch.testing.assert_close(y, r, **tol(dtype))
    if dtype in LOW:
        exact = reference.lora_linear(*to_exact(s.args))
        assert_no_worse_than_reference(y, r, exact)


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(BWD))
def test_backward_matches_reference(dtype, adapter_dtype, s):
    got = torch.ops.peftcore.lora_linear_backward(*s.args)
    want = reference.lora_linear_backward(*s.args)
    names = ("grad_x", "grad_weight", "grad_bias", "grad_lora_A", "grad_lora_B", "grad_lora_x")
    for name, g, w in zip(names, got, want):
        gs, ws = (list(g), list(w)) if isinstance(w, list) else ([g], [w])
        assert len(gs) == len(ws), f"{name}: {len(gs)} tensors, reference {len(ws)}"
        for i, (a, b) in enumerate(zip(gs, ws)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}[{i}]: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
            torch.testing.assert_close(a, b, **grad_tol(dtype), msg=lambda m: f"{name}[{i}]: {m}")


FWD_GRAD = list(samples("lora_linear", combos=[(torch.float32, torch.float32)], requires_grad=True))


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD_GRAD))
def test_autograd_matches_reference_autograd(dtype, adapter_dtype, s):
    """Gradients through the op (register_autograd + native backward) equal those of
    plain PyTorch autograd through reference.lora_linear."""
    x, weight, bias, lora_A, lora_B, lora_E, scales, lora_x = s.args
    leaves = [t for t in (x, weight, bias, *lora_A, *lora_B, *(lora_E or ()), *(lora_x or ())) if t is not None]
    y = torch.ops.peftcore.lora_linear(*s.args)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, go, allow_unused=True)
    want = torch.autograd.grad(reference.lora_linear(*s.args), leaves, go, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        # the reference skips inactive adapters (grad None); the op returns zeros
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        torch.testing.assert_close(a, b, **grad_tol(dtype))


def _args(**over):
    g = torch.Generator().manual_seed(0)
    base = dict(
        x=torch.randn(3, 8, generator=g),
        weight=torch.randn(5, 8, generator=g),
        bias=None,
        lora_A=[torch.randn(2, 8, generator=g), torch.randn(4, 8, generator=g)],
        lora_B=[torch.randn(5, 2, generator=g), torch.randn(5, 4, generator=g)],
        lora_E=None,
        scales=torch.ones(2),
        lora_x=None,
    )
    base.update(over)
    return base


@pytest.mark.skipif(not native_loaded(), reason="messages of the native kernel")
@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(lora_A=[torch.randn(2, 8), torch.randn(4, 7)]), r"lora_A\[1\] has shape \[4, 7\].*in_features\) = 8"),
        (dict(lora_B=[torch.randn(5, 2), torch.randn(5, 3)]), r"lora_B\[1\] has shape \[5, 3\].*lora_A\[1\] has shape \[4, 8\]"),
        (dict(scales=torch.ones(3)), r"scales has shape \[3\] but there are 2 adapters"),
        (dict(weight=torch.randn(5, 8, dtype=torch.float64)), r"weight has dtype Double but x has dtype Float"),
        (dict(bias=torch.randn(6)), r"bias has shape \[6\].*= 5"),
        (dict(lora_x=[torch.randn(3, 8)]), r"lora_x has 1 tensors but lora_A has 2"),
        (dict(lora_A=[torch.randn(2, 8).half(), torch.randn(4, 8)]), r"lora_A\[0\] has dtype Half; adapter weights must be float32 or the base dtype Float"),
        (dict(lora_E=[torch.randn(2, 1)]), r"lora_E has 1 tensors but lora_A has 2"),
        (dict(lora_E=[torch.randn(2, 1), torch.randn(3, 1)]), r"lora_E\[1\] has shape \[3, 1\] but must hold one value per rank of lora_A\[1\] \(shape \[4, 8\]"),
        (dict(lora_E=[torch.randn(2, 1), torch.randn(4, 1).double()]), r"lora_E\[1\] has dtype Double; adapter weights must be float32"),
    ],
)
def test_bad_arguments_are_named(over, pattern):
    a = _args(**over)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.peftcore.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_E"], a["scales"],
                                       a["lora_x"])
