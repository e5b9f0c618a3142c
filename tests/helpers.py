"""Shared numerics helpers of the op tests: the tolerance table and the
"no worse than the reference" check used for low-precision dtypes."""
from __future__ import annotations

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
