"""The CUDA kernels (csrc/cuda/) against reference.py, on a GPU.

Every sample of tests/op_db.py runs on CUDA and is compared with reference.py run on the
CPU copy of the same arguments (the tolerances of tests/helpers.py; the quantized ops
within the bounds derived there), twice: with the per-layer state vector (LoRA
``scales``, IA3 ``active``) on the GPU, as a model moved to the GPU holds it, and on the
CPU. Then opcheck on CUDA, CUDA-graph capture and replay of lora_linear and
lora_linear_4bit (switching adapters by writing the state on the device between replays),
the current-stream rule, and whole-model parity (a tiny transformers model with a LoRA
adapter: peftcore on CUDA vs peftcore on the CPU).

Marked ``cuda``; without a GPU or without native CUDA kernels in this build
(``tests.helpers.has_cuda_kernels``) tests/conftest.py deselects it as a whole.
"""
from __future__ import annotations

import math

import pytest
import torch

# Without a GPU or without CUDA kernels in this build, tests/conftest.py deselects every
# item here (and says how many in one summary line).
pytestmark = pytest.mark.cuda

from peftcore import native, reference  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_no_worse_than_reference,
    assert_within,
    grad_tol,
    quantized_bound,
    tol,
)
from tests.op_db import OPS, dtype_combos, to_exact  # noqa: E402

DEV = torch.device("cuda")
LOW = (torch.bfloat16, torch.float16)
# The per-adapter state argument of each op (read on the device when it lives there).
STATE_ARG = {
    "lora_linear": 6, "lora_linear_backward": 5, "ia3_linear": 4, "lora_embedding": 4,
    "lora_embedding_backward": 5, "lora_linear_4bit": 14, "lora_linear_int8": 7, "ia3_linear_4bit": 12,
    "ia3_linear_int8": 5,
}
WITH_E = {"lora_linear", "lora_linear_4bit", "lora_linear_int8"}  # lora_E just before the state
QUANT = {"lora_linear_4bit", "lora_linear_int8"}
IA3_QUANT = {"ia3_linear_4bit", "ia3_linear_int8"}
DEQUANT = {"dequantize_4bit", "dequantize_int8"}
BACKWARD = {"lora_linear_backward", "lora_embedding_backward"}


def _need_kernel(op_name):
    # An op without a CUDA kernel yet would run its reference fallback: not what is tested here.
    if not native.native_available(op_name, "cuda"):
        pytest.skip(f"peftcore::{op_name} has no CUDA kernel in this build")


def to_cuda(args, op_name, state_on_device=True):
    """The arguments on the GPU as fresh leaves (same strides: a transposed Conv1D weight
    view stays a transposed view; same requires_grad); the state vector on the GPU or left
    on the CPU."""

    def conv(a):
        if isinstance(a, list):
            return [conv(t) for t in a]
        if not isinstance(a, torch.Tensor):
            return a
        d = a.detach()
        if not d.is_contiguous() and d.dim() == 2 and d.t().is_contiguous():
            t = d.t().to(DEV).t()
        elif not d.is_contiguous():
            t = torch.empty_strided(d.shape, d.stride(), dtype=d.dtype, device=DEV).copy_(d)
        else:
            t = d.to(DEV)
        return t.requires_grad_() if a.requires_grad else t

    return tuple(a.detach() if i == STATE_ARG.get(op_name) and not state_on_device else conv(a)
                 for i, a in enumerate(args))


def _cases():
    # The ops whose numerics this file knows how to check; an op added later brings its
    # own CUDA test (mixed batches: tests of their own).
    for name, info in OPS.items():
        if name not in set(STATE_ARG) | DEQUANT:
            continue
        for dt, adt in dtype_combos():
            for s in info.sample_inputs(dt, adt, False):
                for on_dev in (True, False) if name in STATE_ARG else (True,):
                    where = "state-gpu" if on_dev else "state-cpu"
                    yield pytest.param(name, dt, s, on_dev, id=f"{name}-{str(dt)[6:]}-{str(adt)[6:]}-{s.name}-{where}")


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res.extend(_flat(o) if not isinstance(o, torch.Tensor) else [o])
    return res


