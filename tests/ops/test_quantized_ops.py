"""The bitsandbytes-quantized-base ops: peftcore::dequantize_4bit, lora_linear_4bit,
dequantize_int8 and lora_linear_int8, over every sample of tests/op_db.py (weights
quantized by bitsandbytes itself).

  * dequantize_*: bit for bit equal to reference.py and to bitsandbytes' own dequantize;
  * lora_linear_*: against reference.py within the bounds derived in tests/helpers.py
    (tight for float32, the bfloat16-product error for bfloat16 / float16 x); no active
    adapter -> bit for bit the op without adapters; gradients and gradcheck (float64);
  * the accuracy contract: with no adapters, on a 256x512 layer, no less accurate than
    bitsandbytes' own CPU forward (Linear4bit / Linear8bitLt) against the same oracle;
  * torch.compile(fullgraph=True) and the portable kernels (PEFTCORE_CPU_ISA=generic).

With the native extension disabled the ops *are* the reference, so the reference
comparisons pass trivially there; bitsandbytes' dequantize stays an independent oracle.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from peftcore import reference
from tests.helpers import DEVICES, assert_within, bf16_products, grad_tol, quantized_bound, split_quantized
from tests.op_db import bnb_functional, native_loaded, quantize_4bit, samples

bnbF = bnb_functional()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOW = (torch.bfloat16, torch.float16)


def _params(ps):
    return dict(argvalues=[p[1:] for p in ps], ids=[p[0] for p in ps])


def _no_dynamo():
    # bitsandbytes' pure-PyTorch CPU fallbacks are torch.compile'd with dynamic=False:
    # ~1.5 s of compilation per new shape. Run them eagerly (same arithmetic).
    return torch._dynamo.config.patch(disable=True)


# --------------------------------------------------------------------- dequantize
DQ_COMBOS = [(dt, dt) for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
DQ4 = list(samples("dequantize_4bit", combos=DQ_COMBOS))
DQ8 = list(samples("dequantize_int8", combos=DQ_COMBOS))


def _bnb_dequantize_4bit(qweight, state, dtype, flat=False):
    """bitsandbytes.functional.dequantize_4bit in ``dtype``. flat: as one row of out·in
    values (see test_dequantize_4bit_matches_bitsandbytes)."""
    st = copy.copy(state)
    st.dtype = dtype
    out_f, in_f = state.shape
    if flat:
        st.shape = torch.Size([1, out_f * in_f])
    with _no_dynamo():
        return bnbF.dequantize_4bit(qweight, st).reshape(out_f, in_f)


@pytest.mark.parametrize("dtype,_adt,s", **_params(DQ4))
def test_dequantize_4bit_matches_reference(dtype, _adt, s):
    y = torch.ops.peftcore.dequantize_4bit(*s.args)
    out_f, in_f = s.args[8], s.args[9]
    assert y.dtype == dtype and y.shape == (out_f, in_f) and y.is_contiguous()
    # one multiplication in float32 (float64: exact) and one rounding: no room for error
    assert torch.equal(y, reference.dequantize_4bit(*s.args))


@pytest.mark.parametrize("dtype,_adt,s", **_params([p for p in DQ4 if p[1] != torch.float64]))
def test_dequantize_4bit_matches_bitsandbytes(dtype, _adt, s):
    """Bit for bit bitsandbytes' own dequantize_4bit (its CPU kernels and, for odd
    shapes / blocksize >= 2048, its PyTorch fallback) in float32, bfloat16, float16."""
    y = torch.ops.peftcore.dequantize_4bit(*s.args)
    qweight, state, in_f = s.args[0], s.meta["state"], s.meta["in_features"]
    # As one row: blocks run over the flattened weight, so this is the same weight, and
    # one row is a layout every bitsandbytes CPU path decodes correctly.
    assert torch.equal(y, _bnb_dequantize_4bit(qweight, state, dtype, flat=True))
    if in_f % state.blocksize == 0:
        # The layer as bitsandbytes stores it. (Only where no block straddles two rows:
        # bitsandbytes 0.50's native CPU dequantize indexes blocks per row and decodes
        # straddling blocks of an even-width weight with the wrong absmax, e.g. 16x96 at
        # blocksize 128; its odd-width / blocksize >= 2048 fallback is right.)
        assert torch.equal(y, _bnb_dequantize_4bit(qweight, state, dtype))


@pytest.mark.parametrize("dtype,_adt,s", **_params(DQ8))
def test_dequantize_int8_matches_reference_and_bitsandbytes(dtype, _adt, s):
    CB, SCB, _ = s.args
    y = torch.ops.peftcore.dequantize_int8(*s.args)
    assert y.dtype == dtype and y.shape == CB.shape and y.is_contiguous()
    assert torch.equal(y, reference.dequantize_int8(*s.args))
    if dtype != torch.float64:
        # bitsandbytes dequantizes to float32 (CB·SCB·(1/127)); other dtypes: one rounding of that
        assert torch.equal(y, bnbF.int8_vectorwise_dequant(CB, SCB).to(dtype))


# ------------------------------------------------------------ forward vs reference
# Under PEFTCORE_CPU_ISA=generic / avx2 (test_lower_isa_kernels_pass_quantized_op_tests) only the
# combos whose base path differs by ISA: float32, bfloat16 and float16 x (float64 always
# runs the portable kernels; the adapter dtype does not touch the quantized base).
GENERIC_RUN = os.environ.get("PEFTCORE_CPU_ISA") in ("generic", "avx2")
FWD_COMBOS = [(dt, torch.float32) for dt in (torch.float32, torch.bfloat16, torch.float16)] if GENERIC_RUN else None
FWD4 = list(samples("lora_linear_4bit", combos=FWD_COMBOS))
FWD8 = list(samples("lora_linear_int8", combos=FWD_COMBOS))


def _check_forward(op_name, dtype, s):
    op = getattr(torch.ops.peftcore, op_name)
    ref = getattr(reference, op_name)
    x, W, bias, lora_A, lora_B, _, scales, lora_x, base_args = split_quantized(op_name, s.args)
    y = op(*s.args)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], W.shape[0])
    # A scale-0 adapter full of NaN must contribute exactly nothing.
    assert torch.isfinite(y).all()
    active = [a for a in range(len(lora_A)) if scales[a] != 0 and lora_A[a].shape[0] > 0]
    if lora_A and not active:  # no adapter at work: bit-identical to the frozen quantized layer
        assert torch.equal(y, op(*base_args()))
        return
    r = ref(*s.args)
    assert_within(y, r, quantized_bound(op_name, dtype, s.args, r), f"{op_name} vs reference")


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD4))
def test_lora_linear_4bit_matches_reference(dtype, adapter_dtype, s):
    _check_forward("lora_linear_4bit", dtype, s)


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(FWD8))
def test_lora_linear_int8_matches_reference(dtype, adapter_dtype, s):
    _check_forward("lora_linear_int8", dtype, s)


# The opt-in exact float32 products (PEFTCORE_QUANT_FP32=exact): float32 x then matches the
# reference to float32 accumulation (tests/helpers.py: bf16_products reads the variable).
FWD_F32 = [pytest.param(op, s, id=f"{op}-{s.name}") for op in ("lora_linear_4bit", "lora_linear_int8")
           for _, _, _, s in samples(op, combos=[(torch.float32, torch.float32)])]


@pytest.mark.parametrize("op_name,s", FWD_F32)
def test_float32_exact_opt_in_matches_reference(op_name, s, monkeypatch):
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")
    _check_forward(op_name, torch.float32, s)


def _base_only(op_name, name):
    """(op, args without adapters) of the float32 sample `name`."""
    s = next(s for _, _, _, s in samples(op_name, combos=[(torch.float32, torch.float32)]) if s.name == name)
    return getattr(torch.ops.peftcore, op_name), split_quantized(op_name, s.args)[-1]()


@pytest.mark.skipif(not bf16_products(torch.float32), reason="float32 x keeps float32 products on this CPU / build")
@pytest.mark.parametrize("op_name,name", [("lora_linear_4bit", "fast_16x256x64_bs64"),
                                          ("lora_linear_4bit", "gemm_tiles_130tok_4096x600"),
                                          ("lora_linear_int8", "fast_16x256x64")])
def test_float32_x_is_rounded_to_bf16_by_default(op_name, name, monkeypatch):
    """The default: float32 x meets the kernels rounded to bf16 once, so its base equals the
    base of x already rounded (bit for bit), and differs from the exact opt-in's."""
    op, (x, *rest) = _base_only(op_name, name)
    y = op(x, *rest)
    assert torch.equal(y, op(x.bfloat16().float(), *rest))
    monkeypatch.setenv("PEFTCORE_QUANT_FP32", "exact")
    assert not torch.equal(y, op(x, *rest))


