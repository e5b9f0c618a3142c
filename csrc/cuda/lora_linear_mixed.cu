// peftcore::lora_linear_mixed on CUDA: a mixed batch over a dense base, each row group
// with its own LoRA (or AdaLoRA, with lora_E) adapter:
//   y[m] = x[m]·Wᵀ + b + s_k · ((x[m]·A_kᵀ) ⊙ E_k)·B_kᵀ,   k = rows[group of m] (-1: none).
// Layout: x [..., in] (any strides), W [out, in] (any strides), A_k [r_k, in], B_k
// [out, r_k] (any strides), rows [G] int64/int32 on the CPU or the GPU (mixed.h); y
// [..., out] contiguous (a fresh tensor or the caller's `out`). Also the host side of
// every mixed LoRA term (add_lowrank_mixed, used by the quantized *_mixed ops) and the
// `rows` checks.
// Launches: the base is one F.linear (cuBLAS, written into y) over every row; then, per
// window of kMaxAdapters slots (one window for up to 32 adapters), a gathered shrink
// (each row dots its own slot's A: lowrank_shrink_mixed_kernel, 4-row tiles within a
// group) and an expand adding to each row only its own slot's term
// (lowrank_expand_mixed_kernel), slots read on the device.
// float64 (or shapes past the kernels' grid limits) takes an ATen path with the same
// per-row selection, masks instead of host reads.
// Tests: tests/test_cuda.py (mixed samples of tests/op_db.py, against the single-adapter
// twins and the CPU kernel). Benchmark: benchmarks/bench_cuda.py (mixed rows).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks_cuda.h"
#include "lowrank.cuh"
#include "mixed.h"
#include "ops_cuda.h"
#include "../common/state.h"

namespace peftcore::cuda {

at::Tensor check_rows(const char* op, const at::Tensor& rows, int64_t M, int64_t n_slots, const at::Device& dev) {
  check_rows_shape(op, rows, M, [&](const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu() || t.device() == dev, "peftcore::", op, ": rows is on ", t.device(),
                " but must be on the CPU or on ", dev, " (the model's device)");
  });
  if (rows.device().is_cpu()) {  // host values: checked as the CPU kernels check them
    const at::Tensor r = rows.to(at::kLong).contiguous();
    check_row_slots(op, r.const_data_ptr<int64_t>(), r.numel(), n_slots);
  }
  // Device values are never read here (no sync): the kernels treat an out-of-range slot
  // as -1. int64 on the device: no narrowing, so a huge value cannot wrap into a slot.
  return rows.to(dev, at::kLong).contiguous();
}

namespace {

// [M, K] with unit stride along K (a view when possible): what shrink_partial reads.
at::Tensor rows_view(const at::Tensor& x, int64_t M, int64_t K) {
  at::Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < K)) x2 = x2.contiguous();
  return x2;
}

// The ATen path (float64, or past the kernels' limits): every used slot's term for
// every row, kept only where the row's slot is that slot and its scale is not 0 (a
// select: NaN of an adapter that is off never reaches y). O(slots · M) work; no sync.
void generic_lowrank_mixed(const at::Tensor& xa, at::TensorList lora_A, at::TensorList lora_B, at::TensorList lora_E,
                           const State& scales, const at::Tensor& rows, at::Tensor& y) {
  const auto f = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t K = xa.size(-1), N = y.size(-1), M = y.numel() / N, G = rows.numel();
  const at::Tensor slot = rows.view({G, 1}).expand({G, M / G}).reshape({M, 1});
  const at::Tensor x2 = xa.reshape({M, K}).to(f);
  at::Tensor acc = y.reshape({M, N}).to(f);
  for (size_t a = 0; a < lora_A.size(); ++a) {
    if (lora_A[a].size(0) == 0 || !scales.maybe_on(a)) continue;
    at::Tensor t = at::mm(x2, lora_A[a].to(f).t());
    if (!lora_E.empty()) t = t * lora_E[a].reshape({-1}).to(f);
    at::Tensor mask = slot == static_cast<int64_t>(a);
    if (scales.on_device()) mask = at::logical_and(mask, scales.dev.select(0, static_cast<int64_t>(a)) != 0);
    acc = at::where(mask, acc + scales.scaled(at::mm(t, lora_B[a].to(f).t()), a), acc);
  }
  y.copy_(acc.reshape(y.sizes()));
}