@pytest.mark.parametrize("op_name,dtype,s,state_on_device", list(_cases()))
def test_sample_matches_reference(op_name, dtype, s, state_on_device):
    _need_kernel(op_name)
    info = OPS[op_name]
    args = s.args
    cargs = to_cuda(args, op_name, state_on_device)
    got = info.op(*cargs)
    torch.cuda.synchronize()
    want = info.ref(*args)
    got_l, want_l = _flat(got), _flat(want)
    assert len(got_l) == len(want_l)
    for g, w in zip(got_l, want_l):
        assert g.device.type == "cuda" and g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape)
    got_c = [g.cpu() for g in got_l]
    if op_name in DEQUANT:  # one product and one rounding: bit for bit
        assert torch.equal(got_c[0], want_l[0])
        return
    if op_name in BACKWARD:
        for g, w in zip(got_c, want_l):
            torch.testing.assert_close(g, w, **grad_tol(dtype))
        return
    y, r = got_c[0], want_l[0]
    assert torch.isfinite(y).all()  # a disabled adapter full of NaN contributes nothing
    if s.all_scales_zero:
        # no adapter at work: bit for bit the op without adapters / vectors, on the GPU
        base_args = list(cargs)
        i = STATE_ARG[op_name]
        if op_name.startswith("ia3"):
            base_args[i - 1], base_args[i] = [], cargs[i][:0]
        else:
            if op_name in WITH_E:
                base_args[i - 1] = None
            for j in (i - 3, i - 2) if op_name in WITH_E else (i - 2, i - 1):
                base_args[j] = []
            base_args[i] = cargs[i][:0]
            if op_name != "lora_embedding":
                base_args[i + 1] = None
        assert torch.equal(y, info.op(*base_args).cpu())
        return
    if op_name in QUANT | IA3_QUANT:
        assert_within(y, r, quantized_bound(op_name, dtype, args, r), f"{op_name} on CUDA vs reference")
        return
    torch.testing.assert_close(y, r, **tol(dtype))
    if dtype in LOW:
        assert_no_worse_than_reference(y, r, info.ref(*to_exact(args)))


# ---------------------------------------------------------------------------- opcheck
# float32 only (opcheck is slow: ~0.2 s a sample); the differentiable ops with requires_grad
# (autograd registration), the others without. The dtypes' numerics are covered above.


def _opcheck_cases():
    for name, info in OPS.items():
        rg = info.differentiable
        for s in info.sample_inputs(torch.float32, torch.float32, rg):
            if s.meta.get("opcheck", True):
                yield pytest.param(info, s, rg, id=f"{name}-float32-{'grad-' if rg else ''}{s.name}")


@pytest.mark.parametrize("info,s,rg", list(_opcheck_cases()))
def test_opcheck_cuda(info, s, rg):
    _need_kernel(info.name)
    torch.library.opcheck(info.op.default, to_cuda(s.args, info.name))


# ------------------------------------------------------------------ CUDA graphs, streams
def _lora_linear_args(tokens=4, fin=256, fout=320, ranks=(16, 8), dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, fin, generator=g).to(DEV, dtype)
    w = (torch.randn(fout, fin, generator=g) * fin**-0.5).to(DEV, dtype)
    b = torch.randn(fout, generator=g).to(DEV, dtype)
    A = [(torch.randn(r, fin, generator=g) * fin**-0.5).to(DEV) for r in ranks]
    B = [(torch.randn(fout, r, generator=g) * r**-0.5).to(DEV) for r in ranks]
    scales = torch.tensor([0.5, -1.25], device=DEV)
    return x, w, b, A, B, scales


def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up outside the graph (allocator, cuBLAS handles)
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("tokens", [1, 5, 100])
def test_lora_linear_graph_capture_and_switching(tokens):
    x, w, b, A, B, scales = _lora_linear_args(tokens)
    graph, out = _capture(lambda: torch.ops.peftcore.lora_linear(x, w, b, A, B, None, scales, None))
    for new in ([0.5, -1.25], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]):
        scales.copy_(torch.tensor(new))  # a device write: the graph reads it on replay
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        x_, w_, b_, A_, B_, s_ = (t.cpu() if isinstance(t, torch.Tensor) else [u.cpu() for u in t]
                                  for t in (x, w, b, A, B, scales))
        want = reference.lora_linear(x_, w_, b_, A_, B_, None, s_, None)
        torch.testing.assert_close(out.cpu(), want, **tol(torch.bfloat16))


@pytest.mark.parametrize("tokens", [1, 16, 40])
def test_lora_linear_4bit_graph_capture(tokens):
    from tests.op_db import quantize_4bit

    g = torch.Generator().manual_seed(1)
    fin, fout = 256, 192
    wf = torch.randn(fout, fin, generator=g) * fin**-0.5
    q = quantize_4bit(wf, 64, "nf4", True)
    quant = [q["qweight"], q["absmax"], q["code"], q["blocksize"], q["nested_absmax"], q["nested_code"],
             q["nested_offset"], q["nested_blocksize"]]
    cquant = [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in quant]
    x = torch.randn(tokens, fin, generator=g).to(DEV, torch.bfloat16)
    A = [(torch.randn(16, fin, generator=g) * fin**-0.5).to(DEV)]
    B = [(torch.randn(fout, 16, generator=g) * 0.25).to(DEV)]
    scales = torch.tensor([1.0], device=DEV)
    graph, out = _capture(lambda: torch.ops.peftcore.lora_linear_4bit(x, *cquant, fout, None, A, B, None, scales,
                                                                      None))
    for new in (1.0, 0.0, -2.0):
        scales.fill_(new)
        graph.replay()
        eager = torch.ops.peftcore.lora_linear_4bit(x, *cquant, fout, None, A, B, None, scales, None)
        torch.cuda.synchronize()
        if tokens <= 16:  # the fused GEMV: same kernels, same order, bit for bit
            assert torch.equal(out, eager)
        else:  # cuBLAS may pick another algorithm inside a capture
            torch.testing.assert_close(out, eager, **tol(torch.bfloat16))


