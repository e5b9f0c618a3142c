"""Shared numerics helpers of the op tests: the tolerance table and the
"no worse than the reference" check used for low-precision dtypes."""
from __future__ import annotations

import functools

import pytest
import torch

# Native kernel vs reference.py, same inputs, same output dtype. Both compute the
# base identically (same ATen GEMM) and the low-rank sum in float32 (float64), but
# in different orders (register-blocked dot products vs BLAS), so they differ by
# rounding of the sum, and in the low-precision dtypes that can flip the final cast.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # fp32: sums of <= ~300 O(1) terms in a different order: a few ulps (2^-23 ~ 1.2e-7)
    # times sqrt(#terms) relative to the magnitudes summed, ~1e-6; 1e-5 leaves margin.
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # fp64 (gradcheck dtype): same argument at 2^-52.
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    # bf16 keeps 8 significant bits: one ulp is 2^-8 ~ 3.9e-3 relative, and the two sums
    # differ just before the cast, so the results may land one ulp apart (rounding
    # across a tie); 2 ulps relative plus an absolute floor for values near 0.
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
    # fp16 keeps 11 bits: one ulp is 2^-11 ~ 4.9e-4 relative; same reasoning, 2 ulps.
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}

# Backward: grads are sums over the batch (tens of rows × ranks) done by ATen GEMMs in
# fp32 on both sides, but associated differently (the scale applied before or after a
# product, addmm_ vs +, autograd's own order). Terms of |~10| cancel down to small
# results, so the absolute error is ~1e-5 and the relative one of a small entry larger.
GRAD_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),  # 4 ulps: one cast of a sum that may differ by 1 ulp
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES[dtype]


def grad_tol(dtype: torch.dtype) -> dict[str, float]:
    return GRAD_TOLERANCES[dtype]


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_no_worse_than_reference(native: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, factor: float = 2.0):
    """Low-precision check: the native result's max error against an fp64 ground truth is
    at most ``factor`` times the reference implementation's own, plus one ulp of the
    output's magnitude (when the reference happens to be exact, a tie may still round
    the other way)."""
    assert native.shape == ref.shape == exact.shape
    if native.numel() == 0:
        return
    exact = exact.double()
    err_native = (native.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    slack = eps(native.dtype) * exact.abs().max().item()
    assert err_native <= factor * err_ref + slack, (
        f"native max error {err_native:.3e} > {factor} x reference error {err_ref:.3e} + {slack:.3e} "
        f"(dtype {native.dtype})"
    )


# ------------------------------------------------ quantized bases (lora_linear_4bit / _int8)
# Native kernel vs reference.py. The reference multiplies x by the exact float32 W
# (dequantized) with float32 accumulation; the native kernel
#   * for float32 x with PEFTCORE_QUANT_FP32=exact, or on a CPU without AVX512_BF16:
#     float32 products and accumulation, in another order (panels of decoded rows, SIMD
#     lanes): sums of K <= 512 terms differ by ~sqrt(K)·2^-24 ~ 1e-6 relative to the
#     magnitudes summed; 1e-5 leaves margin;
#   * for float32 x by default on a CPU with AVX512_BF16 (quant_linear.cpp, compute_type):
#     as float16 x below, x and W each rounded to bfloat16 once;
#   * int8 weights from INT8_X_ROWS token rows with bf16 products: x quantized to int8
#     (int8_x_bound below, added on top);
#   * for bfloat16 / float16 x: x and the dequantized W each rounded to bfloat16 once
#     (8 significant bits, unit roundoff u = 2^-8), products exact in float32, float32
#     accumulation. Each product x_k·w_k then errs by at most 2^-8·|x_k·w_k| when x is
#     already bfloat16 (only w rounded) and 2·2^-8 (+2^-16) when x is float16 (both
#     rounded), so the sum errs by at most PRODUCT_ERROR·Σ_k |x_k|·|w_k| (a worst case:
#     random errors typically cancel to ~1/sqrt(K) of it, but the bound never flakes);
#   * float64 x (gradcheck): float64 throughout, 1e-12.
# On top, each side rounds to x.dtype up to twice (the base, then base + low-rank
# branch), each rounding within u_dt = eps_dt / 2 of the value rounded, so both sides
# together differ by at most eps_dt·(|base| + |y|) there; the low-rank branch itself is
# float32 on both sides (covered by the accumulation term). Hence, per output element,
#   |native - reference| <= PRODUCT_ERROR[dt]·S_base + eps_dt·(|base| + |y|) + ACC_ERROR[dt]·S
# with S_base = |x|·|W|ᵀ + |b| and S = S_base + Σ_a |s_a|·(|x_a|·|A_a|ᵀ)·|B_a|ᵀ (the
# magnitudes summed), times a 1.1 margin for second-order terms.
QUANT_PRODUCT_ERROR: dict[torch.dtype, float] = {
    torch.float32: 0.0,
    torch.float64: 0.0,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2 * 2.0**-8 + 2.0**-16,
}
QUANT_ACC_ERROR: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float64: 1e-12,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}


