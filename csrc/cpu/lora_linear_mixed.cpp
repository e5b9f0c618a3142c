// peftcore::lora_linear_mixed on CPU: a mixed batch over a dense base, each row group with
// its own LoRA (or AdaLoRA) adapter:
//   y[i] = x[i]·Wᵀ + b + s_k · ((x[i]·A_kᵀ) ⊙ e_k)·B_kᵀ,   k = rows[group of i] (-1: no term),
// e_k = AdaLoRA's singular values when lora_E is given (else 1). Layout: x [..., in] (any
// strides), W [out, in] (any strides: Conv1D passes a transposed view), A_k [r_k, in],
// B_k [out, r_k], E_k r_k values, scales [n] (each slot's configured scale; 0 = no term),
// rows [G] (mixed.h); y [..., out] contiguous (the .out overload writes it into the caller's
// `out`: common/output.h).
// The base is one ATen GEMM over every row (the weight streams once for the whole batch);
// the adapters are one parallel region of segmented shrink / expand (mixed.h), reading each
// used adapter once. Inference only (no autograd).
// Tests: tests/ops/test_mixed_ops.py, tests/test_mixed_batch.py. Benchmark: benchmarks/bench_mixed.py.
#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../ops.h"
#include "linear_common.h"
#include "mixed.h"

namespace peftcore {

at::Tensor lora_linear_mixed_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_LORA_ARGS,
                                 const at::Tensor& rows) {
  const char* op = "lora_linear_mixed";
  const cpu::LinearDims d = cpu::check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, std::nullopt);
  const at::TensorList E = cpu::checked_lora_E(op, lora_E, lora_A, x.scalar_type());
  const auto segs = cpu::row_segments(op, rows, d.n, int64_t(lora_A.size()));
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    // The base through F.linear's ATen calls: rows of the base alone are bit-identical to it.
    linear_into(y, x, weight, bias);
    cpu::add_lowrank_rows(x, segs, lora_A, lora_B, E, scales, d.out, y);  // no-op when no group has an adapter
  });
}

}  // namespace peftcore
