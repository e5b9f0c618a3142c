"""torch.library.opcheck of every peftcore op over the op_db samples: schema
(mutation/aliasing), autograd registration, fake (meta) kernel vs real kernel, and
AOT-dispatch with dynamic shapes. Float32 samples (with and without requires_grad
for the differentiable ops) plus one low-precision and the float64 combo."""
from __future__ import annotations

import pytest
import torch

from tests.op_db import OPS

COMBOS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]


def _cases():
    for name, info in OPS.items():
        for dt, adt in COMBOS:
            grads = [False, True] if (info.differentiable and dt == torch.float32) else [False]
            for rg in grads:
                for s in info.sample_inputs(dt, adt, rg):
                    if not s.meta.get("opcheck", True):  # a kernel-path variant (see op_db)
                        continue
                    yield pytest.param(
                        info, s, id=f"{name}-{str(dt)[6:]}-{str(adt)[6:]}-{'grad-' if rg else ''}{s.name}"
                    )


@pytest.mark.parametrize("info,s", list(_cases()))
def test_opcheck(info, s):
    torch.library.opcheck(info.op.default, s.args)  # the functional overload (.out: test_out_variants)
