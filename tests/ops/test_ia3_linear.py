"""peftcore::ia3_linear: the registered CPU kernel against reference.py over every sample
of tests/op_db.py, bit for bit (same GEMM, same roundings); reference.py against PEFT's
(IA)³ forward written out independently; gradients (against autograd through the
reference, and float64 gradcheck); torch.compile(fullgraph=True); boundary messages.
With the native extension disabled the op *is* the reference, so the kernel comparisons
pass trivially there."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore import reference
from tests.helpers import check_compiled_matches_eager, grad_tol, gradcheck_op
from tests.op_db import native_loaded, samples

FWD = list(samples("ia3_linear"))


def _params(ps):
    return dict(argvalues=[p[1:] for p in ps], ids=[p[0] for p in ps])


def _active_ids(active):
    return [a for a, v in enumerate(active.tolist()) if v != 0.0]


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD))
def test_forward_equals_reference(dtype, adapter_dtype, s):
    """The kernel makes PEFT's roundings, no more and no fewer: equality, every dtype."""
    x, weight, bias, ia3_l, active, ff = s.args
    y = torch.ops.peftcore.ia3_linear(*s.args)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    # An inactive vector full of NaN must contribute exactly nothing.
    assert torch.isfinite(y).all()
    if not _active_ids(active):  # no adapter at work: bit-identical to the frozen layer
        assert torch.equal(y, F.linear(x, weight, bias))
        return
    assert torch.equal(y, reference.ia3_linear(*s.args))


def _peft_ia3(x, weight, bias, ia3_l, active, ff):
    """PEFT's tuners/ia3/layer.py Linear.forward (unmerged), written out."""
    previous_dtype = dtype = x.dtype
    ia3_scaling = 1
    for a in _active_ids(active):
        dtype = ia3_l[a].dtype
        ia3_scaling *= ia3_l[a].flatten()
    if ff:
        interm = (x.to(dtype) * ia3_scaling).to(previous_dtype)
        return F.linear(interm, weight, bias)
    result = F.linear(x, weight, bias)
    return (result * ia3_scaling).to(result.dtype)


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD))
def test_reference_equals_peft(dtype, adapter_dtype, s):
    x, weight, bias, ia3_l, active, ff = s.args
    if adapter_dtype not in (torch.float32, torch.float64) and len(_active_ids(active)) > 1:
        # PEFT multiplies low-precision vectors with each other in their dtype; peftcore in float32
        pytest.skip("several low-precision vectors: the product is taken in float32 by design")
    assert torch.equal(reference.ia3_linear(*s.args), _peft_ia3(*s.args))


FWD_GRAD = list(samples("ia3_linear", combos=[(torch.float32, torch.float32)], requires_grad=True))


def _leaves(args):
    x, weight, bias, ia3_l, _, _ = args
    return [t for t in (x, weight, bias, *ia3_l) if t is not None]


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD_GRAD))
def test_autograd_matches_reference_autograd(dtype, adapter_dtype, s):
    """Gradients through the op (register_autograd) equal plain PyTorch autograd through
    reference.ia3_linear; inactive vectors (NaN included) get zeros."""
    leaves = _leaves(s.args)
    y = torch.ops.peftcore.ia3_linear(*s.args)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(y, leaves, go, allow_unused=True)
    want = torch.autograd.grad(reference.ia3_linear(*s.args), leaves, go, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None, f"leaf {i}: no gradient"
        assert a.shape == leaves[i].shape and a.dtype == leaves[i].dtype
        b = torch.zeros_like(leaves[i]) if b is None else b  # the reference never reads inactive vectors
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **grad_tol(dtype))


GC = [
    pytest.param(s, id=s.name)
    for _, _, _, s in samples("ia3_linear", combos=[(torch.float64, torch.float64)], requires_grad=True)
    if s.n_elements <= 1500
]


@pytest.mark.parametrize("s", GC)
def test_gradcheck(s):
    gradcheck_op(torch.ops.peftcore.ia3_linear, s)


class _Ia3(torch.nn.Module):
    def __init__(self, ff, fin=24, fout=40):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.ff = ff
        self.weight = torch.nn.Parameter(torch.randn(fout, fin, generator=g) / fin**0.5, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(fout, generator=g), requires_grad=False)
        n = fin if ff else fout
        shape = (1, n) if ff else (n, 1)
        self.l = torch.nn.ParameterList([1 + 0.3 * torch.randn(shape, generator=g) for _ in range(2)])
        self.register_buffer("active", torch.tensor([1.0, 1.0]))

    def forward(self, x):
        return torch.ops.peftcore.ia3_linear(x, self.weight, self.bias, list(self.l), self.active, self.ff)


@pytest.mark.parametrize("ff", [False, True], ids=["attn", "ff"])
def test_compile_forward_and_backward(ff):
    """torch.compile(fullgraph=True): the fake kernel and the tensor-only backward trace
    without breaks; output and gradients (x, vectors) equal eager mode's."""
    m = _Ia3(ff)
    x = torch.randn(3, 5, 24, requires_grad=True)
    check_compiled_matches_eager(m, x, [x, *m.l], exact=True)


def _args(**over):
    g = torch.Generator().manual_seed(0)
    base = dict(x=torch.randn(3, 8, generator=g), weight=torch.randn(5, 8, generator=g), bias=None,
                ia3_l=[torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g)], active=torch.ones(2),
                feedforward=False)
    base.update(over)
    return base


@pytest.mark.skipif(not native_loaded(), reason="messages of the native kernel")
@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(ia3_l=[torch.randn(5, 1), torch.randn(8, 1)]),
         r"ia3_l\[1\] has shape \[8, 1\] \(8 values\) but must hold one value per output feature .* = 5"),
        (dict(feedforward=True), r"ia3_l\[0\] has shape \[5, 1\] .* input feature .* = 8"),
        (dict(active=torch.ones(3)), r"active has shape \[3\] but there are 2 IA3 vectors"),
        (dict(ia3_l=[torch.randn(5, 1).half(), torch.randn(5, 1)]),
         r"ia3_l\[0\] has dtype Half; adapter weights must be float32 or the base dtype Float"),
        (dict(weight=torch.randn(5, 7)), r"weight has shape \[5, 7\] but its dim 1 must equal x.shape\[-1\]"),
    ],
)
def test_bad_arguments_are_named(over, pattern):
    a = _args(**over)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.peftcore.ia3_linear(a["x"], a["weight"], a["bias"], a["ia3_l"], a["active"], a["feedforward"])
