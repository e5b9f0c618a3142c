// peftcore::lora_linear on CUDA: y = x·Wᵀ + b + Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ, and its backward.
// Layout: x [..., in] (any strides), W [out, in] (any strides: GPT-2's Conv1D passes a
// transposed view), A_a [r_a, in], B_a [out, r_a], E_a (AdaLoRA, optional): r_a values;
// y [..., out] contiguous, a fresh tensor or the caller's `out` (the .out overload;
// common/output.h). E scales the shrink result inside the shrink kernel (r_a multiplies
// per row) instead of building A ⊙ E.
// Forward: the base written into y through F.linear's ATen calls (cuBLAS; with no adapter
// on, y is the frozen layer's output bit for bit), then the low-rank update of lowrank.cu:
// one shrink launch over all adapters and one expand launch adding into y in place, on the
// current stream, scales read on the device when they live there (no sync: graph-capturable).
// Backward: the ATen GEMMs of common/lora_backward.h (shared with the CPU; training only;
// with E on A ⊙ E, the chain rule in _ops.py).
// Tests: tests/test_cuda.py (lora_linear / lora_linear_backward samples, opcheck, graph
// capture). Benchmark: benchmarks/bench_cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks_cuda.h"
#include "lowrank.h"
#include "ops_cuda.h"
#include "../common/lora_backward.h"
#include "../common/state.h"

namespace peftcore {

using namespace peftcore::cuda;

at::Tensor lora_linear_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_LORA_ARGS,
                            std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear";
  const LinearDims d = check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, lora_x);
  const at::TensorList E = checked_lora_E(op, lora_E, lora_A, x.device(), x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    linear_into(y, x, weight, bias);
    if (lora_A.empty() || y.numel() == 0) return;
    add_lowrank(x, lora_A, lora_B, lora_x, E, read_state(scales), y);
  });
}

LinearGrads lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                          std::optional<at::TensorList> lora_x, std::array<bool, 4> output_mask) {
  const char* op = "lora_linear_backward";
  const LinearDims d = check_linear_args(op, x, weight, std::nullopt, lora_A, lora_B, scales, lora_x);
  check_on(op, grad_out, "grad_out", x.device());
  check_float_dtype(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == d.out && grad_out.numel() == d.n * d.out, "peftcore::", op,
              ": grad_out has shape ", grad_out.sizes(), " but the forward output has shape x.shape[:-1] + [", d.out,
              "] with x.shape = ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_grads(grad_out, x, weight, lora_A, lora_B, read_state(scales), lora_x, output_mask, d.in, d.out);
}

}  // namespace peftcore
