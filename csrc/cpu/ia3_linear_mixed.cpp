// peftcore::ia3_linear_mixed on CPU: a mixed batch over a dense base, each row group with
// its own (IA)³ vector l_k (k = rows[group], -1: none), PEFT's roundings as ia3_linear:
//   feedforward = False: y[i] = round_x(float(x[i]·Wᵀ + b) ⊙ l_k)
//   feedforward = True:  y[i] = round_x(float(x[i]) ⊙ l_k)·Wᵀ + b
// Layout: x [..., in] (any strides), W [out, in] (any strides), ia3_l[k] out (in) values,
// rows [G] (mixed.h); y [..., out] contiguous (the .out overload writes it into the caller's
// `out`: common/output.h). One ATen GEMM over every row; the scaling is one parallel pass
// over the rows that have a vector (outputs in place, or the scaled copy of x).
// Inference only (no autograd).
// Tests: tests/ops/test_mixed_ops.py, tests/test_mixed_batch.py. Benchmark: benchmarks/bench_mixed.py.
#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../ops.h"
#include "linear_common.h"
#include "mixed.h"

namespace peftcore {

at::Tensor ia3_linear_mixed_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS),
                                PEFTCORE_IA3_ARGS(const at::Tensor& rows)) {
  const char* op = "ia3_linear_mixed";
  const cpu::LinearDims d = cpu::check_base_linear(op, x, weight, bias);
  const auto segs = cpu::row_segments(op, rows, d.n, int64_t(ia3_l.size()));
  const auto vecs = cpu::ia3_slot_vectors(op, ia3_l, segs, x.scalar_type(), feedforward ? d.in : d.out,
                                          feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                                      : "output feature (feedforward=False: weight.shape[0])");
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    if (feedforward) {
      linear_into(y, segs.empty() ? x : cpu::ia3_scaled_input_rows(x, segs, vecs), weight, bias);
      return;
    }
    linear_into(y, x, weight, bias);
    cpu::ia3_scale_output_rows(y, segs, vecs);  // bias included, as PEFT scales the whole base output
  });
}

}  // namespace peftcore
