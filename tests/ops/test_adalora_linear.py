"""AdaLoRA on peftcore::lora_linear (its lora_E): reference.py against PEFT's SVDLinear
forward written out independently, and torch.compile(fullgraph=True) of a module with E.
The kernel against the reference, its gradients, gradcheck and the lora_E boundary
messages run with every other lora_linear sample (the "adalora_" ones) in
tests/ops/test_lora_linear.py and tests/test_autograd.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore import reference
from tests.helpers import assert_no_worse_than_reference, tol
from tests.op_db import samples, to_exact

ADA = [p for p in samples("lora_linear") if p[3].args[5] is not None]
LOW = (torch.bfloat16, torch.float16)


def _params(ps):
    return dict(argvalues=[p[1:] for p in ps], ids=[p[0] for p in ps])


def _peft_svd_linear(x, weight, bias, lora_A, lora_B, lora_E, scales, lora_x):
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


def test_samples_cover_adalora():
    assert len(ADA) >= 6 * 10  # every dtype combination, most LINEAR_CASES


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(ADA))
def test_reference_matches_peft(dtype, adapter_dtype, s):
    """Same value; only the association differs ((x·Aᵀ) ⊙ E vs x·(A ⊙ E)ᵀ, the cast of the
    low-rank term), so the low-precision dtypes get their usual tolerance."""
    r = reference.lora_linear(*s.args)
    p = _peft_svd_linear(*s.args)
    if adapter_dtype in LOW:  # PEFT then runs the adapter branch in the low-precision dtype
        exact = reference.lora_linear(*to_exact(s.args))
        assert_no_worse_than_reference(r, p, exact)
    else:
        torch.testing.assert_close(r, p, **tol(dtype))


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
        return torch.ops.peftcore.lora_linear(x, self.weight, None, list(self.A), list(self.B), list(self.E),
                                              self.scales, None)


def test_compile_forward_and_backward():
    from tests.helpers import check_compiled_matches_eager

    m = _AdaLora()
    x = torch.randn(3, 5, 24, requires_grad=True)
    check_compiled_matches_eager(m, x, [x, *m.A, *m.E, *m.B])
