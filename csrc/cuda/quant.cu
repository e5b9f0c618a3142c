// Host side shared by the quantized-base CUDA ops (see quant.h), and the epilogue kernel
// of their many-token path: y = round(acc + b), then IA3's output scale.
// Tests: tests/test_cuda.py (quantized samples). Benchmark: benchmarks/bench_cuda.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../common/checks.h"
#include "checks_cuda.h"
#include "quant.h"

namespace peftcore::cuda {
namespace {

template <typename T>
__global__ void quant_epilogue_kernel(const acc_type<T>* acc, const acc_type<T>* bias, T* y, int64_t M, int64_t N,
                                      const __grid_constant__ Ia3View<acc_type<T>> ia3, bool has_ia3) {
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = base_epilogue<T, acc_type<T>>(acc[i], bias, i % N, ia3, has_ia3);
}

}  // namespace

void check_quant_x_and_bias(const char* op, const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias) {
  check_x(op, x);
  check_bias(op, bias, x.device(), N, "out_features");
}

at::Tensor bias_acc(const std::optional<at::Tensor>& bias, at::ScalarType x_dtype) {
  if (!bias.has_value() || !bias->defined()) return {};
  return bias->to(x_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

at::Tensor quant_rows(const at::Tensor& x, const Ia3* in_scale) {
  const int64_t K = x.size(-1), M = leading_rows(x);
  if (in_scale != nullptr) {
    at::Tensor xs = at::empty({M, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
    ia3_scale(*in_scale, x.reshape({M, K}), xs);
    return xs;
  }
  at::Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < K)) x2 = x2.contiguous();
  return x2;
}

void gemm_base(const at::Tensor& x2, const at::Tensor& W, const at::Tensor& bias_f, const Ia3* out_scale,
               at::Tensor& y2) {
  const int64_t M = y2.size(0), N = y2.size(1);
  if (M == 0 || N == 0) return;
  const auto dt = x2.scalar_type();
  // Products in x's dtype (W rounded to it once; the README's accuracy contract), sums
  // and output in fp32; fp32 / fp64 x: W in fp32 / fp64, exact products.
  const at::Tensor acc = (dt == at::kBFloat16 || dt == at::kHalf) ? at::mm(x2, W.t(), at::kFloat)
                                                                  : at::mm(x2, W.t()).contiguous();
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "peftcore_quant_epilogue", [&] {
    using A = acc_type<scalar_t>;
    Ia3View<A> v{};
    if (out_scale != nullptr) v = out_scale->view<A>();
    quant_epilogue_kernel<scalar_t><<<grid_for(M * N, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        acc.const_data_ptr<A>(), bias_f.defined() ? bias_f.const_data_ptr<A>() : nullptr, y2.data_ptr<scalar_t>(), M,
        N, v, out_scale != nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace peftcore::cuda
