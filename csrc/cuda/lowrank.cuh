// The LoRA shrink and expand on the GPU, for every adapter of a call in one launch each:
//   shrink: t_a[m, q] = (x_a[m]·A_a[q]) · E_a[q]      (fp32; E only for AdaLoRA)
//   expand: y[m, n]   = round(float(y[m, n]) + Σ_a s_a · Σ_q t_a[m, q]·B_a[n, q])
// Layout: x_a rows of K values (unit stride, row stride ldx), A_a [r, K] (unit column
// stride), B_a [N, r] (any strides), t_a [M, r] fp32 (row stride ldt), y [M, N] contiguous.
// The adapters travel in the launch's parameter space (LowrankBatch, __grid_constant__),
// so a launch needs no device-side table and no host copy. expand_row is the expand fused
// into another kernel's epilogue (the quantized GEMVs: one launch fewer, y written once).
//
// Reuse by a per-row gathered (punica BGMV-style) variant: the work of one block is a
// device function over one adapter descriptor and a tile of rows (shrink_partial,
// expand_accumulate). A mixed batch keeps the same descriptors and passes, per row, the
// index of its adapter: the shrink picks `p.ad[row_adapter[m]]` for its rows (ROWS = 1, or
// rows pre-sorted into segments so a tile shares one adapter), and the expand adds, for
// each row of its tile, only the term of that row's adapter (expand_accumulate /
// expand_row with a per-row adapter test in place of the per-call scale test). Nothing in
// the inner loops depends on all rows sharing adapters.
// Tests: tests/test_cuda.py (lora_linear with and without lora_E / lora_embedding / quantized
// samples). Benchmark: benchmarks/bench_cuda.py.
#pragma once

#include "device_utils.cuh"

namespace peftcore::cuda {

constexpr int kMaxAdapters = 32;     // adapters per launch (parameter space: ~3 KB of 4 KB)
constexpr int kShrinkThreads = 256;  // threads sharing one (rank, row tile) dot product
constexpr int kShrinkMaxRows = 64;   // above: the shrink is a cuBLAS GEMM per adapter
constexpr int kExpandCols = 128;     // output columns per expand block (one per thread)
constexpr int kRankChunk = 32;       // ranks staged in shared memory at a time

template <typename T, typename W>
struct LowrankAdapter {
  const T* x;      // this adapter's input rows (x, or its lora_x)
  int64_t ldx;
  const W* A;      // [rank, K], unit column stride
  int64_t lda;
  const W* B;      // [N, rank]
  int64_t sb0, sb1;
  const float* E;  // AdaLoRA's rank values (fp32), or null
  float* t;        // shrink result [M, rank]
  int64_t ldt;
  int32_t rank;
  int32_t index;     // position in `scales`
  float host_scale;  // used when the scales are host values
};

template <typename T, typename W>
struct LowrankBatch {
  LowrankAdapter<T, W> ad[kMaxAdapters];
  int32_t n;
  int64_t M, K, N;
  const float* scales;  // device scales, or null (then ad[a].host_scale)
  T* y;
};

// 8 values from p (16-byte aligned), widened to fp32: one 16-byte load for 2-byte types,
// two for float.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  constexpr int per = 16 / sizeof(T);
#pragma unroll
  for (int c = 0; c < 8 / per; ++c) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + c * per);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < per; ++j) v[c * per + j] = static_cast<float>(t[j]);
  }
}

// This thread's share of t[m0 + r, q] = x_a[m0 + r]·A_a[q] for r < ROWS: the threads of a
// block stride over K together (coalesced reads of the A row and the x rows), 8 values
// per step when every row is 16-byte aligned (VEC), then one at a time for the tail.
// Rows past nrows repeat the last valid row (no branch in the loop; never written).
template <typename T, typename W, int ROWS, bool VEC>
__device__ __forceinline__ void shrink_partial(const LowrankAdapter<T, W>& ad, int64_t K, int64_t m0, int nrows,
                                               int q, int tid, int nthreads, float (&acc)[ROWS]) {
  const W* a = ad.A + q * ad.lda;
  const T* xr[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    xr[r] = ad.x + (m0 + (r < nrows ? r : nrows - 1)) * ad.ldx;
    acc[r] = 0.f;
  }
  int64_t k0 = 0;
  if constexpr (VEC) {
    const int64_t kv = K / 8 * 8;
    for (int64_t k = static_cast<int64_t>(tid) * 8; k < kv; k += static_cast<int64_t>(nthreads) * 8) {
      float w[8];
      load8(a + k, w);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float xv[8];
        load8(xr[r] + k, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r] += xv[j] * w[j];
      }
    }
    k0 = kv;
  }
  for (int64_t k = k0 + tid; k < K; k += nthreads) {
    const float w = static_cast<float>(a[k]);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] += static_cast<float>(xr[r][k]) * w;
  }
}