def test_kernels_run_on_the_current_stream():
    """Launched on a side stream, the ops must order after that stream's earlier work
    (they would race with it on the default stream)."""
    x, w, b, A, B, scales = _lora_linear_args(64, 1024, 1024)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x2 = x * 1.0  # queued work on the side stream that the op's input depends on
            torch.cuda._sleep(1_000_000)
            x2.add_(1.0)
        y = torch.ops.peftcore.lora_linear(x2, w, b, A, B, None, scales, None)
    torch.cuda.current_stream().wait_stream(side)
    want = torch.ops.peftcore.lora_linear(x + 1.0, w, b, A, B, None, scales, None)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, want, **tol(torch.bfloat16))


# --------------------------------------------------------------------- whole model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_parity_cpu_vs_cuda(dtype):
    """A tiny Llama with a LoRA adapter: peftcore on CUDA (model moved after adding the
    adapter: the state buffers move with it) gives peftcore-on-CPU's logits; switching
    the adapter off on the GPU gives the base model's."""
    import peftcore
    from tests._models import INPUT_IDS, tiny_llama

    model = tiny_llama()
    cfg = peftcore.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                              init_lora_weights=False)
    peftcore.add_adapter(model, cfg)
    with torch.no_grad():
        ref = model.to(dtype)(INPUT_IDS).logits.float()
        model.to(DEV)
        got = model(INPUT_IDS.to(DEV)).logits.float().cpu()
    # bfloat16: one-ulp differences of the roundings (other summation orders) carried
    # through two layers; still far below the adapter's effect, checked last.
    t = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-1, atol=1e-1)
    torch.testing.assert_close(got, ref, **t)
    with torch.no_grad(), peftcore.adapters_disabled(model):
        off = model(INPUT_IDS.to(DEV)).logits.float().cpu()
    assert (off - got).abs().max() > 1e-2  # the adapter had an effect


# ---------------------------------------------------------------------- mixed batches
# The six *_mixed ops (one adapter slot per row group, -1 = base) on every op_db sample:
# each row group equals the op's single-adapter twin on CUDA (tests/ops/test_mixed_ops.py's
# _twin and tolerances), and the whole result equals the CPU kernel's. `rows` and `scales`
# on the GPU (as the model's layers hold them: read on the device, no sync) and on the CPU.
from tests.ops.test_mixed_ops import _flat as _flat_rows  # noqa: E402
from tests.ops.test_mixed_ops import _rows, _twin, _with_rows, group_bound  # noqa: E402

MIXED = [n for n in OPS if n.endswith("_mixed")]
# Positions of the per-layer state (LoRA scales) and of rows in each mixed op's arguments.
MIXED_HOST_ARGS = {
    "lora_linear_mixed": (6, 7), "ia3_linear_mixed": (4,), "lora_linear_4bit_mixed": (14, 15),
    "lora_linear_int8_mixed": (7, 8), "ia3_linear_4bit_mixed": (12,), "ia3_linear_int8_mixed": (5,),
}
MIXED_QUANT = {"lora_linear_4bit_mixed": "lora_linear_4bit", "lora_linear_int8_mixed": "lora_linear_int8",
               "ia3_linear_4bit_mixed": "ia3_linear_4bit", "ia3_linear_int8_mixed": "ia3_linear_int8"}


def _mixed_to_cuda(name, args, state_on_device):
    cargs = list(to_cuda(args, name))
    if not state_on_device:
        for i in MIXED_HOST_ARGS[name]:
            cargs[i] = args[i]
    return tuple(cargs)


def _mixed_cases():
    for name in MIXED:
        for dt, adt in dtype_combos():
            for s in OPS[name].sample_inputs(dt, adt, False):
                for on_dev in (True, False):
                    where = "state-gpu" if on_dev else "state-cpu"
                    yield pytest.param(name, dt, s, on_dev, id=f"{name}-{str(dt)[6:]}-{str(adt)[6:]}-{s.name}-{where}")


