// The (IA)³ scaling pass on the GPU: out[m, k] = round(acc(in[m, k]) · l[k]),
// l = Π_{active a} ia3_l[a] (ia3.cuh), one grid-stride pass over a [M, F] matrix. Serves
// both directions: the scaled copy of x (feedforward; x read through its strides) and the
// base output scaled in place (attention projections).
// Tests: tests/test_cuda.py (ia3 samples). Benchmark: benchmarks/bench_cuda.py (ia3 rows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>

#include "../common/checks.h"
#include "checks_cuda.h"
#include "ia3.h"

namespace peftcore::cuda {
namespace {

template <typename T>
__global__ void ia3_scale_kernel(const T* in, int64_t ldi, int64_t csi, T* out, int64_t M, int64_t F,
                                 const __grid_constant__ Ia3View<acc_type<T>> v) {
  const int64_t total = M * F;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / F, k = i - m * F;
    out[i] = from_acc<T>(to_acc(in[m * ldi + k * csi]) * ia3_factor(v, k));
  }
}

}  // namespace

Ia3 prepare_ia3(const char* op, at::TensorList ia3_l, const at::Tensor& active, at::ScalarType x_dtype,
                int64_t features, const char* what, const at::Device& dev) {
  check_state(op, active, "active", ia3_l.size(), dev);
  check_ia3_vectors(op, ia3_l, x_dtype, features, what, device_rule(op, dev));
  Ia3 r;
  r.acc = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  r.active = read_state(active);
  for (size_t a = 0; a < ia3_l.size(); ++a) {
    if (!r.active.maybe_on(a)) continue;  // host flag 0: never read (NaN allowed)
    r.vecs.push_back(ia3_l[a].reshape({-1}).to(r.acc).contiguous());
    r.index.push_back(a);
  }
  if (r.vecs.size() > static_cast<size_t>(kMaxIa3)) {
    // Many vectors: their product first (ATen, flags as masks), then one vector, always on.
    at::Tensor l = at::ones({features}, r.vecs[0].options());
    for (size_t i = 0; i < r.vecs.size(); ++i)
      l = r.active.on_device()
              ? l * at::where(r.active.dev.select(0, static_cast<int64_t>(r.index[i])) != 0, r.vecs[i],
                              at::ones({}, l.options()))
              : l * r.vecs[i];
    r.vecs = {l};
    r.index = {0};
    r.active = State{};
    r.active.host = {1.0f};
  }
  return r;
}

void ia3_scale(const Ia3& v, const at::Tensor& in, at::Tensor& out) {
  const int64_t M = in.size(0), F = in.size(1);
  if (M == 0 || F == 0) return;
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "peftcore_ia3_scale", [&] {
    using A = acc_type<scalar_t>;
    ia3_scale_kernel<scalar_t><<<grid_for(M * F, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        in.const_data_ptr<scalar_t>(), in.stride(0), in.stride(1), out.data_ptr<scalar_t>(), M, F, v.view<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace peftcore::cuda