// grid (max rank, ceil(M / ROWS), adapters); block kShrinkThreads: one rank q of one
// adapter for ROWS token rows per block, K split over the block's threads (a decode-size
// shrink is a few dot products of length K: splitting K is what gives it parallelism),
// reduced through shared memory; E (AdaLoRA) applied to the sum.
template <typename T, typename W, int ROWS, bool VEC>
__global__ void __launch_bounds__(kShrinkThreads) lowrank_shrink_kernel(const __grid_constant__ LowrankBatch<T, W> p) {
  __shared__ float red[ROWS][kShrinkThreads / kWarp];
  const LowrankAdapter<T, W>& ad = p.ad[blockIdx.z];
  const int q = blockIdx.x;
  if (q >= ad.rank) return;  // block-uniform exits: no thread waits at the barrier below
  // An adapter that is off gets no t: the expand skips it by the same test.
  if (state_value(p.scales, ad.index, ad.host_scale) == 0.f) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * ROWS;
  const int nrows = static_cast<int>(p.M - m0 < ROWS ? p.M - m0 : ROWS);
  float acc[ROWS];
  shrink_partial<T, W, ROWS, VEC>(ad, p.K, m0, nrows, q, threadIdx.x, kShrinkThreads, acc);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) red[r][warp] = v;
  }
  __syncthreads();
  if (warp != 0) return;
  const float e = ad.E != nullptr ? ad.E[q] : 1.f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = warp_sum(lane < kShrinkThreads / kWarp ? red[r][lane] : 0.f);
    if (lane == 0 && r < nrows) ad.t[(m0 + r) * ad.ldt + q] = ad.E != nullptr ? v * e : v;
  }
}

// The block's tile: part[r] = Σ_q t[m0 + r, q]·B[n0 + tid, q] for one adapter, its ranks
// staged kRankChunk at a time in shared memory (B padded by one column: conflict-free).
template <typename T, typename W, int ROWS>
__device__ __forceinline__ void expand_accumulate(const LowrankAdapter<T, W>& ad, int64_t M, int64_t N, int64_t m0,
                                                  int64_t n0, float (&Bs)[kExpandCols][kRankChunk + 1],
                                                  float (&ts)[ROWS][kRankChunk], float (&part)[ROWS]) {
  const int tid = threadIdx.x;
  for (int q0 = 0; q0 < ad.rank; q0 += kRankChunk) {
    const int rc = ad.rank - q0 < kRankChunk ? ad.rank - q0 : kRankChunk;
    __syncthreads();  // the previous chunk has been consumed
    for (int i = tid; i < kExpandCols * rc; i += kExpandCols) {
      const int c = i / rc, q = i % rc;
      const int64_t n = n0 + c;
      Bs[c][q] = n < N ? static_cast<float>(ad.B[n * ad.sb0 + (q0 + q) * ad.sb1]) : 0.f;
    }
    for (int i = tid; i < ROWS * rc; i += kExpandCols) {
      const int r = i / rc, q = i % rc;
      ts[r][q] = m0 + r < M ? ad.t[(m0 + r) * ad.ldt + q0 + q] : 0.f;
    }
    __syncthreads();
    for (int q = 0; q < rc; ++q) {
      const float b = Bs[tid][q];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) part[r] += ts[r][q] * b;
    }
  }
}

// grid (ceil(M / ROWS), ceil(N / kExpandCols)); block kExpandCols threads, one column each.
// y is read once, every adapter's term added in fp32 ((t·Bᵀ)·s, as reference.py orders
// it), and written once: one rounding. Adapters whose scale reads 0 are skipped (a
// block-uniform branch), so their t is never read.
template <typename T, typename W, int ROWS>
__global__ void __launch_bounds__(kExpandCols) lowrank_expand_kernel(const __grid_constant__ LowrankBatch<T, W> p) {
  __shared__ float Bs[kExpandCols][kRankChunk + 1];
  __shared__ float ts[ROWS][kRankChunk];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kExpandCols;
  const int64_t n = n0 + threadIdx.x;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = (m0 + r < p.M && n < p.N) ? static_cast<float>(p.y[(m0 + r) * p.N + n]) : 0.f;
  for (int a = 0; a < p.n; ++a) {
    const LowrankAdapter<T, W>& ad = p.ad[a];
    const float s = state_value(p.scales, ad.index, ad.host_scale);
    if (s == 0.f) continue;
    float part[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) part[r] = 0.f;
    expand_accumulate<T, W, ROWS>(ad, p.M, p.N, m0, n0, Bs, ts, part);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] += part[r] * s;
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
    if (m0 + r < p.M && n < p.N) p.y[(m0 + r) * p.N + n] = from_acc<T>(acc[r]);
}

