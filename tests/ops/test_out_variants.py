"""The ``.out`` overloads of the forward ops (``peftcore._ops.FORWARD_OPS``).

Over every op_db sample, the result written into a caller's buffer equals the functional
op's bit for bit (one native entry point serves both, csrc/common/output.h), into a
contiguous and into a strided buffer, on the CPU and (marked ``cuda``) on a GPU; the
buffer keeps its storage (never resized or replaced). Bad buffers are refused with the
values in the message and are left untouched, as is a buffer passed with bad inputs.
Then opcheck, torch.compile, the typed entry points' ``out=`` and graph capture into a
static buffer (GPU).
"""
from __future__ import annotations

import pytest
import torch

from peftcore import native, ops, reference
from peftcore._ops import FORWARD_OPS
from tests.helpers import DEVICES, has_cuda_kernels
from tests.op_db import OPS, dtype_combos, native_loaded


def _to(args, device):
    def conv(a):
        if isinstance(a, list):
            return [conv(t) for t in a]
        return a.to(device) if isinstance(a, torch.Tensor) else a

    return tuple(conv(a) for a in args)


def _strided(shape, dtype, device):
    """An empty buffer of `shape` whose memory is not in row-major order."""
    if len(shape) >= 2:
        return torch.empty(list(reversed(shape)), dtype=dtype, device=device).permute(*reversed(range(len(shape))))
    n = shape[0] if shape else 1
    return torch.empty(2 * n, dtype=dtype, device=device)[::2].view(shape)


def _cases():
    for name in FORWARD_OPS:
        info = OPS[name]
        for dt, adt in dtype_combos():
            for s in info.sample_inputs(dt, adt, False):
                yield pytest.param(name, s, id=f"{name}-{str(dt)[6:]}-{str(adt)[6:]}-{s.name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,s", list(_cases()))
def test_out_equals_functional(name, s, device):
    op = getattr(torch.ops.peftcore, name)
    args = _to(s.args, device)
    want = op(*args)
    for out in (torch.full_like(want, float("nan")), _strided(want.shape, want.dtype, want.device).fill_(float("nan"))):
        ptr, strides = out.data_ptr(), out.stride()
        assert op.out(*args, out=out) is None
        assert (out.data_ptr(), out.stride()) == (ptr, strides), "out was replaced or resized"
        # NaN-filled first: an element the kernel forgot to write shows up here.
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)


def _square_lora_args(device, n=3, f=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, f, generator=g)
    w = torch.randn(f, f, generator=g)
    b = torch.randn(f, generator=g)
    return _to((x, w, b, [torch.randn(2, f, generator=g)], [torch.randn(f, 2, generator=g)], None,
                torch.tensor([0.5]), None), device)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_out_is_refused_and_left_untouched(device):
    op = torch.ops.peftcore.lora_linear
    args = _square_lora_args(device, n=8)  # x, W and the result all [8, 8]: aliasing them is possible
    x, w, b = args[:3]
    cases = [
        (torch.zeros(8, 9, device=device), "out has shape \\[8, 9\\] but the result has shape \\[8, 8\\]"),
        (torch.zeros(64, device=device), "out has shape \\[64\\]"),
        (torch.zeros(8, 8, dtype=torch.float64, device=device), "out has dtype Double but the result has dtype Float"),
        (torch.zeros(8, device=device).expand(8, 8), "share memory"),
    ]
    if device == "cuda":
        cases.append((torch.zeros(8, 8), "out is on cpu but the result is on cuda"))
    for out, msg in cases:
        before = out.clone()
        with pytest.raises(RuntimeError, match=msg):
            op.out(*args, out=out)
        assert torch.equal(out, before)
    # Buffers the op would read while writing them: x, W, one that holds the bias, an
    # adapter's B, the LoRA input.
    storage = torch.randn(64, device=device)
    view = storage.view(8, 8)
    A, B, _, s = args[3:7]
    for out, call_args in ((x, args), (w, args), (view, (x, w, storage[56:], A, B, None, s, None)),
                           (view, (x, w, b, [storage[:16].view(2, 8)], B, None, s, None)),
                           (view, (x, w, b, A, B, [storage[:2].view(2, 1)], s, None)),
                           (view, (x, w, b, A, B, None, s, [view]))):
        before = out.clone()
        with pytest.raises(RuntimeError, match="shares memory with an input of shape"):
            op.out(*call_args, out=out)
        assert torch.equal(out, before)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_leave_out_untouched(device):
    x, w, b, A, B, _, s, _ = _square_lora_args(device)
    out = torch.full((3, 8), 7.0, device=device)
    with pytest.raises(RuntimeError, match=r"lora_B\[0\] has shape \[5, 2\]"):
        torch.ops.peftcore.lora_linear.out(x, w, b, A, [B[0][:5]], None, s, None, out=out)
    with pytest.raises(RuntimeError, match=r"lora_E\[0\] has shape \[3, 1\]"):
        torch.ops.peftcore.lora_linear.out(x, w, b, A, B, [torch.ones(3, 1, device=device)], s, None, out=out)
    with pytest.raises(RuntimeError, match="ia3_linear"):
        torch.ops.peftcore.ia3_linear.out(x, w, b, [torch.ones(5, device=device)], torch.ones(1), False, out=out)
    assert torch.equal(out, torch.full((3, 8), 7.0, device=device))