_NO_GEMM = """
import sys, torch
sys.path.insert(0, {root!r})
import peftcore
from tests.ops.test_quantized_ops import _base_only
for op_name, name in (("lora_linear_4bit", "gemm_tiles_130tok_4096x600"), ("lora_linear_int8", "gemm_tiles_130tok_4096x600")):
    op, (x, *rest) = _base_only(op_name, name)  # float32 x and bias: bf16 products by default
    whole = op(x, *rest)
    # the same rows in blocks of 65, below every many-row threshold: the row-wise kernels
    parts = torch.cat([op(x[i:i + 65], *rest) for i in range(0, x.shape[0], 65)])
    print(op_name, torch.equal(whole, parts))
"""


@pytest.mark.skipif(not native_loaded(), reason="native kernels not built")
def test_quant_gemm_0_keeps_every_row_count_on_the_row_wise_kernels():
    """PEFTCORE_QUANT_GEMM=0 (read once per process): 130 rows give, bit for bit, what the
    same rows give in blocks of 65 (the register / panel kernels are row-wise); without it
    the 130-row call takes a many-row path (tile GEMM; int8 x) and does not."""
    results = {}
    for flag in ("0", None):
        env = {k: v for k, v in os.environ.items() if k != "PEFTCORE_QUANT_GEMM"}
        if flag is not None:
            env["PEFTCORE_QUANT_GEMM"] = flag
        r = subprocess.run([sys.executable, "-c", _NO_GEMM.format(root=ROOT)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        results[flag] = dict(line.split() for line in r.stdout.strip().splitlines())
    assert results["0"] == {"lora_linear_4bit": "True", "lora_linear_int8": "True"}, results
    if bf16_products(torch.float32):
        assert results[None] == {"lora_linear_4bit": "False", "lora_linear_int8": "False"}, results


# ------------------------------------------------------------------------- autograd
# The forward-path samples ("forward_only": the tiled GEMM paths' 130 x 4096 x 600) are
# left out: the backward takes no row-count path, and gradients summed over thousands of
# terms differ from the reference's by more than grad_tol's fixed 1e-4 in float32.
GRAD4 = [p for p in samples("lora_linear_4bit", combos=[(torch.float32, torch.float32)], requires_grad=True)
         if not p[-1].meta.get("forward_only")]
GRAD8 = [p for p in samples("lora_linear_int8", combos=[(torch.float32, torch.float32)], requires_grad=True)
         if not p[-1].meta.get("forward_only")]


def _leaves(op_name, args):
    x, _, bias, lora_A, lora_B, lora_E, _, lora_x, _ = split_quantized(op_name, args)
    return [t for t in (x, bias, *lora_A, *lora_B, *(lora_E or ()), *(lora_x or ())) if t is not None]


def _check_autograd(op_name, dtype, s):
    """Gradients through the op (register_autograd: dequantize + lora_linear_backward)
    equal those of plain PyTorch autograd through reference.py; the frozen quantized
    weight gets none."""
    leaves = _leaves(op_name, s.args)
    y = getattr(torch.ops.peftcore, op_name)(*s.args)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(y, leaves, go, allow_unused=True)
    want = torch.autograd.grad(getattr(reference, op_name)(*s.args), leaves, go, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        # the reference skips inactive adapters (grad None); the op returns zeros
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        torch.testing.assert_close(a, b, **grad_tol(dtype))


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(GRAD4))
def test_lora_linear_4bit_autograd_matches_reference(dtype, adapter_dtype, s):
    _check_autograd("lora_linear_4bit", dtype, s)


@pytest.mark.parametrize("dtype,adapter_dtype,s", **_params(GRAD8))
def test_lora_linear_int8_autograd_matches_reference(dtype, adapter_dtype, s):
    _check_autograd("lora_linear_int8", dtype, s)


MAX_ELEMENTS = 1500
F64 = [(torch.float64, torch.float64)]
GC = [
    pytest.param(op, s, id=f"{op}-{s.name}")
    for op in ("lora_linear_4bit", "lora_linear_int8")
    for _, _, _, s in samples(op, combos=F64, requires_grad=True)
    if s.n_elements <= MAX_ELEMENTS
]


@pytest.mark.parametrize("op_name,s", GC)
def test_gradcheck(op_name, s):
    """float64 gradcheck through the op as registered, w.r.t. x, bias, the adapters and lora_x.
    fast_mode (random projections vᵀ·J·u instead of the full Jacobian: a few forwards
    instead of one per input element) above 300 elements; a wrong Jacobian entry still
    fails it with probability 1."""
    from tests.helpers import gradcheck_op

    gradcheck_op(getattr(torch.ops.peftcore, op_name), s)


# ------------------------------------------------------------- accuracy contract
# With no adapter, peftcore's quantized forward is no less accurate than bitsandbytes'
# own CPU forward on the same stored weight, measured against the oracle
# x·Wᵀ (+ b) in float64 with W = bitsandbytes' dequantized weight.
#
# Slack. bitsandbytes' packed CPU path (Linear4bit in eval mode converts its weight on
# the first forward) casts x *and* the block absmax to bfloat16 and returns bfloat16;
# peftcore rounds x and the decoded W to bfloat16 (exact absmax) for bfloat16 x and
# computes exactly in float32 for float32 x. So for bfloat16 x both errors are sums of
# the same kind of rounding noise, bitsandbytes' with an extra term: its error is the
# larger one in distribution, not necessarily in every draw. Over 256..16k outputs the
# RMS of two such errors agrees to a few %, their max to ~15 % (measured: peftcore /
# bitsandbytes = 0.85-0.98 in max, 0.85-0.95 in RMS). We allow 1.1x in RMS and 1.25x in
# max so that a fixed seed cannot fail by chance, while a kernel that rounded one more
# time (e.g. the absmax, or x twice) would show up in the RMS. For int8, bitsandbytes
# quantizes x to int8 per row (LLM.int8, outliers >= threshold in float16): its error is
# ~5-50x ours, the same slack is generous.
RMS_SLACK, MAX_SLACK = 1.10, 1.25
CONTRACT_T = (1, 16, 64, 130)  # 130: the many-row paths (tiled GEMM; int8 x for LLM.int8)
CONTRACT_DTYPES = (torch.bfloat16, torch.float32)


def _errors(y, oracle):
    e = y.double() - oracle
    return e.pow(2).mean().sqrt().item(), e.abs().max().item()


def _assert_no_worse(y_ours, y_bnb, oracle, what):
    rms_o, max_o = _errors(y_ours, oracle)
    rms_b, max_b = _errors(y_bnb, oracle)
    assert rms_o <= RMS_SLACK * rms_b and max_o <= MAX_SLACK * max_b, (
        f"{what}: peftcore error rms {rms_o:.3e} / max {max_o:.3e} vs bitsandbytes rms {rms_b:.3e} / max {max_b:.3e}"
    )


def _contract_x(T, dtype, seed, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 512, generator=g)
    if outliers:  # LLM.int8's outlier features: a few columns far above the threshold 6
        x[:, ::97] *= 8.0
    return x.to(dtype)


def _contract_weight():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(256, 512, generator=g) / 512**0.5


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_no_less_accurate_than_bitsandbytes(quant_type, nested):
    import bitsandbytes as bnb

    w = _contract_weight()
    lin = bnb.nn.Linear4bit(512, 256, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type,
                            compress_statistics=nested)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                                   blocksize=64)
    lin.bias = torch.nn.Parameter(torch.randn(256, generator=torch.Generator().manual_seed(5)) * 0.1,
                                  requires_grad=False)
    lin = lin.to("cpu").eval()  # .to() quantizes
    q, st = lin.weight.data.clone(), copy.deepcopy(lin.weight.quant_state)  # standard layout, before the
    W = _bnb_dequantize_4bit(q, st, torch.float32).double()                  # first forward repacks it
    quant = (q, st.absmax, st.code, st.blocksize)
    quant += (st.state2.absmax, st.state2.code, st.offset.reshape(()).float(), st.state2.blocksize) if nested \
        else (None, None, None, 256)
    b32 = lin.bias.detach().float().clone()  # bitsandbytes casts its bias to the compute dtype in place
    for dtype in CONTRACT_DTYPES:
        for T in CONTRACT_T:
            x = _contract_x(T, dtype, seed=T)
            with torch.no_grad():
                # on a CPU with AVX512_BF16 the first call repacks W (its fast path); elsewhere
                # bitsandbytes dequantizes W to bfloat16 and calls F.linear
                y_bnb = lin(x)
            b = b32.to(dtype)
            y = torch.ops.peftcore.lora_linear_4bit(x, *quant, 256, b, [], [], None, torch.zeros(0), None)
            oracle = x.double() @ W.t() + b.double()
            _assert_no_worse(y, y_bnb, oracle, f"{quant_type} nested={nested} {dtype} T={T}")


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_no_less_accurate_than_bitsandbytes(threshold):
    import bitsandbytes as bnb

    w = _contract_weight()
    lin = bnb.nn.Linear8bitLt(512, 256, bias=True, has_fp16_weights=False, threshold=threshold)
    lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    lin.bias = torch.nn.Parameter(torch.randn(256, generator=torch.Generator().manual_seed(5)) * 0.1,
                                  requires_grad=False)
    lin = lin.to("cpu").eval()  # .to() quantizes
    CB, SCB = lin.weight.data, lin.weight.SCB
    assert CB.dtype == torch.int8
    W = bnbF.int8_vectorwise_dequant(CB, SCB).double()
    for dtype in (*CONTRACT_DTYPES, torch.float16):
        for T in CONTRACT_T:
            x = _contract_x(T, dtype, seed=T, outliers=True)
            b = lin.bias.detach().to(dtype)
            with torch.no_grad():
                y_bnb = lin(x)
            y = torch.ops.peftcore.lora_linear_int8(x, CB, SCB, b, [], [], None, torch.zeros(0), None)
            oracle = x.double() @ W.t() + b.double()
            _assert_no_worse(y, y_bnb, oracle, f"int8 threshold={threshold} {dtype} T={T}")


# --------------------------------------------------------------------------- compile
class _Quant4Lora(torch.nn.Module):
    def __init__(self, fin=96, fout=40):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q = quantize_4bit(torch.randn(fout, fin, generator=g) / fin**0.5, 64, "nf4", True)
        for k in ("qweight", "absmax", "code", "nested_absmax", "nested_code", "nested_offset"):
            self.register_buffer(k, q[k])
        self.blocksize, self.nested_blocksize, self.fout = q["blocksize"], q["nested_blocksize"], fout
        self.bias = torch.nn.Parameter(torch.randn(fout, generator=g), requires_grad=False)
        self.A = torch.nn.ParameterList([torch.randn(r, fin, generator=g) / fin**0.5 for r in (4, 8)])
        self.B = torch.nn.ParameterList([torch.randn(fout, r, generator=g) for r in (4, 8)])
        self.register_buffer("scales", torch.tensor([0.5, -2.0]))

    def forward(self, x):
        return torch.ops.peftcore.lora_linear_4bit(
            x, self.qweight, self.absmax, self.code, self.blocksize, self.nested_absmax, self.nested_code,
            self.nested_offset, self.nested_blocksize, self.fout, self.bias, list(self.A), list(self.B), None,
            self.scales, None,
        )


class _Int8Lora(torch.nn.Module):
    def __init__(self, fin=96, fout=40):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        CB, SCB, _ = bnbF.int8_vectorwise_quant((torch.randn(fout, fin, generator=g) / fin**0.5).half())
        self.register_buffer("CB", CB)
        self.register_buffer("SCB", SCB)
        self.A = torch.nn.ParameterList([torch.randn(4, fin, generator=g) / fin**0.5])
        self.B = torch.nn.ParameterList([torch.randn(fout, 4, generator=g)])
        self.E = torch.nn.ParameterList([torch.randn(4, 1, generator=g)])  # AdaLoRA's lora_E
        self.register_buffer("scales", torch.tensor([2.0]))

    def forward(self, x):
        return torch.ops.peftcore.lora_linear_int8(x, self.CB, self.SCB, None, list(self.A), list(self.B),
                                                   list(self.E), self.scales, None)


@pytest.mark.parametrize("module", [_Quant4Lora, _Int8Lora], ids=["4bit", "int8"])
def test_compile_forward_and_backward(module):
    """torch.compile(fullgraph=True): the fake kernels let it trace without breaks, and
    output and gradients (x, adapters) equal eager mode's."""
    torch._dynamo.reset()
    m = module()
    x = torch.randn(3, 5, 96, requires_grad=True)
    y_eager = m(x)
    go = torch.randn_like(y_eager)
    params = [x, *m.A, *m.B, *getattr(m, "E", ())]
    grads_eager = torch.autograd.grad(y_eager, params, go)
    cm = torch.compile(m, fullgraph=True)
    y = cm(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(y, params, go), grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ portable kernels
@pytest.mark.skipif(not native_loaded(), reason="native kernels not built")
@pytest.mark.skipif(bool(os.environ.get("PEFTCORE_CPU_ISA")), reason="already a forced ISA")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512-novbmi"])
def test_lower_isa_kernels_pass_quantized_op_tests(isa):
    """PEFTCORE_CPU_ISA=generic forces the portable kernels, =avx2 the AVX2 + FMA ones
    (where the CPU has AVX2; else the portable ones again), =avx512-novbmi the AVX-512
    kernels with the double-quantized scales looked up without AVX512_VBMI: the reference
    and bitsandbytes comparisons above must hold there too."""
    env = dict(os.environ, PEFTCORE_CPU_ISA=isa)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__),
         "-k", "(matches_reference or matches_bitsandbytes or no_less_accurate) and not autograd"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


# ---- the stored-state checks (common/checks.h check_weight4_state / check_int8_state,
# shared by the CPU and CUDA kernels): each corruption is refused with the field named.
def _bad4(q, **changes):
    d = dict(q)
    d.update(changes)
    return d


BAD_4BIT = {
    "qweight_bytes": (lambda q: _bad4(q, qweight=q["qweight"][:-1]), "qweight holds"),
    "code_size": (lambda q: _bad4(q, code=q["code"][:8]), "code must hold the 16 values"),
    "code_dtype": (lambda q: _bad4(q, code=q["code"].to(torch.int32)), "code has dtype Int"),
    "absmax_count": (lambda q: _bad4(q, absmax=q["absmax"][:-1]), "absmax has"),
    "blocksize": (lambda q: _bad4(q, blocksize=0), "blocksize must be positive"),
    "nested_float_absmax": (lambda q: _bad4(q, absmax=q["absmax"].float()), "absmax must hold uint8 codes"),
    "nested_code_missing": (lambda q: _bad4(q, nested_code=None), "nested_code with 256 values"),
    "nested_offset_size": (lambda q: _bad4(q, nested_offset=torch.zeros(2)), "nested_offset with 1 value"),
    "nested_blocksize": (lambda q: _bad4(q, nested_blocksize=0), "nested_blocksize must be positive"),
    "nested_absmax_count": (lambda q: _bad4(q, nested_absmax=q["nested_absmax"][:-1]), "nested_absmax has"),
    "nested_absmax_dtype": (lambda q: _bad4(q, nested_absmax=q["nested_absmax"].to(torch.int32)),
                            "nested_absmax has dtype Int"),
}


def _to_dev(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(BAD_4BIT))
def test_bad_4bit_state_is_refused(case, device):
    fin, fout = 64, 24
    q = quantize_4bit(torch.randn(fout, fin, generator=torch.Generator().manual_seed(0)), 64, "nf4", True)
    q.pop("state")
    corrupt, msg = BAD_4BIT[case]
    b = {k: _to_dev(v, device) for k, v in corrupt(q).items()}
    quant = [b[k] for k in ("qweight", "absmax", "code", "blocksize", "nested_absmax", "nested_code",
                            "nested_offset", "nested_blocksize")]
    x = torch.randn(3, fin, device=device)
    with pytest.raises(RuntimeError, match=f"peftcore::lora_linear_4bit: .*{msg}"):
        torch.ops.peftcore.lora_linear_4bit(x, *quant, fout, None, [], [], None, torch.zeros(0), None)
    with pytest.raises(RuntimeError, match=f"peftcore::dequantize_4bit: .*{msg}"):
        torch.ops.peftcore.dequantize_4bit(*quant, fout, fin, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_int8_state_is_refused(device):
    CB = torch.randint(-127, 128, (24, 64), dtype=torch.int8, device=device)
    SCB = torch.rand(24, device=device) + 0.5
    x = torch.randn(3, 64, device=device)
    for weight, row_scale, msg in ((CB.float(), SCB, "weight must be bitsandbytes' int8 CB"),
                                   (CB, SCB[:-1], r"row_scale \(SCB\) has 23 values but weight has 24 rows"),
                                   (CB.reshape(-1), SCB, "weight must be 2-D"),
                                   (CB, SCB.to(torch.int32), "row_scale has dtype Int")):
        with pytest.raises(RuntimeError, match=f"peftcore::lora_linear_int8: {msg}"):
            torch.ops.peftcore.lora_linear_int8(x, weight, row_scale, None, [], [], None, torch.zeros(0), None)