// The fused form of the expand, for a kernel that owns output column n of every row (the
// quantized GEMVs: one warp per output row of W): out[r] += Σ_a s_a·Σ_q t_a[r, q]·B_a[n, q]
// for r < ROWS, the lanes splitting the ranks; out holds the rounded base, widened, so y is
// rounded once more, as by the expand kernel. Rows past p.M repeat row p.M - 1 (never stored).
template <typename T, typename W, int ROWS>
__device__ __forceinline__ void expand_row(const LowrankBatch<T, W>& p, int64_t n, int lane, float (&out)[ROWS]) {
  for (int a = 0; a < p.n; ++a) {
    const LowrankAdapter<T, W>& ad = p.ad[a];
    const float s = state_value(p.scales, ad.index, ad.host_scale);
    if (s == 0.f) continue;  // warp-uniform
    float part[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) part[r] = 0.f;
    for (int q = lane; q < ad.rank; q += kWarp) {
      const float b = static_cast<float>(ad.B[n * ad.sb0 + q * ad.sb1]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) part[r] += ad.t[(r < p.M ? r : p.M - 1) * ad.ldt + q] * b;
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) out[r] += warp_sum(part[r]) * s;
  }
}

// ---- Mixed batches (lora_linear_mixed.cu): row m uses only the adapter of its row
// group, slot = rows[m / per] (device memory; nothing is read on the host). A launch
// carries one window of slots [w0, w0 + p.n) as p.ad[slot - w0]; a row whose slot is
// outside the window (-1, another window, or an out-of-range value) does nothing in it.
struct MixedRows {
  const int64_t* rows;  // [G] slots on the device
  int64_t per;          // token rows per group (M / G, >= 1)
  int64_t w0;           // first slot of this launch's window
};

// Position of row m's adapter in the window, or -1 when the row has no term here.
template <typename T, typename W>
__device__ __forceinline__ int mixed_local(const LowrankBatch<T, W>& p, const MixedRows& r, int64_t m) {
  const int64_t local = r.rows[m / r.per] - r.w0;
  return local >= 0 && local < p.n ? static_cast<int>(local) : -1;
}

// Block reduction of the shrink: t[m0 + i, q] = Σ_threads acc[i] (· E[q]) for i < nrows.
// Every thread of the block calls it (two barriers inside); red: ROWS rows of shared memory.
template <typename T, typename W, int ROWS>
__device__ __forceinline__ void shrink_store(const LowrankAdapter<T, W>& ad, int64_t m0, int nrows, int q,
                                             float (&acc)[ROWS], float (*red)[kShrinkThreads / kWarp]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const float v = warp_sum(acc[i]);
    if (lane == 0) red[i][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    const float e = ad.E != nullptr ? ad.E[q] : 1.f;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const float v = warp_sum(lane < kShrinkThreads / kWarp ? red[i][lane] : 0.f);
      if (lane == 0 && i < nrows) ad.t[(m0 + i) * ad.ldt + q] = ad.E != nullptr ? v * e : v;
    }
  }
  __syncthreads();  // red is free again
}

