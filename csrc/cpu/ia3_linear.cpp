// peftcore::ia3_linear on CPU: PEFT's (IA)³ Linear, unmerged, with l = Π_{active a} ia3_l[a]:
//   feedforward = False (attention projections): y = round_x(float(x·Wᵀ + b) ⊙ l), l over outputs
//   feedforward = True  (feed-forward inputs):   y = round_x(float(x) ⊙ l)·Wᵀ + b, l over inputs
// (float64 for float64 x). Layout: x [..., in] (any strides), W [out, in] (any strides:
// GPT-2's Conv1D passes a transposed view), ia3_l[a] any shape of out (in) values;
// y [..., out] contiguous (the .out overload writes it into the caller's `out`:
// common/output.h). The GEMM is the ATen call of F.linear, the scaling one
// parallel pass (ia3.h), so the result is PEFT's bit for bit in every dtype. No active
// adapter: exactly F.linear. The backward is Python (peftcore/_ops.py, ATen ops).
// Tests: tests/ops/test_ia3_linear.py, test_opcheck.py. Benchmark: benchmarks/bench_lora_linear.py.
#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../ops.h"
#include "ia3.h"
#include "linear_common.h"

namespace peftcore {

at::Tensor ia3_linear_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS),
                          PEFTCORE_IA3_ARGS(const at::Tensor& active)) {
  const char* op = "ia3_linear";
  const cpu::LinearDims d = cpu::check_base_linear(op, x, weight, bias);
  const at::Tensor l =
      cpu::ia3_vector(op, ia3_l, active, x.scalar_type(), feedforward ? d.in : d.out,
                      feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                  : "output feature (feedforward=False: weight.shape[0])");
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    if (l.defined() && feedforward) {
      // The scaled copy of x, then the same GEMM as PEFT's base_layer(x'). A strided x
      // goes through ATen's elementwise ops instead, which keep its memory layout as
      // PEFT's do: the GEMM then sees the same layout (and sums in the same order).
      const at::Tensor xs = x.is_contiguous() ? cpu::ia3_scaled_rows(x, l).view(x.sizes())
                                              : x.to(l.scalar_type()).mul(l).to(x.scalar_type());
      linear_into(y, xs, weight, bias);
      return;
    }
    linear_into(y, x, weight, bias);  // with no active adapter, the whole result: exactly F.linear
    if (l.defined()) cpu::ia3_scale_output(y, l);  // bias included, as PEFT scales the whole base output
  });
}

}  // namespace peftcore
