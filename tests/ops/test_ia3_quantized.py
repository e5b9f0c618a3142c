"""peftcore::ia3_linear_4bit / ia3_linear_int8: (IA)³ over the bitsandbytes-quantized bases,
over every sample of tests/op_db.py (weights quantized by bitsandbytes itself).

  * the fusion is exact: the op equals its own base (lora_linear_4bit / _int8 with no
    adapters) run on PEFT's scaled x (feedforward), or that base scaled as PEFT does;
  * against reference.py within the bounds of tests/helpers.py (the base's bound, through l);
  * no active vector -> bit for bit the base; NaN in an inactive vector never shows;
  * gradients against autograd through the reference, float64 gradcheck, torch.compile;
  * the same under the portable / AVX2 kernels (PEFTCORE_CPU_ISA=generic / avx2).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from peftcore import reference
from tests.helpers import assert_within, grad_tol, quantized_bound, split_ia3_quantized
from tests.op_db import native_loaded, quantize_4bit, quantize_int8, samples

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERIC_RUN = os.environ.get("PEFTCORE_CPU_ISA") in ("generic", "avx2")
# Under a forced lower ISA only the combos whose base path differs by ISA (as test_quantized_ops).
COMBOS = [(dt, torch.float32) for dt in (torch.float32, torch.bfloat16, torch.float16)] if GENERIC_RUN else None
FWD = [("ia3_linear_4bit", p) for p in samples("ia3_linear_4bit", combos=COMBOS)] + [
    ("ia3_linear_int8", p) for p in samples("ia3_linear_int8", combos=COMBOS)
]
FWD_PARAMS = [pytest.param(op, *p[1:], id=f"{op}-{p[0]}") for op, p in FWD]


@pytest.mark.parametrize("op_name,dtype,adapter_dtype,s", FWD_PARAMS)
def test_ia3_quantized_matches_reference(op_name, dtype, adapter_dtype, s):
    x, W, bias, ia3_l, active, ff, base, base_name = split_ia3_quantized(op_name, s.args)
    y = getattr(torch.ops.peftcore, op_name)(*s.args)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], W.shape[0])
    assert torch.isfinite(y).all()
    native_base = getattr(torch.ops.peftcore, base_name)
    f = torch.float64 if dtype == torch.float64 else torch.float32
    l = reference.ia3_vector(ia3_l, active, f)
    if l is None:  # no vector at work: bit-identical to the frozen quantized layer
        assert torch.equal(y, base(native_base, x))
        return
    # Exact: the fused scaling is the one PEFT does around the (same) native base.
    if ff:
        xs = (x.to(f) * l).to(x.dtype)
        assert torch.equal(y, base(native_base, xs))
    else:
        assert torch.equal(y, (base(native_base, x).to(f) * l).to(x.dtype))
    # And within the base's bound of the reference (through l).
    r = getattr(reference, op_name)(*s.args)
    assert_within(y, r, quantized_bound(op_name, dtype, s.args, r), f"{op_name} vs reference")


GRAD = [pytest.param(op, s, id=f"{op}-{s.name}") for op in ("ia3_linear_4bit", "ia3_linear_int8")
        for _, _, _, s in samples(op, combos=[(torch.float32, torch.float32)], requires_grad=True)]


@pytest.mark.parametrize("op_name,s", GRAD)
def test_ia3_quantized_autograd_matches_reference(op_name, s, monkeypatch):
    # l's gradient sums grad_out times the base output: exact float32 products (the opt-in)
    # keep the forward's bf16 rounding of float32 x out of a check of the backward's formula.
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")
    x, _, bias, ia3_l, _, _, _, _ = split_ia3_quantized(op_name, s.args)
    leaves = [t for t in (x, bias, *ia3_l) if t is not None]
    y = getattr(torch.ops.peftcore, op_name)(*s.args)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(y, leaves, go, allow_unused=True)
    want = torch.autograd.grad(getattr(reference, op_name)(*s.args), leaves, go, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and a.shape == leaves[i].shape and a.dtype == leaves[i].dtype
        b = torch.zeros_like(leaves[i]) if b is None else b
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **grad_tol(torch.float32))


GC = [pytest.param(op, s, id=f"{op}-{s.name}") for op in ("ia3_linear_4bit", "ia3_linear_int8")
      for _, _, _, s in samples(op, combos=[(torch.float64, torch.float64)], requires_grad=True)
      if s.n_elements <= 1500]


@pytest.mark.parametrize("op_name,s", GC)
def test_ia3_quantized_gradcheck(op_name, s):
    from tests.helpers import gradcheck_op

    gradcheck_op(getattr(torch.ops.peftcore, op_name), s)


class _Quant(torch.nn.Module):
    def __init__(self, kind, ff, fin=96, fout=40):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        w = torch.randn(fout, fin, generator=g) / fin**0.5
        self.kind, self.ff, self.fout = kind, ff, fout
        if kind == "4bit":
            q = quantize_4bit(w, 64, "nf4", True)
            for k in ("qweight", "absmax", "code", "nested_absmax", "nested_code", "nested_offset"):
                self.register_buffer(k, q[k])
            self.blocksize, self.nested_blocksize = q["blocksize"], q["nested_blocksize"]
        else:
            CB, SCB = quantize_int8(w)
            self.register_buffer("CB", CB)
            self.register_buffer("SCB", SCB)
        self.bias = torch.nn.Parameter(torch.randn(fout, generator=g), requires_grad=False)
        n = fin if ff else fout
        self.l = torch.nn.ParameterList([1 + 0.3 * torch.randn((1, n) if ff else (n, 1), generator=g)])
        self.register_buffer("active", torch.tensor([1.0]))

    def forward(self, x):
        if self.kind == "4bit":
            return torch.ops.peftcore.ia3_linear_4bit(
                x, self.qweight, self.absmax, self.code, self.blocksize, self.nested_absmax, self.nested_code,
                self.nested_offset, self.nested_blocksize, self.fout, self.bias, list(self.l), self.active, self.ff)
        return torch.ops.peftcore.ia3_linear_int8(x, self.CB, self.SCB, self.bias, list(self.l), self.active, self.ff)


@pytest.mark.parametrize("ff", [False, True], ids=["attn", "ff"])
@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_ia3_quantized_compile_forward_and_backward(kind, ff):
    from tests.helpers import check_compiled_matches_eager

    m = _Quant(kind, ff)
    x = torch.randn(3, 5, 96, requires_grad=True)
    check_compiled_matches_eager(m, x, [x, *m.l], exact=True)


@pytest.mark.skipif(not native_loaded(), reason="native kernels not built")
@pytest.mark.skipif(bool(os.environ.get("PEFTCORE_CPU_ISA")), reason="already a forced ISA")
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_lower_isa_kernels_pass_ia3_quantized_tests(isa):
    """The exactness and reference checks above under the portable / AVX2 kernels."""
    env = dict(os.environ, PEFTCORE_CPU_ISA=isa)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__),
         "-k", "matches_reference and not autograd"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
