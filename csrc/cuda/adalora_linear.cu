// peftcore::adalora_linear on CUDA: PEFT's AdaLoRA SVDLinear, unmerged,
//   y = x·Wᵀ + b + Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ,   s_a = scaling / (ranknum + 1e-5).
// Layout as lora_linear (lora_linear.cu; y a fresh tensor or the caller's `out`); E_a: r_a
// values ([r_a, 1] as PEFT stores them).
// lora_linear's path, with E applied to the shrink result inside the shrink kernel
// (r_a multiplies per row) instead of building A ⊙ E. The backward is Python (_ops.py).
// Tests: tests/test_cuda.py (adalora_linear samples). Benchmark: benchmarks/bench_cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks_cuda.h"
#include "lowrank.h"
#include "ops_cuda.h"
#include "../common/state.h"

namespace peftcore {

using namespace peftcore::cuda;

at::Tensor adalora_linear_cuda(const Out* out, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_E,
                               at::TensorList lora_B, const at::Tensor& scales, std::optional<at::TensorList> lora_x) {
  const char* op = "adalora_linear";
  const LinearDims d = check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, lora_x);
  check_lora_E(op, lora_E, lora_A, x.device(), x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    linear_into(y, x, weight, bias);
    if (lora_A.empty() || y.numel() == 0) return;
    add_lowrank(x, lora_A, lora_B, lora_x, lora_E, read_state(scales), y);
  });
}

}  // namespace peftcore