// grid (ceil(M / ROWS), max rank of the window); block kShrinkThreads: the gathered shrink,
// t[m, q] = (x[m]·A_k[q])·E_k[q] with k row m's own adapter. A tile of ROWS rows that
// share one adapter (the usual case: consecutive rows form the groups) is one
// shrink_partial over the tile (A's row read once for ROWS rows); a tile that straddles
// groups takes its rows one at a time. Every test below reads the same values in every
// thread (block-uniform), so the barriers are reached by all threads or none.
// All adapters of the window write the same t [M, ldt] (a row has one adapter).
template <typename T, typename W, int ROWS, bool VEC>
__global__ void __launch_bounds__(kShrinkThreads)
    lowrank_shrink_mixed_kernel(const __grid_constant__ LowrankBatch<T, W> p, const MixedRows r) {
  __shared__ float red[ROWS][kShrinkThreads / kWarp];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int nrows = static_cast<int>(p.M - m0 < ROWS ? p.M - m0 : ROWS);
  const int q = blockIdx.y;
  int loc[ROWS];
  bool same = true;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    loc[i] = i < nrows ? mixed_local(p, r, m0 + i) : -1;
    same = same && (i >= nrows || loc[i] == loc[0]);
  }
  // An adapter that is off (scale 0), or has no rank q, gets no t: the expand skips it.
  const auto acts = [&](int a) {
    return a >= 0 && q < p.ad[a].rank && state_value(p.scales, p.ad[a].index, p.ad[a].host_scale) != 0.f;
  };
  if (same) {
    if (!acts(loc[0])) return;
    float acc[ROWS];
    shrink_partial<T, W, ROWS, VEC>(p.ad[loc[0]], p.K, m0, nrows, q, threadIdx.x, kShrinkThreads, acc);
    shrink_store<T, W, ROWS>(p.ad[loc[0]], m0, nrows, q, acc, red);
    return;
  }
  for (int i = 0; i < nrows; ++i) {
    if (!acts(loc[i])) continue;
    float acc[1];
    shrink_partial<T, W, 1, VEC>(p.ad[loc[i]], p.K, m0 + i, 1, q, threadIdx.x, kShrinkThreads, acc);
    shrink_store<T, W, 1>(p.ad[loc[i]], m0 + i, 1, q, acc, red);
  }
}

// grid (ceil(M / ROWS), ceil(N / kExpandCols)); block kExpandCols. As lowrank_expand_kernel,
// but for each adapter of the window that some row of the tile uses (a block-uniform
// test), the tile's product is formed by expand_accumulate and added only to the rows of
// that adapter: a select, not a product with 0, so the t of rows of other adapters (never
// written for them: garbage) cannot leak into y. Consecutive rows usually share a group,
// so a tile mostly meets one adapter. y is read and written once per row: one rounding.
template <typename T, typename W, int ROWS>
__global__ void __launch_bounds__(kExpandCols)
    lowrank_expand_mixed_kernel(const __grid_constant__ LowrankBatch<T, W> p, const MixedRows r) {
  __shared__ float Bs[kExpandCols][kRankChunk + 1];
  __shared__ float ts[ROWS][kRankChunk];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kExpandCols;
  const int64_t n = n0 + threadIdx.x;
  int use[ROWS];
  bool any = false;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    use[i] = m0 + i < p.M ? mixed_local(p, r, m0 + i) : -1;
    any = any || use[i] >= 0;
  }
  if (!any) return;  // no row of the tile has an adapter in this window: y stays as it is
  float acc[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) acc[i] = (m0 + i < p.M && n < p.N) ? static_cast<float>(p.y[(m0 + i) * p.N + n]) : 0.f;
  for (int a = 0; a < p.n; ++a) {
    bool used = false;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) used = used || use[i] == a;
    if (!used) continue;  // block-uniform
    const LowrankAdapter<T, W>& ad = p.ad[a];
    const float s = state_value(p.scales, ad.index, ad.host_scale);
    if (s == 0.f || ad.rank == 0) continue;  // the shrink skipped it too: its t was never written
    float part[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) part[i] = 0.f;
    expand_accumulate<T, W, ROWS>(ad, p.M, p.N, m0, n0, Bs, ts, part);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) acc[i] = use[i] == a ? acc[i] + part[i] * s : acc[i];
  }
#pragma unroll
  for (int i = 0; i < ROWS; ++i)
    if (use[i] >= 0 && n < p.N) p.y[(m0 + i) * p.N + n] = from_acc<T>(acc[i]);
}

// No adapters in the epilogue.
struct NoLowrank {};
template <int ROWS>
__device__ __forceinline__ void expand_row(const NoLowrank&, int64_t, int, float (&)[ROWS]) {}

// Dispatch over (x dtype, adapter dtype): the adapters are float32 or x's dtype.
template <typename F>
inline void dispatch_xw(at::ScalarType xt, at::ScalarType wt, const F& f) {
  switch (xt) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kBFloat16:
      wt == at::kFloat ? f(c10::BFloat16{}, float{}) : f(c10::BFloat16{}, c10::BFloat16{});
      break;
    case at::kHalf: wt == at::kFloat ? f(c10::Half{}, float{}) : f(c10::Half{}, c10::Half{}); break;
    default: TORCH_CHECK(false, "peftcore: internal error: no CUDA low-rank kernel for ", xt);
  }
}

}  // namespace peftcore::cuda
