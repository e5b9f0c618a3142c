// Host-side plumbing shared by the CPU LoRA forwards: which adapters are active,
// and the threading of the shrink / pack_bt / expand kernels of lowrank.h
// (lowrank_update: one parallel region per call, two at decode; per-thread scratch).
// Used by lora_linear.cpp and lora_embedding.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "lowrank.h"

namespace peftcore::cpu {

struct ActiveAdapter {
  int64_t index;  // position in lora_A / lora_B / scales
  double scale;   // the float32 scale, widened (as reference.py's .float().tolist())
  int64_t rank;
  int64_t offset;  // first column of this adapter in T, first row in Bt
};

// Adapters with scale 0 or rank 0 contribute exactly nothing and are skipped, so
// inf / NaN in a disabled adapter's weights never reach the output.
inline std::vector<ActiveAdapter> active_adapters(const at::Tensor& scales, at::TensorList lora_A, int64_t& R) {
  std::vector<ActiveAdapter> active;
  R = 0;
  if (lora_A.empty()) return active;
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  for (size_t a = 0; a < lora_A.size(); ++a) {
    const int64_t r = lora_A[a].size(0);
    if (sp[a] == 0.0f || r == 0) continue;
    active.push_back({static_cast<int64_t>(a), static_cast<double>(sp[a]), r, R});
    R += r;
  }
  return active;
}


// Below this many multiply-adds a thread hand-off costs more than it saves.
constexpr int64_t kMinParallelWork = 16384;

// Width of the Bt block a thread packs at a time: about 64 KB of fp32 (R × width),
// so the block stays in L2 (and mostly L1) while every row tile of y streams past it.
constexpr int64_t kBtBlockElems = 16384;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// One adapter's B [out, r] as the expand reads it (any strides).
// One adapter's B (out × r, strides s0, s1), in the accumulation type or (adapters kept
// in the base dtype) in bf16 / fp16: pack_bt widens it.
template <typename bt>
struct BView {
  const bt* data;
  int64_t s0, s1;
};

// This thread's scratch, 64-byte aligned, grown as needed and kept between calls
// (no allocation per call; a few hundred KB at most for usual shapes).
template <typename acc_t>
acc_t* thread_scratch(int64_t n) {
  struct Buf {
    acc_t* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf buf;
  if (buf.n < n) {
    std::free(buf.p);
    buf.n = 0;
    const int64_t want = round_up(n, 64);  // aligned_alloc wants a multiple of the alignment
    buf.p = static_cast<acc_t*>(std::aligned_alloc(64, want * sizeof(acc_t)));
    TORCH_CHECK(buf.p != nullptr, "peftcore: cannot allocate ", want * sizeof(acc_t), " bytes of scratch");
    buf.n = want;
  }
  return buf.p;
}

// The part of T one call of a fill_T callback writes: rank columns [q0, q1) of the
// concatenated R, summed over the reduction indices [p0, p1) only (a shrink's slice of
// in_features; a gather has one index, p = 0).
struct TPart {
  int64_t q0, q1, p0, p1;
};

// At decode (fewer rows than threads) T is first computed by all threads together when
// it costs at least this many multiply-adds (A of ~128 KB in fp32 and up); otherwise every
// thread reads all of A. Measured (2 threads, bf16 base streamed from memory, fp32 r=16
// adapter): the low-rank part of a 2048 -> 5632 layer 31 µs against 37-43 µs; equal for
// the others. Below it, the extra parallel region costs more than it saves.
constexpr int64_t kSplitShrinkWork = 32768;

// The whole low-rank update:
//   y[i, :] = cast(base[row(i), :] + Σ_a T[i, a's ranks] · s_a·B_aᵀ)   for i < rows,
// where fill_T(i0, i1, part, t, ldt) writes part of rows [i0, i1) of T (rows × R, acc_t;
// t points at the tile's column 0) and a row of T costs R·reduce multiply-adds. Each
// thread packs s_a·B_aᵀ, block by block, into its own scratch, so nothing is shared but
// the inputs, T and y, and no thread waits for another inside a region.
//   - rows >= threads (prefill): one region; each thread takes a band of rows and all
//     columns, and computes its own rows of T (the Bt packing, ~R·out values, is repeated
//     per thread: cheap next to the FMAs);
//   - fewer rows (decode): each thread takes a band of columns. T (a few dot products) is
//     computed beforehand by all threads, each one its share of ranks and of in_features
//     (so of A's bytes), when that is worth a second region; else by every thread.
template <typename acc_t, typename ot, typename FillT, typename bt>
void lowrank_update(int64_t rows, int64_t cols, int64_t R, int64_t reduce, const FillT& fill_T,
                    const std::vector<ActiveAdapter>& active, const std::vector<BView<bt>>& Bs, const ot* base,
                    int64_t ld_base, const int64_t* base_rows, ot* y) {
  if (rows == 0 || cols == 0 || R == 0) return;
  const int64_t work = rows * R * (reduce + cols);
  const int64_t nt = std::clamp<int64_t>(work / kMinParallelWork, 1, at::get_num_threads());
  const bool by_rows = rows >= nt;
  const TPart whole{0, R, 0, reduce};

  std::vector<acc_t> shared_T;  // decode: T computed once for every column band
  if (!by_rows && rows * R * reduce >= kSplitShrinkWork) {
    // Rank splits on 8-rank boundaries (the shrink kernel's tile), in_features splits on
    // 16; each (rank, in) piece sums into its own partial T, added up below.
    const int64_t nq = std::min<int64_t>(nt, (R + 7) / 8), nk = std::min<int64_t>(nt / nq, (reduce + 15) / 16);
    shared_T.assign(static_cast<size_t>(nk * rows * R), acc_t(0));
    at::parallel_for(0, nq * nk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t qc = t / nk, kc = t % nk;
        // piece c of n over [0, len) on multiples of `step`, the last one to the end
        const auto cut = [](int64_t len, int64_t c, int64_t n, int64_t step) {
          return c == n ? len : std::min(len, round_up(len * c / n, step));
        };
        const TPart part{cut(R, qc, nq, 8), cut(R, qc + 1, nq, 8), cut(reduce, kc, nk, 16), cut(reduce, kc + 1, nk, 16)};
        if (part.q0 < part.q1 && part.p0 < part.p1) fill_T(0, rows, part, shared_T.data() + kc * rows * R, R);
      }
    });
    for (int64_t kc = 1; kc < nk; ++kc)
      for (int64_t e = 0; e < rows * R; ++e) shared_T[e] += shared_T[kc * rows * R + e];
  }

