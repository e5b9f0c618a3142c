"""gradcheck in float64 through the ops as registered (register_autograd + the native
CPU backward when built, the reference otherwise), over the small op_db samples."""
from __future__ import annotations

import pytest
import torch

from tests.op_db import sample_lora_embedding, sample_lora_linear

MAX_ELEMENTS = 1500  # numerical Jacobians cost one forward per input element


def _small(gen):
    return [pytest.param(s, id=s.name) for s in gen(torch.float64, torch.float64, True) if s.n_elements <= MAX_ELEMENTS]


def _flatten(args):
    """Differentiable tensors of args (for gradcheck's inputs) and a rebuild function."""
    leaves, spec = [], []
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            spec.append(("t", len(leaves)))
            leaves.append(a)
        elif isinstance(a, list) and a and all(isinstance(t, torch.Tensor) for t in a):
            spec.append(("l", list(range(len(leaves), len(leaves) + len(a)))))
            leaves.extend(a)
        else:
            spec.append(("c", a))

    def rebuild(*flat):
        out = []
        for kind, v in spec:
            out.append(flat[v] if kind == "t" else [flat[i] for i in v] if kind == "l" else v)
        return out

    return leaves, rebuild


@pytest.mark.parametrize("s", _small(sample_lora_linear))
def test_gradcheck_lora_linear(s):
    leaves, rebuild = _flatten(s.args)
    assert torch.autograd.gradcheck(lambda *f: torch.ops.peftcore.lora_linear(*rebuild(*f)), leaves)


@pytest.mark.parametrize("s", _small(sample_lora_embedding))
def test_gradcheck_lora_embedding(s):
    # padding_idx deliberately withholds the true gradient of the padding row (as
    # F.embedding does; tested in tests/ops/test_lora_embedding.py), so check without it.
    leaves, rebuild = _flatten((*s.args[:5], -1))
    assert torch.autograd.gradcheck(lambda *f: torch.ops.peftcore.lora_embedding(*rebuild(*f)), leaves)