@functools.lru_cache(maxsize=None)
def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def bf16_products(dtype: torch.dtype) -> bool:
    """Whether the native quantized CPU kernels multiply x of this dtype in bfloat16 here
    (quant_linear.cpp, compute_type): bf16 x, and float32 x unless PEFTCORE_QUANT_FP32=exact,
    on a CPU with AVX512_BF16 whose ISA is not capped below AVX-512 (the variables are read
    at every call, as the kernels read them)."""
    import os

    from peftcore import native

    if native._C_ERROR is not None or os.environ.get("PEFTCORE_CPU_ISA") in ("generic", "avx2"):
        return False
    if dtype != torch.bfloat16 and not (dtype == torch.float32 and os.environ.get("PEFTCORE_QUANT_FP32") != "exact"):
        return False
    return _cpu_has_avx512_bf16()


# From this many token rows, an int8 base with bf16 products takes LLM.int8's own scheme
# (quant_linear.cpp, int8_x_linear): x quantized to int8 per row (absmax / 127), features
# with |x| >= 6 in float32. Each x_k then errs by at most amax_m / 254 (amax_m: the row's
# largest |x| outside those features), so the base by at most amax_m / 254 · Σ_k |W_nk|.
INT8_X_ROWS = 128


def int8_x_bound(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The int8 x quantization's bound (above) for x [..., K] against W [N, K] (float64),
    zero where the scheme does not apply."""
    x2 = x.detach().reshape(-1, x.shape[-1]).double()
    if x2.shape[0] < INT8_X_ROWS or not bf16_products(x.dtype):
        return torch.zeros((*x.shape[:-1], W.shape[0]), dtype=torch.float64)
    outlier = x2.abs().amax(0) >= 6.0
    amax = x2.masked_fill(outlier, 0).abs().amax(1, keepdim=True)
    return (amax / 254 * W.abs().sum(1)).reshape(*x.shape[:-1], W.shape[0])


def quant_tolerance(dtype: torch.dtype, s_base: torch.Tensor, s_all: torch.Tensor, base: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """Per-element bound (float64) on |native - reference| for the quantized ops (see above).
    float32 / float64 outputs are rounded the same way on both sides to within their
    accumulation error, so the rounding term only applies to bfloat16 / float16."""
    rounding = eps(dtype) * (base.double().abs() + y.double().abs()) if dtype in (torch.bfloat16, torch.float16) else 0.0
    product = QUANT_PRODUCT_ERROR[torch.float16 if dtype == torch.float32 and bf16_products(dtype) else dtype]
    return 1.1 * (product * s_base + rounding + QUANT_ACC_ERROR[dtype] * s_all)


def split_quantized(op_name, args):
    """lora_linear_4bit / _int8 arguments as (x, W as float64 [out, in], bias, lora_A,
    lora_B, lora_E, scales, lora_x, base args builder: the same call without adapters)."""
    from peftcore import reference

    if op_name == "lora_linear_4bit":
        x, *quant, bias, lora_A, lora_B, lora_E, scales, lora_x = args
        W = reference.dequantize_4bit(*quant, x.shape[-1], torch.float64)

        def base_args():
            return (x, *quant, bias, [], [], None, scales[:0], None)

    else:
        x, CB, SCB, bias, lora_A, lora_B, lora_E, scales, lora_x = args
        W = reference.dequantize_int8(CB, SCB, torch.float64)

        def base_args():
            return (x, CB, SCB, bias, [], [], None, scales[:0], None)

    return x, W, bias, lora_A, lora_B, lora_E, scales, lora_x, base_args


def split_ia3_quantized(op_name, args):
    """ia3_linear_4bit / _int8 arguments as (x, W float64, bias, ia3_l, active, feedforward,
    base(op, x') -> op without IA3 on x', the name of that base op)."""
    from peftcore import reference

    if op_name == "ia3_linear_4bit":
        x, *quant, bias, ia3_l, active, ff = args
        W = reference.dequantize_4bit(*quant, x.shape[-1], torch.float64)

        def base(op, t):
            return op(t, *quant, bias, [], [], None, torch.zeros(0), None)

        base_name = "lora_linear_4bit"
    else:
        x, CB, SCB, bias, ia3_l, active, ff = args
        W = reference.dequantize_int8(CB, SCB, torch.float64)

        def base(op, t):
            return op(t, CB, SCB, bias, [], [], None, torch.zeros(0), None)

        base_name = "lora_linear_int8"
    return x, W, bias, ia3_l, active, ff, base, base_name


def _magnitudes(x, W, bias, lora_A, lora_B, lora_E, scales, lora_x):
    """S_base = |x|·|W|ᵀ + |b| and S = S_base + Σ_active |s|·((|x_a|·|A|ᵀ) ⊙ |E|)·|B|ᵀ, float64."""
    ax = x.detach().double().abs()
    s_base = ax @ W.abs().t()
    if bias is not None:
        s_base = s_base + bias.detach().double().abs()
    s_all = s_base.clone()
    for a, s in enumerate(scales.tolist()):
        if s == 0.0 or lora_A[a].shape[0] == 0:
            continue
        xa = ax if lora_x is None else lora_x[a].detach().double().abs()
        t = xa @ lora_A[a].detach().double().abs().t()
        if lora_E is not None:
            t = t * lora_E[a].detach().double().abs().reshape(-1)
        s_all = s_all + abs(s) * (t @ lora_B[a].detach().double().abs().t())
    return s_base, s_all


def quantized_bound(op_name, dtype, args, r):
    """Per-element bound (float64) on |native - reference| of one of the four quantized
    single-adapter ops (lora_ / ia3_linear_4bit / _int8) at ``args``; ``r`` is the
    reference's result there (see quant_tolerance). IA3 scales the base bound through l:
    on x before the base (feedforward) or after it, with one more rounding in bf16 / fp16."""
    from peftcore import reference

    ref = getattr(reference, op_name)
    if op_name.startswith("lora_"):
        x, W, bias, lora_A, lora_B, lora_E, scales, lora_x, base_args = split_quantized(op_name, args)
        s_base, s_all = _magnitudes(x, W, bias, lora_A, lora_B, lora_E, scales, lora_x)
        int8_x = 1.1 * int8_x_bound(x, W) if op_name == "lora_linear_int8" else 0.0
        return quant_tolerance(dtype, s_base, s_all, ref(*base_args()), r) + int8_x
    x, W, bias, ia3_l, active, ff, base, base_name = split_ia3_quantized(op_name, args)
    ref_base = getattr(reference, base_name)
    f = torch.float64 if dtype == torch.float64 else torch.float32
    l = reference.ia3_vector(ia3_l, active, f)  # noqa: E741
    if l is not None and ff:
        x = (x.to(f) * l).to(x.dtype)
    s_base = x.detach().double().abs() @ W.abs().t() + (bias.detach().double().abs() if bias is not None else 0)
    b = base(ref_base, x)
    int8_x = 1.1 * int8_x_bound(x, W) if op_name == "ia3_linear_int8" else 0.0
    if l is None or ff:
        return quant_tolerance(dtype, s_base, s_base, b, r) + int8_x
    bound = l.double().abs() * (quant_tolerance(dtype, s_base, s_base, b, b) + int8_x)
    if dtype in (torch.bfloat16, torch.float16):  # the second rounding, after the scale
        bound = bound + torch.finfo(dtype).eps * r.double().abs()
    return bound


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = ""):
    """|got - want| <= bound element-wise (float64), with the worst offender in the message."""
    assert got.shape == want.shape == bound.shape, (got.shape, want.shape, bound.shape)
    if got.numel() == 0:
        return
    err = (got.double() - want.double()).abs()
    ratio = err / bound.clamp_min(1e-300)
    i = int(ratio.reshape(-1).argmax())
    worst = ratio.reshape(-1)[i].item()
    assert worst <= 1.0, (
        f"{what}: |got - want| = {err.reshape(-1)[i].item():.3e} at flat index {i} exceeds the bound "
        f"{bound.reshape(-1)[i].item():.3e} ({worst:.2f}x; got {got.reshape(-1)[i].item():.6g}, "
        f"want {want.reshape(-1)[i].item():.6g}, dtype {got.dtype})"
    )


def gradcheck_op(op, s) -> None:
    """float64 ``torch.autograd.gradcheck`` of ``op`` over sample ``s`` w.r.t. every tensor
    argument that requires grad, and every tensor of a Tensor[] argument (adapters, lora_x).
    fast_mode (random projections vᵀ·J·u instead of the full Jacobian: a few forwards
    instead of one per input element) above 300 elements; a wrong Jacobian entry still
    fails it with probability 1. NaN leaves (inactive adapters) are replaced by finite
    ones, since gradcheck perturbs every leaf; they must still get zero gradients."""
    args = list(s.args)
    slots = []  # (position in args, index in a list or None) of each differentiable leaf
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            slots.append((i, None))
        elif isinstance(a, list) and a and all(isinstance(t, torch.Tensor) for t in a):
            slots.extend((i, j) for j in range(len(a)))
    leaves = [args[i] if j is None else args[i][j] for i, j in slots]
    leaves = [torch.where(torch.isnan(t), torch.ones_like(t), t).detach().requires_grad_() for t in leaves]

    def fn(*flat):
        call = [list(a) if isinstance(a, list) else a for a in args]
        for (i, j), t in zip(slots, flat):
            if j is None:
                call[i] = t
            else:
                call[i][j] = t
        return op(*call)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=s.n_elements > 300)


def check_compiled_matches_eager(m, x, params, exact: bool = False) -> None:
    """``torch.compile(m, fullgraph=True)``: the graph traces without breaks (fake kernels,
    tensor-only backward), the output equals eager mode's (bit for bit if ``exact``, else
    to 1e-6: fused graphs may reorder float sums), and the gradients w.r.t. ``params``
    agree to 1e-5 (the backward's GEMMs may be scheduled differently)."""
    torch._dynamo.reset()
    y_eager = m(x)
    go = torch.randn_like(y_eager)
    grads_eager = torch.autograd.grad(y_eager, params, go)
    y = torch.compile(m, fullgraph=True)(x)
    if exact:
        assert torch.equal(y, y_eager)
    else:
        torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(y, params, go), grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def has_cuda_kernels() -> bool:
    """A GPU is present and this build has the CUDA kernels."""
    from peftcore import native

    return torch.cuda.is_available() and native.native_available("lora_linear", "cuda")


# The devices of a test that runs on both: the CPU always, the GPU (marked cuda) when there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not has_cuda_kernels(), reason="no GPU, or this build has no CUDA kernels")])]


def largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while fn() runs, from the profiler's
    memory events (every at::empty / ATen temporary goes through the CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"], default=0)
