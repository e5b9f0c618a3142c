// The CUDA low-rank update behind lora_linear (with or without lora_E), lora_embedding and the
// quantized LoRA ops (host side; kernels in lowrank.cuh):
//   y += Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_a)·B_aᵀ, summed in fp32 and rounded into y once.
// Paths: the two kernels (shrink, expand) for float / bfloat16 / float16 with up to
// kMaxAdapters adapters; the shrink becomes a cuBLAS GEMM per adapter above
// kShrinkMaxRows rows; everything else (float64, more adapters, an odd lora_x dtype,
// very large M·N·R) takes the ATen path (generic_lowrank), which computes the same sum
// with the same skipping rules.
// Tests: tests/test_cuda.py. Benchmark: benchmarks/bench_cuda.py.
#include <ATen/ATen.h>

#include <vector>

#include "checks_cuda.h"
#include "lowrank.cuh"
#include "lowrank.h"

namespace peftcore::cuda {
namespace {

// Above this many expand multiply-adds the CUDA-core expand loses to cuBLAS (prefill with
// large ranks): the ATen path takes over.
constexpr int64_t kExpandMaxWork = int64_t(1) << 31;

struct Active {
  size_t index;
  at::Tensor x, A, B, E;  // prepared: x rows unit-stride, A unit column stride, E fp32
};

// [M, K] with unit stride along K (a view when possible).
at::Tensor rows_of(const at::Tensor& x, int64_t M, int64_t K) {
  at::Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < K)) x2 = x2.contiguous();
  return x2;
}

// The ATen path: reference.py's loop, with device scales applied as masks (no sync).
void generic_lowrank(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                     const std::optional<at::TensorList>& lora_x, at::TensorList lora_E, const State& scales,
                     const std::vector<size_t>& on, at::Tensor& y) {
  const auto f = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t K = x.size(-1), N = y.size(-1), M = y.numel() / N;
  at::Tensor acc = y.reshape({M, N}).to(f);
  for (size_t a : on) {
    const at::Tensor xa = (lora_x.has_value() ? (*lora_x)[a] : x).reshape({M, K}).to(f);
    at::Tensor t = at::mm(xa, lora_A[a].to(f).t());
    if (!lora_E.empty()) t = t * lora_E[a].reshape({-1}).to(f);
    const at::Tensor sum = acc + scales.scaled(at::mm(t, lora_B[a].to(f).t()), a);
    acc = scales.on_device() ? at::where(scales.dev.select(0, static_cast<int64_t>(a)) != 0, sum, acc) : sum;
  }
  y.copy_(acc.reshape(y.sizes()));
}

template <typename T, typename W>
LowrankBatch<T, W> fill_batch(const std::vector<Active>& act, const State& scales, int64_t M, int64_t K, int64_t N,
                              const at::Tensor& t_all, T* y) {
  LowrankBatch<T, W> p{};
  p.n = static_cast<int32_t>(act.size());
  p.M = M;
  p.K = K;
  p.N = N;
  p.scales = scales.dev_ptr();
  p.y = y;
  int64_t offset = 0;
  for (size_t i = 0; i < act.size(); ++i) {
    const Active& a = act[i];
    auto& d = p.ad[i];
    d.x = a.x.defined() ? a.x.const_data_ptr<T>() : nullptr;
    d.ldx = a.x.defined() ? a.x.stride(0) : 0;
    d.A = a.A.defined() ? a.A.const_data_ptr<W>() : nullptr;
    d.lda = a.A.defined() ? a.A.stride(0) : 0;
    d.B = a.B.const_data_ptr<W>();
    d.sb0 = a.B.stride(0);
    d.sb1 = a.B.stride(1);
    d.E = a.E.defined() ? a.E.const_data_ptr<float>() : nullptr;
    d.rank = static_cast<int32_t>(a.B.size(1));
    d.index = static_cast<int32_t>(a.index);
    d.host_scale = scales.host_value(a.index);
    d.t = const_cast<float*>(t_all.const_data_ptr<float>()) + offset;
    d.ldt = t_all.stride(0);
    offset += d.rank;
  }
  return p;
}