  const int64_t block = std::min(cols, round_up(std::max<int64_t>(64, kBtBlockElems / R), 64));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t i0 = 0, i1 = rows, j0 = 0, j1 = cols;
      if (by_rows) {
        i0 = rows * t / nt;
        i1 = rows * (t + 1) / nt;
      } else {  // column bands on 16-column boundaries (whole vectors, whole cache lines)
        j0 = std::min(cols, round_up(cols * t / nt, 16));
        j1 = t + 1 == nt ? cols : std::min(cols, round_up(cols * (t + 1) / nt, 16));
      }
      if (i0 >= i1 || j0 >= j1) continue;
      const int64_t ldbt = round_up(std::min(block, j1 - j0), 16);
      const int64_t t_size = shared_T.empty() ? round_up((i1 - i0) * R, 16) : 0;
      acc_t* scratch = thread_scratch<acc_t>(t_size + R * ldbt);
      acc_t* Bt = scratch + t_size;
      const acc_t* Tl = scratch;
      if (shared_T.empty())
        fill_T(i0, i1, whole, scratch, R);
      else
        Tl = shared_T.data();
      for (int64_t jb = j0; jb < j1; jb += block) {
        const int64_t w = std::min(block, j1 - jb);
        for (size_t k = 0; k < active.size(); ++k)
          pack_bt(Bs[k].data + jb * Bs[k].s0, Bs[k].s0, Bs[k].s1, active[k].rank, static_cast<acc_t>(active[k].scale),
                  Bt + active[k].offset * ldbt, ldbt, w);
        expand(Tl, R, Bt, ldbt, R, base_rows ? base + jb : base + i0 * ld_base + jb, ld_base,
               base_rows ? base_rows + i0 : nullptr, y + i0 * cols + jb, cols, i1 - i0, w);
      }
    }
  });
}

}  // namespace peftcore::cpu
