// peftcore::lora_linear on CPU: y = x·Wᵀ + b + Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ, and its backward.
// Layout: x [..., in] (any strides), W [out, in] (any strides: GPT-2's Conv1D passes
// a transposed [in, out] view), A_a [r_a, in], B_a [out, r_a], E_a (AdaLoRA, optional):
// r_a values ([r_a, 1] as PEFT stores them); y [..., out] contiguous.
// Forward = ATen GEMM for the base + the fused low-rank shrink / expand of lowrank.h,
// threaded in one parallel region by lowrank_parallel.h's lowrank_update; E scales the
// shrink result t per rank (rows × r_a multiplies) instead of building A ⊙ E;
// backward = the ATen GEMMs of common/lora_backward.h (shared with CUDA), after the CPU checks
// (with E: on A ⊙ E, the chain rule to A and E in _ops.py).
// Tests: tests/ops/test_lora_linear.py (AdaLoRA: test_adalora_linear.py), test_opcheck.py, tests/test_autograd.py.
// Benchmark: benchmarks/bench_lora_linear.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/checks.h"
#include "../common/lora_backward.h"
#include "../ops.h"
#include "lowrank.h"
#include "linear_common.h"
#include "lowrank_parallel.h"

namespace peftcore {

using cpu::check_linear_args;

at::Tensor lora_linear_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_LORA_ARGS,
                           std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear";
  const cpu::LinearDims d = check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, lora_x);
  const at::TensorList E = cpu::checked_lora_E(op, lora_E, lora_A, x.scalar_type());
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    // The base goes through F.linear's ATen calls, so with no active adapter the
    // result is bit-identical to the frozen layer.
    linear_into(y, x, weight, bias);
    int64_t R = 0;
    const auto active = cpu::active_adapters(scales, lora_A, R);
    if (active.empty() || y.numel() == 0) return;
    cpu::add_lowrank(x, lora_A, lora_B, lora_x, active, R, d, y, E);
  });
}

LinearGrads lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                         std::optional<at::TensorList> lora_x, std::array<bool, 4> output_mask) {
  const char* op = "lora_linear_backward";
  const cpu::LinearDims d = check_linear_args(op, x, weight, std::nullopt, lora_A, lora_B, scales, lora_x);
  check_defined(op, grad_out, "grad_out");
  check_device(op, grad_out, "grad_out", at::kCPU);
  check_float_dtype(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == d.out && grad_out.numel() == d.n * d.out, "peftcore::", op,
              ": grad_out has shape ", grad_out.sizes(), " but the forward output has shape x.shape[:-1] + [", d.out,
              "] with x.shape = ", x.sizes());
  return lora_linear_grads(grad_out, x, weight, lora_A, lora_B, read_state(scales), lora_x, output_mask, d.in, d.out);
}

}  // namespace peftcore