def _opcheck_cases():
    for name in FORWARD_OPS:
        info = OPS[name]
        for s in info.sample_inputs(torch.float32, torch.float32, False):
            if s.meta.get("opcheck", True):
                yield pytest.param(name, s, id=f"{name}-{s.name}")
                break  # one sample per op: the functional op's opcheck covers the samples


@pytest.mark.parametrize("name,s", list(_opcheck_cases()))
def test_opcheck_out(name, s):
    op = getattr(torch.ops.peftcore, name)
    out = torch.empty_like(op(*s.args))
    torch.library.opcheck(op.out, s.args, {"out": out})


@pytest.mark.parametrize("name", ["lora_linear", "ia3_linear_int8", "lora_linear_mixed"])
def test_compiled_out_matches_eager(name):
    info = OPS[name]
    s = next(iter(info.sample_inputs(torch.float32, torch.float32, False)))
    op = getattr(torch.ops.peftcore, name)
    want = op(*s.args)

    def step(args, out):
        op.out(*args, out=out)
        return out * 2

    out = torch.empty_like(want)
    doubled = torch.compile(step, fullgraph=True)(s.args, out)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(doubled, want * 2, rtol=0, atol=0)


def test_typed_entry_points_take_out():
    x, w, b, A, B, _, s, _ = _square_lora_args("cpu")
    out = torch.empty(3, 8)
    assert ops.lora_linear(x, w, b, A, B, s, out=out) is out
    assert torch.equal(out, ops.lora_linear(x, w, b, A, B, s))
    E = [torch.tensor([[0.5], [-2.0]])]
    assert ops.adalora_linear(x, w, b, A, E, B, s, out=out) is out
    assert torch.equal(out, ops.lora_linear(x, w, b, A, B, s, lora_E=E))
    torch.testing.assert_close(out, reference.lora_linear(x, w, b, A, B, E, s), rtol=1e-5, atol=1e-5)  # fp32 sum order
    l = [torch.rand(8) + 0.5]
    assert ops.ia3_linear(x, w, b, l, out=out) is out
    assert torch.equal(out, ops.ia3_linear(x, w, b, l))


@pytest.mark.skipif(not native_loaded(), reason="peftcore._C not loaded (PEFTCORE_DISABLE_C or not built)")
@pytest.mark.parametrize("name", FORWARD_OPS)
def test_out_has_native_cpu_kernel(name):
    assert native.native_available(f"{name}.out", "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda_kernels(), reason="no GPU, or this build has no CUDA kernels")
@pytest.mark.parametrize("tokens", [1, 5, 100])
def test_graph_capture_into_static_buffer(tokens):
    """A captured .out call writes the same buffer on every replay; the state written on
    the device between replays switches adapters."""
    g = torch.Generator().manual_seed(tokens)
    fin, fout = 256, 320
    x = torch.randn(tokens, fin, generator=g).cuda().bfloat16()
    w = (torch.randn(fout, fin, generator=g) * fin**-0.5).cuda().bfloat16()
    A = [(torch.randn(16, fin, generator=g) * fin**-0.5).cuda()]
    B = [(torch.randn(fout, 16, generator=g) * 0.25).cuda()]
    scales = torch.tensor([1.0], device="cuda")
    out = torch.empty(tokens, fout, device="cuda", dtype=torch.bfloat16)
    run = lambda: torch.ops.peftcore.lora_linear.out(x, w, None, A, B, None, scales, None, out=out)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm up outside the graph (allocator, cuBLAS handles)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ptr = out.data_ptr()
    for new in (1.0, 0.0, -2.0):
        scales.fill_(new)
        x.normal_()
        graph.replay()
        want = torch.ops.peftcore.lora_linear(x, w, None, A, B, scales, None)
        torch.cuda.synchronize()
        assert out.data_ptr() == ptr
        torch.testing.assert_close(out, want, rtol=1.6e-2, atol=1e-5)  # bf16 output; cuBLAS may pick another algorithm in a capture


@pytest.mark.parametrize("name", ["lora_linear", "lora_linear_mixed", "ia3_linear_mixed"])
def test_runs_with_grad_enabled(name):
    """An eval() model run without no_grad has parameters that require grad: the .out
    overloads and the inference-only mixed ops must still run (the kernels' out= ATen calls
    would refuse them under autograd) and give the no_grad result."""
    s = next(iter(OPS[name].sample_inputs(torch.float32, torch.float32, False)))
    op = getattr(torch.ops.peftcore, name)
    with torch.no_grad():
        want = op(*s.args)

    def leaf(a):
        if isinstance(a, list):
            return [leaf(t) for t in a]
        return a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    args = tuple(leaf(a) if i < 2 else a for i, a in enumerate(s.args))  # x and the weight
    out = torch.empty_like(want)
    op.out(*args, out=out)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    if name != "lora_linear":  # lora_linear trains through its autograd formula
        torch.testing.assert_close(op(*args).detach(), want, rtol=0, atol=0)