template <typename T, typename W>
void launch_shrink(const LowrankBatch<T, W>& p) {
  int64_t max_rank = 0;
  // 8-value loads when every A row and x row is 16-byte aligned (the usual contiguous case).
  bool vec = true;
  for (int i = 0; i < p.n; ++i) {
    const auto& d = p.ad[i];
    max_rank = std::max<int64_t>(max_rank, d.rank);
    vec = vec && aligned(d.A, 16) && aligned(d.x, 16) && (d.lda * sizeof(W)) % 16 == 0 &&
          (p.M == 1 || (d.ldx * sizeof(T)) % 16 == 0);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(kShrinkThreads);
  const dim3 grid(max_rank, p.M == 1 ? 1 : ceil_div(p.M, 4), p.n);
  if (p.M == 1 && vec)
    lowrank_shrink_kernel<T, W, 1, true><<<grid, block, 0, stream>>>(p);
  else if (p.M == 1)
    lowrank_shrink_kernel<T, W, 1, false><<<grid, block, 0, stream>>>(p);
  else if (vec)
    lowrank_shrink_kernel<T, W, 4, true><<<grid, block, 0, stream>>>(p);
  else
    lowrank_shrink_kernel<T, W, 4, false><<<grid, block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename W>
void launch_expand(const LowrankBatch<T, W>& p) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (p.M <= 4) {
    const dim3 grid(ceil_div(p.M, 4), ceil_div(p.N, kExpandCols));
    lowrank_expand_kernel<T, W, 4><<<grid, kExpandCols, 0, stream>>>(p);
  } else {
    const dim3 grid(ceil_div(p.M, 16), ceil_div(p.N, kExpandCols));
    lowrank_expand_kernel<T, W, 16><<<grid, kExpandCols, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The adapters' common storage dtype (float32 when they differ: converted once).
at::ScalarType adapter_dtype(at::TensorList lora_A, at::TensorList lora_B, const std::vector<size_t>& on) {
  const at::ScalarType w = lora_A[on[0]].scalar_type();
  for (size_t a : on)
    if (lora_A[a].scalar_type() != w || lora_B[a].scalar_type() != w) return at::kFloat;
  return w;
}

std::vector<size_t> active_indices(at::TensorList lora_A, const State& scales) {
  std::vector<size_t> on;
  for (size_t a = 0; a < lora_A.size(); ++a)
    if (lora_A[a].size(0) > 0 && scales.maybe_on(a)) on.push_back(a);
  return on;
}

}  // namespace

void add_lowrank(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                 const std::optional<at::TensorList>& lora_x, at::TensorList lora_E, const State& scales,
                 at::Tensor& y) {
  const std::vector<size_t> on = active_indices(lora_A, scales);
  if (on.empty() || y.numel() == 0) return;
  const int64_t N = y.size(-1), M = y.numel() / N, K = x.size(-1);
  int64_t R = 0;
  bool same_x = true;
  for (size_t a : on) {
    R += lora_A[a].size(0);
    if (lora_x.has_value() && (*lora_x)[a].scalar_type() != x.scalar_type()) same_x = false;
  }
  const bool kernels = x.scalar_type() != at::kDouble && on.size() <= static_cast<size_t>(kMaxAdapters) && same_x &&
                       M * N * R <= kExpandMaxWork && ceil_div(N, kExpandCols) <= 65535 && K > 0;
  if (!kernels) {
    generic_lowrank(x, lora_A, lora_B, lora_x, lora_E, scales, on, y);
    return;
  }
  const at::ScalarType wt = adapter_dtype(lora_A, lora_B, on);
  const bool shrink_kernel = M <= kShrinkMaxRows;
  const at::Tensor x2 = rows_of(x, M, K);
  std::vector<Active> act;
  at::Tensor t_all = at::empty({M, R}, x.options().dtype(at::kFloat));
  int64_t offset = 0;
  for (size_t a : on) {
    Active ad;
    ad.index = a;
    ad.x = lora_x.has_value() ? rows_of((*lora_x)[a], M, K) : x2;
    ad.A = lora_A[a].to(wt);
    if (ad.A.stride(1) != 1) ad.A = ad.A.contiguous();
    ad.B = lora_B[a].to(wt);
    if (!lora_E.empty()) ad.E = lora_E[a].reshape({-1}).to(at::kFloat).contiguous();
    const int64_t r = ad.A.size(0);
    if (!shrink_kernel) {
      // Prefill: t_a = x_a·A_aᵀ by cuBLAS, fp32 out (products of x's dtype, fp32 sums).
      at::Tensor ta = t_all.narrow(1, offset, r);
      const bool half = x.scalar_type() != at::kFloat && wt == x.scalar_type();
      ta.copy_(half ? at::mm(ad.x, ad.A.t(), at::kFloat) : at::mm(ad.x.to(at::kFloat), ad.A.to(at::kFloat).t()));
      if (ad.E.defined()) ta.mul_(ad.E);
    }
    offset += r;
    act.push_back(std::move(ad));
  }
  dispatch_xw(x.scalar_type(), wt, [&](auto xt, auto wt_) {
    using T = decltype(xt);
    using W = decltype(wt_);
    const LowrankBatch<T, W> p = fill_batch<T, W>(act, scales, M, K, N, t_all, y.data_ptr<T>());
    if (shrink_kernel) launch_shrink(p);
    launch_expand(p);
  });
}

void add_lowrank_embedding(const at::Tensor& idx, at::TensorList lora_A, at::TensorList lora_B,
                           const State& scales, at::Tensor& y) {
  const std::vector<size_t> on = active_indices(lora_A, scales);
  if (on.empty() || y.numel() == 0) return;
  const int64_t N = y.size(-1), M = y.numel() / N;
  int64_t R = 0;
  for (size_t a : on) R += lora_A[a].size(0);
  const bool kernels = y.scalar_type() != at::kDouble && on.size() <= static_cast<size_t>(kMaxAdapters) &&
                       M * N * R <= kExpandMaxWork && ceil_div(N, kExpandCols) <= 65535;
  const auto f = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!kernels) {
    at::Tensor acc = y.reshape({M, N}).to(f);
    for (size_t a : on) {
      const at::Tensor t = lora_A[a].to(f).t().index_select(0, idx);
      const at::Tensor sum = acc + scales.scaled(at::mm(t, lora_B[a].to(f).t()), a);
      acc = scales.on_device() ? at::where(scales.dev.select(0, static_cast<int64_t>(a)) != 0, sum, acc) : sum;
    }
    y.copy_(acc.reshape(y.sizes()));
    return;
  }
  const at::ScalarType wt = adapter_dtype(lora_A, lora_B, on);
  // t_a = A_aᵀ[idx]: the shrink of a one-hot row is a gather (index_select; out-of-range
  // indices trip its device-side assert, as F.embedding's do).
  at::Tensor t_all = at::empty({M, R}, y.options().dtype(at::kFloat));
  std::vector<Active> act;
  int64_t offset = 0;
  for (size_t a : on) {
    Active ad;
    ad.index = a;
    ad.B = lora_B[a].to(wt);
    const int64_t r = lora_A[a].size(0);
    t_all.narrow(1, offset, r).copy_(lora_A[a].t().index_select(0, idx));
    offset += r;
    act.push_back(std::move(ad));
  }
  dispatch_xw(y.scalar_type(), wt, [&](auto xt, auto wt_) {
    using T = decltype(xt);
    using W = decltype(wt_);
    launch_expand(fill_batch<T, W>(act, scales, M, 0, N, t_all, y.data_ptr<T>()));
  });
}

template <typename T>
bool shrink_for_epilogue(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B, at::TensorList lora_E,
                         const std::optional<at::TensorList>& lora_x, const State& scales, int64_t N,
                         LowrankBatch<T, float>& batch, std::vector<at::Tensor>& keep) {
  const std::vector<size_t> on = active_indices(lora_A, scales);
  const int64_t K = x.size(-1), M = leading_rows(x);
  if (on.empty() || M == 0 || M > kShrinkMaxRows || K == 0 || on.size() > static_cast<size_t>(kMaxAdapters))
    return false;
  int64_t R = 0;
  for (size_t a : on) {
    R += lora_A[a].size(0);
    // float32 adapters only (PEFT's default): the epilogue is compiled for them.
    if (lora_A[a].scalar_type() != at::kFloat || lora_B[a].scalar_type() != at::kFloat) return false;
    if (lora_x.has_value() && (*lora_x)[a].scalar_type() != x.scalar_type()) return false;
  }
  const at::Tensor x2 = rows_of(x, M, K);
  keep.push_back(at::empty({M, R}, x.options().dtype(at::kFloat)));
  const at::Tensor& t_all = keep.back();
  std::vector<Active> act;
  for (size_t a : on) {
    Active ad;
    ad.index = a;
    ad.x = lora_x.has_value() ? rows_of((*lora_x)[a], M, K) : x2;
    ad.A = lora_A[a].stride(1) == 1 ? lora_A[a] : lora_A[a].contiguous();
    ad.B = lora_B[a];
    keep.insert(keep.end(), {ad.x, ad.A, ad.B});
    if (!lora_E.empty()) {
      ad.E = lora_E[a].reshape({-1}).to(at::kFloat).contiguous();
      keep.push_back(ad.E);
    }
    act.push_back(std::move(ad));
  }
  batch = fill_batch<T, float>(act, scales, M, K, N, t_all, nullptr);
  launch_shrink(batch);
  return true;
}

template bool shrink_for_epilogue<float>(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                                         const std::optional<at::TensorList>&, const State&, int64_t,
                                         LowrankBatch<float, float>&, std::vector<at::Tensor>&);
template bool shrink_for_epilogue<c10::BFloat16>(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                                                 const std::optional<at::TensorList>&, const State&, int64_t,
                                                 LowrankBatch<c10::BFloat16, float>&, std::vector<at::Tensor>&);
template bool shrink_for_epilogue<c10::Half>(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                                             const std::optional<at::TensorList>&, const State&, int64_t,
                                             LowrankBatch<c10::Half, float>&, std::vector<at::Tensor>&);

}  // namespace peftcore::cuda