// One slot prepared for the kernels (undefined A: rank 0 or known off, never read).
struct Slot {
  at::Tensor A, B, E;
};

template <typename T, typename W>
void launch_window(const std::vector<Slot>& slots, int64_t w0, int64_t n, const State& scales, const at::Tensor& x2,
                   const at::Tensor& t_all, const at::Tensor& rows, int64_t M, int64_t N, T* y) {
  LowrankBatch<T, W> p{};
  p.n = static_cast<int32_t>(n);
  p.M = M;
  p.K = x2.size(1);
  p.N = N;
  p.scales = scales.dev_ptr();
  p.y = y;
  int64_t max_rank = 0;
  bool vec = aligned(x2.const_data_ptr(), 16) && (M == 1 || (x2.stride(0) * int64_t(sizeof(T))) % 16 == 0);
  for (int64_t i = 0; i < n; ++i) {
    const Slot& s = slots[w0 + i];
    auto& d = p.ad[i];
    d.index = static_cast<int32_t>(w0 + i);
    d.host_scale = scales.host_value(w0 + i);
    d.x = x2.const_data_ptr<T>();
    d.ldx = x2.stride(0);
    d.t = const_cast<float*>(t_all.const_data_ptr<float>());
    d.ldt = t_all.stride(0);
    if (!s.A.defined()) continue;  // rank 0: both kernels skip it
    d.A = s.A.const_data_ptr<W>();
    d.lda = s.A.stride(0);
    d.B = s.B.const_data_ptr<W>();
    d.sb0 = s.B.stride(0);
    d.sb1 = s.B.stride(1);
    d.E = s.E.defined() ? s.E.const_data_ptr<float>() : nullptr;
    d.rank = static_cast<int32_t>(s.A.size(0));
    max_rank = std::max<int64_t>(max_rank, d.rank);
    vec = vec && aligned(d.A, 16) && (d.lda * int64_t(sizeof(W))) % 16 == 0;
  }
  if (max_rank == 0) return;
  const MixedRows r{rows.const_data_ptr<int64_t>(), M / rows.numel(), w0};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Decode-size groups (one or two rows each): one row per shrink block; longer groups:
  // 4-row tiles, each A row read once per tile (tiles within one group: the usual case).
  if (r.per <= 2) {
    const dim3 sgrid(static_cast<unsigned>(M), static_cast<unsigned>(max_rank));
    if (vec)
      lowrank_shrink_mixed_kernel<T, W, 1, true><<<sgrid, kShrinkThreads, 0, stream>>>(p, r);
    else
      lowrank_shrink_mixed_kernel<T, W, 1, false><<<sgrid, kShrinkThreads, 0, stream>>>(p, r);
  } else {
    const dim3 sgrid(static_cast<unsigned>(ceil_div(M, 4)), static_cast<unsigned>(max_rank));
    if (vec)
      lowrank_shrink_mixed_kernel<T, W, 4, true><<<sgrid, kShrinkThreads, 0, stream>>>(p, r);
    else
      lowrank_shrink_mixed_kernel<T, W, 4, false><<<sgrid, kShrinkThreads, 0, stream>>>(p, r);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 16-row tiles when groups are long (prefill: a tile meets one adapter, B staged once
  // for 16 rows); 4-row tiles for decode-size groups (fewer adapters per tile).
  if (r.per >= 16 && M > 4) {
    const dim3 egrid(static_cast<unsigned>(ceil_div(M, 16)), static_cast<unsigned>(ceil_div(N, kExpandCols)));
    lowrank_expand_mixed_kernel<T, W, 16><<<egrid, kExpandCols, 0, stream>>>(p, r);
  } else {
    const dim3 egrid(static_cast<unsigned>(ceil_div(M, 4)), static_cast<unsigned>(ceil_div(N, kExpandCols)));
    lowrank_expand_mixed_kernel<T, W, 4><<<egrid, kExpandCols, 0, stream>>>(p, r);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void add_lowrank_mixed(const at::Tensor& xa, at::TensorList lora_A, at::TensorList lora_B, at::TensorList lora_E,
                       const State& scales, const at::Tensor& rows, at::Tensor& y) {
  const int64_t n_slots = static_cast<int64_t>(lora_A.size());
  if (n_slots == 0 || y.numel() == 0) return;
  const int64_t K = xa.size(-1), N = y.size(-1), M = y.numel() / N;
  int64_t max_rank = 0;
  bool any = false, same = true;
  at::ScalarType wt = at::kFloat;
  for (int64_t a = 0; a < n_slots; ++a) {
    if (lora_A[a].size(0) == 0 || !scales.maybe_on(a)) continue;
    if (!any) wt = lora_A[a].scalar_type();
    any = true;
    same = same && lora_A[a].scalar_type() == wt && lora_B[a].scalar_type() == wt;
    max_rank = std::max<int64_t>(max_rank, lora_A[a].size(0));
  }
  if (!any) return;
  if (!same) wt = at::kFloat;  // mixed storage dtypes: float32 copies (exact widening)
  const at::ScalarType xt = y.scalar_type();
  const bool kernels = (xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf) && xa.scalar_type() == xt &&
                       K > 0 && M <= std::numeric_limits<int32_t>::max() && max_rank <= 65535 &&
                       ceil_div(N, kExpandCols) <= 65535;
  if (!kernels) {
    generic_lowrank_mixed(xa, lora_A, lora_B, lora_E, scales, rows, y);
    return;
  }
  std::vector<Slot> slots(n_slots);
  for (int64_t a = 0; a < n_slots; ++a) {
    if (lora_A[a].size(0) == 0 || !scales.maybe_on(a)) continue;
    Slot& s = slots[a];
    s.A = lora_A[a].to(wt);
    if (s.A.stride(1) != 1) s.A = s.A.contiguous();
    s.B = lora_B[a].to(wt);
    if (!lora_E.empty()) s.E = lora_E[a].reshape({-1}).to(at::kFloat).contiguous();
  }
  const at::Tensor x2 = rows_view(xa, M, K);
  // One t row per token row: a row has one adapter, so the windows share the buffer.
  const at::Tensor t_all = at::empty({M, max_rank}, y.options().dtype(at::kFloat));
  dispatch_xw(xt, wt, [&](auto xv, auto wv) {
    using T = decltype(xv);
    using W = decltype(wv);
    for (int64_t w0 = 0; w0 < n_slots; w0 += kMaxAdapters)
      launch_window<T, W>(slots, w0, std::min<int64_t>(kMaxAdapters, n_slots - w0), scales, x2, t_all, rows, M, N,
                          y.data_ptr<T>());
  });
}

}  // namespace peftcore::cuda

namespace peftcore {

using namespace peftcore::cuda;

at::Tensor lora_linear_mixed_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_LORA_ARGS,
                                  const at::Tensor& rows) {
  const char* op = "lora_linear_mixed";
  const LinearDims d = check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, std::nullopt);
  const at::TensorList E = checked_lora_E(op, lora_E, lora_A, x.device(), x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor r = check_rows(op, rows, d.n, static_cast<int64_t>(lora_A.size()), x.device());
  return write_output(op, out, rows_then(x, d.out), x, [&](at::Tensor& y) {
    // The base through F.linear's ATen calls: rows of the base alone are bit-identical to it.
    linear_into(y, x, weight, bias);
    if (lora_A.empty() || y.numel() == 0) return;
    add_lowrank_mixed(x, lora_A, lora_B, E, read_state(scales), r, y);
  });
}

}  // namespace peftcore
