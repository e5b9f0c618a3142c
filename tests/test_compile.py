"""torch.compile(fullgraph=True) of small modules built on each forward op: the
fake kernels let the graph trace without breaks, and the compiled output (and, for
lora_linear, the gradients) equal eager mode's."""
from __future__ import annotations

import torch
import torch.nn as nn

from tests.helpers import check_compiled_matches_eager


class LoraLinear(nn.Module):
    def __init__(self, fin=24, fout=40, ranks=(4, 8)):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(fout, fin, generator=g) / fin**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(fout, generator=g), requires_grad=False)
        self.A = nn.ParameterList([torch.randn(r, fin, generator=g) / fin**0.5 for r in ranks])
        self.B = nn.ParameterList([torch.randn(fout, r, generator=g) for r in ranks])
        self.register_buffer("scales", torch.tensor([0.5, -2.0]))

    def forward(self, x):
        return torch.ops.peftcore.lora_linear(x, self.weight, self.bias, list(self.A), list(self.B), None, self.scales,
                                              None)


class LoraEmbedding(nn.Module):
    def __init__(self, V=30, D=16, r=4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(V, D, generator=g), requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, V, generator=g))
        self.B = nn.Parameter(torch.randn(D, r, generator=g))
        self.register_buffer("scales", torch.tensor([2.0]))

    def forward(self, idx):
        return torch.ops.peftcore.lora_embedding(idx, self.weight, [self.A], [self.B], self.scales, 0)


def test_compile_lora_linear_forward_and_backward():
    m = LoraLinear()
    x = torch.randn(3, 5, 24, requires_grad=True)
    check_compiled_matches_eager(m, x, [x, *m.A, *m.B])  # its tolerances, with their reasons


def test_compile_lora_embedding():
    torch._dynamo.reset()
    m = LoraEmbedding()
    idx = torch.tensor([[0, 3, 29], [7, 0, 1]])
    with torch.no_grad():
        # fused graphs may reorder float sums (tests/helpers.py check_compiled_matches_eager)
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(idx), m(idx), rtol=1e-6, atol=1e-6)
