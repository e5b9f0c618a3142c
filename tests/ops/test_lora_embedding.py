"""peftcore::lora_embedding (+ backward): the registered CPU kernel against
reference.py over every sample of tests/op_db.py, padding_idx semantics included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore import reference
from tests.helpers import assert_no_worse_than_reference, grad_tol, tol
from tests.op_db import native_loaded, samples, to_exact

FWD = list(samples("lora_embedding"))
BWD = list(samples("lora_embedding_backward"))
LOW = (torch.bfloat16, torch.float16)


def _params(ps):
    return dict(argvalues=[p[1:] for p in ps], ids=[p[0] for p in ps])


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD))
def test_forward_matches_reference(dtype, adapter_dtype, s):
    idx, weight, lora_A, lora_B, scales, pad = s.args
    y = torch.ops.peftcore.lora_embedding(*s.args)
    r = reference.lora_embedding(*s.args)
    assert y.dtype == weight.dtype and y.shape == (*idx.shape, weight.shape[1])
    assert torch.isfinite(y).all()  # the scale-0 NaN adapter contributes nothing
    active = [a for a in range(len(lora_A)) if scales[a] != 0 and lora_A[a].shape[0] > 0]
    if not active:
        assert torch.equal(y, F.embedding(idx, weight))
        return
    torch.testing.assert_close(y, r, **tol(dtype))
    if dtype in LOW:
        assert_no_worse_than_reference(y, r, reference.lora_embedding(*to_exact(s.args)))


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(BWD))
def test_backward_matches_reference(dtype, adapter_dtype, s):
    got = torch.ops.peftcore.lora_embedding_backward(*s.args)
    want = reference.lora_embedding_backward(*s.args)
    for name, g, w in zip(("grad_weight", "grad_lora_A", "grad_lora_B"), got, want):
        gs, ws = (list(g), list(w)) if isinstance(w, list) else ([g], [w])
        assert len(gs) == len(ws), f"{name}: {len(gs)} tensors, reference {len(ws)}"
        for i, (a, b) in enumerate(zip(gs, ws)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}[{i}]"
            torch.testing.assert_close(a, b, **grad_tol(dtype), msg=lambda m: f"{name}[{i}]: {m}")


def test_padding_row_gets_no_gradient_but_B_does():
    torch.manual_seed(0)
    V, D, pad = 6, 4, 2
    idx = torch.tensor([pad, pad, 1])
    W = torch.randn(V, D, requires_grad=True)
    A = torch.randn(3, V, requires_grad=True)
    B = torch.randn(D, 3, requires_grad=True)
    y = torch.ops.peftcore.lora_embedding(idx, W, [A], [B], torch.tensor([0.5]), pad)
    y.sum().backward()
    assert torch.count_nonzero(W.grad[pad]) == 0 and torch.count_nonzero(W.grad[1]) > 0
    assert torch.count_nonzero(A.grad[:, pad]) == 0 and torch.count_nonzero(A.grad[:, 1]) > 0
    # B's gradient includes the padding tokens' activations A[:, pad]
    only_pad = torch.ops.peftcore.lora_embedding_backward(
        torch.ones(3, D) * torch.tensor([1.0, 1.0, 0.0]).unsqueeze(1), idx, W.detach(), [A.detach()], [B.detach()],
        torch.tensor([0.5]), pad, [False, True],
    )[2][0]
    assert torch.count_nonzero(only_pad) > 0


@pytest.mark.skipif(not native_loaded(), reason="messages of the native kernel")
@pytest.mark.parametrize(
    "idx,pattern",
    [
        (torch.tensor([1, 10, 2]), r"index 10 \(at flat position 1 of indices with shape \[3\]\) is out of range.* 10 rows"),
        (torch.tensor([[1, -1]]), r"index -1 \(at flat position 1"),
        (torch.tensor([1.0]), r"indices has dtype Float; expected one of \{Long, Int\}"),
    ],
)
def test_bad_indices_are_reported(idx, pattern):
    W = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.peftcore.lora_embedding(idx, W, [torch.randn(2, 10)], [torch.randn(4, 2)], torch.ones(1), -1)


@pytest.mark.skipif(not native_loaded(), reason="messages of the native kernel")
def test_bad_adapter_shape_is_named():
    W = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match=r"lora_A\[0\] has shape \[2, 9\].*num_embeddings\) = 10"):
        torch.ops.peftcore.lora_embedding(torch.tensor([1]), W, [torch.randn(2, 9)], [torch.randn(4, 2)], torch.ones(1), -1)
