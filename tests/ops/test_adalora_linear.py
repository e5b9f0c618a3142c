"""peftcore::adalora_linear: the registered CPU kernel against reference.py over every
sample of tests/op_db.py; reference.py against PEFT's SVDLinear forward written out
independently; gradients (against autograd through the reference, and float64
gradcheck); torch.compile(fullgraph=True); boundary messages. With the native extension
disabled the op *is* the reference, so the kernel comparisons pass trivially there."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore import reference
from tests.helpers import assert_no_worse_than_reference, grad_tol, tol
from tests.op_db import native_loaded, samples, to_exact

FWD = list(samples("adalora_linear"))
LOW = (torch.bfloat16, torch.float16)


def _params(ps):
    return dict(argvalues=[p[1:] for p in ps], ids=[p[0] for p in ps])


def _active(scales, lora_A):
    return [a for a in range(len(lora_A)) if scales[a] != 0 and lora_A[a].shape[0] > 0]


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD))
def test_forward_matches_reference(dtype, adapter_dtype, s):
    x, weight, bias, lora_A, lora_E, lora_B, scales, lora_x = s.args
    y = torch.ops.peftcore.adalora_linear(*s.args)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    # A scale-0 adapter full of NaN (A, E and B) must contribute exactly nothing.
    assert torch.isfinite(y).all()
    if not _active(scales, lora_A):  # no adapter at work: bit-identical to the frozen layer
        assert torch.equal(y, F.linear(x, weight, bias))
        return
    r = reference.adalora_linear(*s.args)
    torch.testing.assert_close(y, r, **tol(dtype))
    if dtype in LOW:
        assert_no_worse_than_reference(y, r, reference.adalora_linear(*to_exact(s.args)))


def _peft_svd_linear(x, weight, bias, lora_A, lora_E, lora_B, scales, lora_x):
    """PEFT's tuners/adalora/layer.py SVDLinear.forward (unmerged), written out, with
    scales[a] standing for scaling / (ranknum + 1e-5)."""
    result = F.linear(x, weight, bias)
    for a in range(len(lora_A)):
        s = scales[a].item()
        if s == 0.0 or lora_A[a].shape[0] == 0:
            continue
        A, E, B = lora_A[a], lora_E[a], lora_B[a]
        xa = (x if lora_x is None else lora_x[a]).to(A.dtype)
        result = result + (xa @ (A * E).T @ B.T) * s
    return result.to(x.dtype)


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD))
def test_reference_matches_peft(dtype, adapter_dtype, s):
    """Same value; only the association differs ((x·Aᵀ) ⊙ E vs x·(A ⊙ E)ᵀ, the cast of the
    low-rank term), so the low-precision dtypes get their usual tolerance."""
    r = reference.adalora_linear(*s.args)
    p = _peft_svd_linear(*s.args)
    if adapter_dtype in LOW:  # PEFT then runs the adapter branch in the low-precision dtype
        exact = reference.adalora_linear(*to_exact(s.args))
        assert_no_worse_than_reference(r, p, exact)
    else:
        torch.testing.assert_close(r, p, **tol(dtype))


FWD_GRAD = list(samples("adalora_linear", combos=[(torch.float32, torch.float32)], requires_grad=True))


def _leaves(args):
    x, weight, bias, lora_A, lora_E, lora_B, _, lora_x = args
    return [t for t in (x, weight, bias, *lora_A, *lora_E, *lora_B, *(lora_x or ())) if t is not None]


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD_GRAD))
def test_autograd_matches_reference_autograd(dtype, adapter_dtype, s):
    """Gradients through the op (lora_linear_backward with A ⊙ E, chain rule) equal plain
    PyTorch autograd through reference.adalora_linear; inactive adapters get zeros."""
    leaves = _leaves(s.args)
    y = torch.ops.peftcore.adalora_linear(*s.args)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(y, leaves, go, allow_unused=True)
    want = torch.autograd.grad(reference.adalora_linear(*s.args), leaves, go, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        assert a.shape == leaves[i].shape and a.dtype == leaves[i].dtype
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **grad_tol(dtype))


GC = [
    pytest.param(s, id=s.name)
    for _, _, _, s in samples("adalora_linear", combos=[(torch.float64, torch.float64)], requires_grad=True)
    if s.n_elements <= 1500
]


@pytest.mark.parametrize("s", GC)
def test_gradcheck(s):
    """float64 gradcheck w.r.t. x, W, b, A, E, B and lora_x (NaN of inactive adapters replaced:
    gradcheck perturbs every leaf; their Jacobian must still be zero)."""
    from tests.helpers import gradcheck_op

    gradcheck_op(torch.ops.peftcore.adalora_linear, s)


class _AdaLora(torch.nn.Module):
    def __init__(self, fin=24, fout=40):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.weight = torch.nn.Parameter(torch.randn(fout, fin, generator=g) / fin**0.5, requires_grad=False)
        self.A = torch.nn.ParameterList([torch.randn(r, fin, generator=g) / fin**0.5 for r in (4, 6)])
        self.E = torch.nn.ParameterList([torch.randn(r, 1, generator=g) for r in (4, 6)])
        self.B = torch.nn.ParameterList([torch.randn(fout, r, generator=g) for r in (4, 6)])
        self.register_buffer("scales", torch.tensor([0.5, -2.0]))

    def forward(self, x):
        return torch.ops.peftcore.adalora_linear(x, self.weight, None, list(self.A), list(self.E), list(self.B),
                                                 self.scales, None)


def test_compile_forward_and_backward():
    from tests.helpers import check_compiled_matches_eager

    m = _AdaLora()
    x = torch.randn(3, 5, 24, requires_grad=True)
    check_compiled_matches_eager(m, x, [x, *m.A, *m.E, *m.B])


@pytest.mark.skipif(not native_loaded(), reason="messages of the native kernel")
@pytest.mark.parametrize(
    "E,pattern",
    [
        ([torch.randn(2, 1)], r"lora_E has 1 tensors but lora_A has 2"),
        ([torch.randn(2, 1), torch.randn(3, 1)], r"lora_E\[1\] has shape \[3, 1\] but must hold one value per rank of lora_A\[1\] \(shape \[4, 8\]"),
        ([torch.randn(2, 1), torch.randn(4, 1).double()], r"lora_E\[1\] has dtype Double; adapter weights must be float32"),
    ],
)
def test_bad_arguments_are_named(E, pattern):
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(2, 8, generator=g), torch.randn(4, 8, generator=g)]
    B = [torch.randn(5, 2, generator=g), torch.randn(5, 4, generator=g)]
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.peftcore.adalora_linear(torch.randn(3, 8), torch.randn(5, 8), None, A, E, B, torch.ones(2), None)