@pytest.mark.parametrize("name,dtype,s,state_on_device", list(_mixed_cases()))
def test_mixed_groups_match_twins_and_cpu(name, dtype, s, state_on_device):
    _need_kernel(name)
    args = s.args
    cargs = _mixed_to_cuda(name, args, state_on_device)
    y = OPS[name].op(*cargs)
    torch.cuda.synchronize()
    x = args[0]
    assert y.device.type == "cuda" and y.dtype == x.dtype and y.shape == (*x.shape[:-1], y.shape[-1])
    yc = y.cpu()
    assert torch.isfinite(yc).all()  # NaN only in unused / scale-0 slots
    rows = _rows(args).tolist()
    per = math.prod(x.shape[:-1]) // len(rows)
    yf = _flat_rows(yc)
    want_cpu = _flat_rows(OPS[name].op(*args))  # the CPU kernel
    for slot in sorted(set(rows)):
        sel = [i for g, r in enumerate(rows) if r == slot for i in range(g * per, (g + 1) * per)]
        exp = _flat_rows(_twin(name, cargs, slot).cpu())[sel]
        got = yf[sel]
        if slot < 0 and "ia3" not in name:  # the base alone: the very same base pass
            assert torch.equal(got, exp), f"{name}: base rows differ from the base op on CUDA"
        else:
            torch.testing.assert_close(got, exp, **tol(dtype), msg=lambda m: f"{name} slot {slot}: {m}")
        if name in MIXED_QUANT:  # other base kernels (GEMV / cuBLAS vs CPU): the quantized bound
            bound = _flat_rows(group_bound(name, dtype, args, slot))[sel]
            # Each kernel is within `bound` of the exact result, so the two are within twice it.
            assert_within(got, want_cpu[sel], 2 * bound, f"{name} slot {slot} on CUDA vs the CPU kernel")
    if name not in MIXED_QUANT:
        torch.testing.assert_close(yf, want_cpu, **tol(dtype))


def test_mixed_many_adapters_use_several_windows():
    """40 slots (more than the 32 of one launch): every row still gets its own adapter."""
    g = torch.Generator().manual_seed(3)
    n, fin, fout = 40, 64, 48
    x = torch.randn(2 * n, fin, generator=g)
    w, b = torch.randn(fout, fin, generator=g) * fin**-0.5, torch.randn(fout, generator=g)
    A = [torch.randn(4 + a % 5, fin, generator=g) * fin**-0.5 for a in range(n)]
    B = [torch.randn(fout, 4 + a % 5, generator=g) for a in range(n)]
    scales = torch.rand(n, generator=g) + 0.5
    rows = torch.tensor([(7 * i) % (n + 1) - 1 for i in range(n)])  # every slot, and -1
    args = (x, w, b, A, B, None, scales, rows)
    cargs = to_cuda(args, "lora_linear_mixed")
    y = torch.ops.peftcore.lora_linear_mixed(*cargs).cpu()
    torch.testing.assert_close(y, reference.lora_linear_mixed(*args), **tol(torch.float32))
    l = [torch.rand(fout, generator=g) + 0.5 for _ in range(n)]
    yi = torch.ops.peftcore.ia3_linear_mixed(cargs[0], cargs[1], cargs[2], [t.to(DEV) for t in l], cargs[7], False)
    torch.testing.assert_close(yi.cpu(), reference.ia3_linear_mixed(x, w, b, l, rows, False), **tol(torch.float32))


@pytest.mark.parametrize("name", MIXED)
def test_mixed_bad_rows_on_cuda(name):
    """The CPU kernels' messages; a slot out of range is reported when rows is a CPU
    tensor, and is the base alone (as -1) when rows lives on the GPU (its values are never
    read on the host: no sync)."""
    _need_kernel(name)
    s = next(s for s in OPS[name].sample_inputs(torch.float32, torch.float32) if s.name == "6rows_3adapters")
    cargs = _mixed_to_cuda(name, s.args, True)
    op = OPS[name].op
    with pytest.raises(RuntimeError, match=rf"{name}: x has 6 rows .* rows holds 4 adapter indices"):
        op(*_with_rows(cargs, torch.tensor([0, 1, 2, 0], device=DEV)))
    with pytest.raises(RuntimeError, match=rf"{name}: rows\[1\] = 3 is not an adapter slot"):
        op(*_with_rows(cargs, torch.tensor([0, 3])))
    with pytest.raises(RuntimeError, match=rf"{name}: rows has dtype Float"):
        op(*_with_rows(cargs, torch.tensor([0.0, 1.0], device=DEV)))
    with pytest.raises(RuntimeError, match=rf"{name}: rows must be 1-D with at least one entry"):
        op(*_with_rows(cargs, torch.zeros(0, dtype=torch.int64, device=DEV)))
    y = _flat_rows(op(*_with_rows(cargs, torch.tensor([1, 3, -7], device=DEV))).cpu())
    base = _flat_rows(op(*_with_rows(cargs, torch.tensor([1, -1, -1], device=DEV))).cpu())
    assert torch.equal(y, base)
