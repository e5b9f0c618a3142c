// peftcore::adalora_linear on CPU: PEFT's AdaLoRA SVDLinear, unmerged,
//   y = x·Wᵀ + b + Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ,   s_a = scaling / (ranknum + 1e-5),
// Layout: x [..., in] (any strides), W [out, in] (any strides), A_a [r_a, in], E_a r_a
// values ([r_a, 1] as PEFT stores them), B_a [out, r_a]; y [..., out] contiguous (the .out
// overload writes it into the caller's `out`: common/output.h).
// lora_linear's machinery throughout (linear_common.h): ATen GEMM for the base, the fused
// shrink / expand for the adapters, with E applied to the shrink result t (rows × r_a
// multiplies) instead of building A ⊙ E. Scale 0 or rank 0: the adapter is skipped.
// The backward is Python (peftcore/_ops.py): lora_linear_backward with A ⊙ E, chain rule.
// Tests: tests/ops/test_adalora_linear.py, test_opcheck.py. Benchmark: benchmarks/bench_lora_linear.py.
#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../ops.h"
#include "linear_common.h"
#include "lowrank_parallel.h"

namespace peftcore {

at::Tensor adalora_linear_cpu(const Out* out, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_E,
                              at::TensorList lora_B, const at::Tensor& scales, std::optional<at::TensorList> lora_x) {
  const char* op = "adalora_linear";
  const cpu::LinearDims d = cpu::check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, lora_x);
  cpu::check_lora_E(op, lora_E, lora_A, x.scalar_type());
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    // The base through F.linear's ATen calls: with no active adapter, bit-identical to the frozen layer.
    linear_into(y, x, weight, bias);
    int64_t R = 0;
    const auto active = cpu::active_adapters(scales, lora_A, R);
    if (active.empty() || y.numel() == 0) return;
    cpu::add_lowrank(x, lora_A, lora_B, lora_x, active, R, d, y, lora_E);
  });
}

}  // namespace peftcore
