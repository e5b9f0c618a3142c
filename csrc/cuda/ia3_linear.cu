// peftcore::ia3_linear on CUDA: PEFT's (IA)³ Linear, unmerged, l = Π_{active a} ia3_l[a]:
//   feedforward = False: y = round_x(float(x·Wᵀ + b) ⊙ l)   (l over outputs, bias scaled)
//   feedforward = True:  y = round_x(float(x) ⊙ l)·Wᵀ + b   (l over inputs)
// Layout: x [..., in] (any strides), W [out, in] (any strides), ia3_l[a] any shape of
// out (in) values; y [..., out] contiguous (a fresh tensor or the caller's `out`). The GEMM
// is F.linear's ATen call, written into y; the scaling one pass of ia3.cu (a scaled
// contiguous copy of x, or y in place), flags read on the device. With host flags all
// off: exactly F.linear. The backward is Python (_ops.py).
// Tests: tests/test_cuda.py (ia3_linear samples). Benchmark: benchmarks/bench_cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks_cuda.h"
#include "ia3.h"
#include "ops_cuda.h"

namespace peftcore {

using namespace peftcore::cuda;

at::Tensor ia3_linear_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS),
                           PEFTCORE_IA3_ARGS(const at::Tensor& active)) {
  const char* op = "ia3_linear";
  const LinearDims d = check_base_linear(op, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const Ia3 v = prepare_ia3(op, ia3_l, active, x.scalar_type(), feedforward ? d.in : d.out,
                            feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                        : "output feature (feedforward=False: weight.shape[0])",
                            x.device());
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    if (v.none()) {
      linear_into(y, x, weight, bias);
    } else if (feedforward) {
      at::Tensor xs = at::empty({d.n, d.in}, x.options().memory_format(at::MemoryFormat::Contiguous));
      ia3_scale(v, x.reshape({d.n, d.in}), xs);
      linear_into(y, xs.view(x.sizes()), weight, bias);
    } else {
      linear_into(y, x, weight, bias);
      at::Tensor y2 = y.view({d.n, d.out});
      ia3_scale(v, y2, y2);  // bias included, as PEFT scales the whole base output
    }
  });
}

}  // namespace peftcore
