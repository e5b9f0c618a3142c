// peftcore::ia3_linear_mixed on CUDA: a mixed batch over a dense base, each row group with
// its own (IA)³ vector l_k (k = rows[group], -1: none), PEFT's roundings as ia3_linear:
//   feedforward = False: y[m] = round_x(float(x[m]·Wᵀ + b) ⊙ l_k)
//   feedforward = True:  y[m] = round_x(float(x[m]) ⊙ l_k)·Wᵀ + b
// Layout: x [..., in] (any strides), W [out, in] (any strides), ia3_l[k] out (in) values,
// rows [G] on the CPU or the GPU (mixed.h); y [..., out] contiguous (a fresh tensor or
// the caller's `out`). Also the per-row scaling pass the quantized ia3 *_mixed ops use
// (ia3_scale_rows).
// Launches: one F.linear (cuBLAS, written into y) over every row, and one scaling pass
// (a scaled copy of x, or y in place) per window of kMaxIa3Slots slots: each row reads
// its slot on the device and multiplies by that slot's vector (rows of no slot: copied /
// untouched).
// Tests: tests/test_cuda.py (mixed samples of tests/op_db.py). Benchmark:
// benchmarks/bench_cuda.py (mixed rows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "../common/checks.h"
#include "checks_cuda.h"
#include "device_utils.cuh"
#include "mixed.h"
#include "ops_cuda.h"

namespace peftcore::cuda {
namespace {

// Slots per launch: their vector pointers travel in the parameter space (1 KB).
constexpr int kMaxIa3Slots = 128;

template <typename A>
struct Ia3Rows {
  const A* v[kMaxIa3Slots];  // slot w0 + i's vector, flattened, in the accumulation dtype
  int64_t w0;
  int32_t n;
  const int64_t* rows;  // [G] slots on the device
  int64_t per;          // token rows per group
};

// Grid-stride over the [M, F] matrix: out[m, k] = round(acc(in[m, k]) · l_slot(m)[k]) for
// rows whose slot is in the window; the others are copied when copy_rest (out of place)
// and left as they are otherwise (in place, or written by another window's launch).
template <typename T>
__global__ void ia3_scale_rows_kernel(const T* in, int64_t ldi, int64_t csi, T* out, int64_t M, int64_t F,
                                      bool copy_rest, const __grid_constant__ Ia3Rows<acc_type<T>> p) {
  const int64_t total = M * F;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / F, k = i - m * F;
    const int64_t local = p.rows[m / p.per] - p.w0;
    if (local >= 0 && local < p.n)
      out[i] = from_acc<T>(to_acc(in[m * ldi + k * csi]) * p.v[local][k]);
    else if (copy_rest)
      out[i] = in[m * ldi + k * csi];
  }
}

}  // namespace

void ia3_scale_rows(at::TensorList ia3_l, const at::Tensor& rows, const at::Tensor& in, at::Tensor& out) {
  const int64_t M = in.size(0), F = in.size(1), n_slots = static_cast<int64_t>(ia3_l.size());
  const bool in_place = in.data_ptr() == out.data_ptr();
  if (M == 0 || F == 0) return;
  if (n_slots == 0) {  // every row is the base
    if (!in_place) out.copy_(in);
    return;
  }
  const auto acc = in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Every slot's vector (which ones the rows use is known only on the device); no copy
  // for the usual float32 contiguous vectors.
  std::vector<at::Tensor> vecs;
  vecs.reserve(n_slots);
  for (const at::Tensor& v : ia3_l) vecs.push_back(v.reshape({-1}).to(acc).contiguous());
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "peftcore_ia3_scale_rows", [&] {
    using A = acc_type<scalar_t>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    for (int64_t w0 = 0; w0 < n_slots; w0 += kMaxIa3Slots) {
      Ia3Rows<A> p{};
      p.w0 = w0;
      p.n = static_cast<int32_t>(std::min<int64_t>(kMaxIa3Slots, n_slots - w0));
      p.rows = rows.const_data_ptr<int64_t>();
      p.per = M / rows.numel();
      for (int32_t i = 0; i < p.n; ++i) p.v[i] = vecs[w0 + i].const_data_ptr<A>();
      // Out of place: the first launch also copies the rows of no slot in its window;
      // later windows then scale their rows of that exact copy in place.
      const bool first = w0 == 0;
      const at::Tensor& src = first ? in : out;
      ia3_scale_rows_kernel<scalar_t><<<grid_for(M * F, threads), threads, 0, stream>>>(
          src.const_data_ptr<scalar_t>(), src.stride(0), src.stride(1), out.data_ptr<scalar_t>(), M, F,
          first && !in_place, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace peftcore::cuda

namespace peftcore {

using namespace peftcore::cuda;

at::Tensor ia3_linear_mixed_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS),
                                 PEFTCORE_IA3_ARGS(const at::Tensor& rows)) {
  const char* op = "ia3_linear_mixed";
  const LinearDims d = check_base_linear(op, x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor r = check_rows(op, rows, d.n, static_cast<int64_t>(ia3_l.size()), x.device());
  check_ia3_vectors(op, ia3_l, x.scalar_type(), feedforward ? d.in : d.out,
                    feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                : "output feature (feedforward=False: weight.shape[0])",
                    device_rule(op, x.device()));
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    ia3_mixed_around(x, ia3_l, r, feedforward, y,
                     [&](const at::Tensor& t, at::Tensor& yt) { linear_into(yt, t, weight, bias); });
  });
}

}  // namespace peftcore
