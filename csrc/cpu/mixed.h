// Mixed batches on CPU: each group of token rows runs its own adapter, selected by a
// per-row index tensor, over the same base output (computed once for every row, so each
// base-weight tile is read / unpacked once for the whole batch).
//
//   rows: int64 (or int32) [G], rows[g] in [-1, n_slots): row group g of x (the leading
//   rows of x, M of them, taken in G consecutive groups of M / G) uses adapter slot
//   rows[g] (the position in the op's adapter lists), -1 = the base alone. A group is
//   one batch row with everything generate() expands it into (beams, return sequences),
//   which transformers lays out consecutively.
//
// Shared by lora_linear_mixed / ia3_linear_mixed (lora_linear_mixed.cpp, ia3_linear_mixed.cpp)
// and the quantized *_mixed ops (quant_linear.cpp). Tests: tests/ops/test_mixed_ops.py,
// tests/test_mixed_batch.py. Benchmark: benchmarks/bench_mixed.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "ia3.h"
#include "linear_common.h"
#include "lowrank.h"
#include "lowrank_parallel.h"

namespace peftcore::cpu {

// Token rows [i0, i1) use adapter slot `slot` (consecutive groups with one slot merged).
struct Segment {
  int64_t slot, i0, i1;
};

// Checks `rows` against M token rows and n_slots adapters and returns the segments that
// use an adapter (slot >= 0), in row order.
inline std::vector<Segment> row_segments(const char* op, const at::Tensor& rows, int64_t M, int64_t n_slots) {
  check_rows_shape(op, rows, M, [&](const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "peftcore::", op, ": rows must be a CPU tensor (read on the host) but is on ",
                t.device());
  });
  const int64_t G = rows.numel();
  const at::Tensor r = rows.to(at::kLong).contiguous();
  const int64_t* rp = r.const_data_ptr<int64_t>();
  check_row_slots(op, rp, G, n_slots);
  std::vector<Segment> segs;
  const int64_t per = M / G;
  if (per == 0) return segs;
  for (int64_t g = 0; g < G; ++g) {
    if (rp[g] < 0) continue;
    if (!segs.empty() && segs.back().slot == rp[g] && segs.back().i1 == g * per)
      segs.back().i1 += per;
    else
      segs.push_back({rp[g], g * per, (g + 1) * per});
  }
  return segs;
}

// One adapter slot as the low-rank kernels read it (acc_t copies only where needed).
struct SlotWeights {
  at::Tensor A, B, E;  // A [r, in] contiguous, B [out, r] any strides, E [r] or undefined
  double scale;
};

// A piece of the segmented update: rows [i0, i1) × output columns [j0, j1) of one slot.
struct MixedTask {
  int64_t slot, i0, i1, j0, j1;
};

// Splits the segments into about `nt` (or more) tasks of similar work: long segments
// (prefill) by rows, and when there are fewer segments than threads (few rows) by
// 16-aligned column bands, so that one 1-token adapter can still use every thread.
inline std::vector<MixedTask> mixed_tasks(const std::vector<Segment>& segs, const std::vector<int64_t>& rank,
                                          int64_t cols, int64_t nt) {
  std::vector<MixedTask> tasks;
  int64_t total = 0;
  for (const auto& s : segs) total += (s.i1 - s.i0) * rank[s.slot];
  if (total == 0) return tasks;
  const int64_t target = std::max<int64_t>(1, (total + nt - 1) / nt);  // rank-rows per task
  for (const auto& s : segs) {
    if (rank[s.slot] == 0) continue;
    const int64_t n = s.i1 - s.i0;
    const int64_t pieces = std::clamp<int64_t>(n * rank[s.slot] / target, 1, n);
    for (int64_t p = 0; p < pieces; ++p)
      tasks.push_back({s.slot, s.i0 + n * p / pieces, s.i0 + n * (p + 1) / pieces, 0, cols});
  }
  const int64_t bands = std::min<int64_t>((nt + int64_t(tasks.size()) - 1) / int64_t(tasks.size()),
                                          std::max<int64_t>(1, cols / 64));
  if (bands <= 1) return tasks;
  std::vector<MixedTask> split;
  for (const auto& t : tasks)
    for (int64_t b = 0; b < bands; ++b) {
      const int64_t j0 = std::min(cols, round_up(cols * b / bands, 16));
      const int64_t j1 = b + 1 == bands ? cols : std::min(cols, round_up(cols * (b + 1) / bands, 16));
      if (j0 < j1) split.push_back({t.slot, t.i0, t.i1, j0, j1});
    }
  return split;
}

// Segments of up to this many rows take B row by row instead of packing Bᵀ.
constexpr int64_t kDirectRows = 4;

// y[i, :] += s_k · ((x[i]·A_kᵀ) ⊙ e_k)·B_kᵀ for every row i of a segment of slot k, in
// acc_t, rounded once into y's dtype xt. x: [M, in] rows (row stride ldx, unit column
// stride); y: [M, out] contiguous, holding the base output. One parallel region.
template <typename xt, typename acc_t>
void add_lowrank_rows_typed(const xt* x, int64_t ldx, const std::vector<Segment>& segs,
                            const std::vector<SlotWeights>& slots, int64_t in, int64_t out, xt* y) {
  std::vector<int64_t> rank(slots.size(), 0);
  for (size_t k = 0; k < slots.size(); ++k)
    if (slots[k].A.defined() && slots[k].scale != 0.0) rank[k] = slots[k].A.size(0);
  int64_t work = 0;
  for (const auto& s : segs) work += (s.i1 - s.i0) * rank[s.slot] * (in + out);
  if (work == 0) return;
  const int64_t nt = std::clamp<int64_t>(work / kMinParallelWork, 1, at::get_num_threads());
  const std::vector<MixedTask> tasks = mixed_tasks(segs, rank, out, nt);
  at::parallel_for(0, int64_t(tasks.size()), nt == 1 ? int64_t(tasks.size()) : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const MixedTask& t = tasks[ti];
      const SlotWeights& w = slots[t.slot];
      const int64_t r = rank[t.slot], n = t.i1 - t.i0;
      const int64_t block = std::min(t.j1 - t.j0, round_up(std::max<int64_t>(64, kBtBlockElems / r), 64));
      const int64_t ldbt = round_up(block, 16);
      const int64_t t_size = round_up(n * r, 16);
      // Bt: r × ldbt packed (many rows), or n × block direct products (few rows).
      acc_t* T = thread_scratch<acc_t>(t_size + std::max(r, std::min(n, kDirectRows)) * ldbt);
      acc_t* Bt = T + t_size;
      shrink(x + t.i0 * ldx, ldx, w.A.template const_data_ptr<acc_t>(), in, T, r, n, r, in);
      if (w.E.defined()) {  // AdaLoRA: t[:, q] *= e[q], as reference.lora_linear rounds it
        const acc_t* e = w.E.template const_data_ptr<acc_t>();
        for (int64_t i = 0; i < n; ++i)
          for (int64_t q = 0; q < r; ++q) T[i * r + q] *= e[q];
      }
      const acc_t* B = w.B.template const_data_ptr<acc_t>();
      if (n <= kDirectRows) {
        // Few rows (decode): packing Bᵀ would cost more than the product. B's rows are
        // contiguous r-vectors, so d[i, j] = T[i]·B[j] is shrink's dot product with T as x.
        for (int64_t jb = t.j0; jb < t.j1; jb += block) {
          const int64_t wd = std::min(block, t.j1 - jb);
          shrink(T, r, B + jb * r, r, Bt, wd, n, wd, r);
          for (int64_t i = 0; i < n; ++i) {
            xt* yi = y + (t.i0 + i) * out + jb;
            const acc_t* di = Bt + i * wd;
            const acc_t s = static_cast<acc_t>(w.scale);
            for (int64_t j = 0; j < wd; ++j) yi[j] = static_cast<xt>(static_cast<acc_t>(yi[j]) + s * di[j]);
          }
        }
        continue;
      }
      for (int64_t jb = t.j0; jb < t.j1; jb += block) {
        const int64_t wd = std::min(block, t.j1 - jb);
        pack_bt(B + jb * w.B.stride(0), w.B.stride(0), w.B.stride(1), r, static_cast<acc_t>(w.scale), Bt, ldbt, wd);
        xt* yp = y + t.i0 * out + jb;
        expand(T, r, Bt, ldbt, r, yp, out, nullptr, yp, out, n, wd);
      }
    }
  });
}

// Each slot a row group uses, in the accumulation dtype: A contiguous, B as is, E flat.
inline std::vector<SlotWeights> used_slots(const std::vector<Segment>& segs, at::TensorList lora_A,
                                           at::TensorList lora_B, at::TensorList lora_E, const at::Tensor& scales,
                                           at::ScalarType acc) {
  std::vector<SlotWeights> slots(lora_A.size());
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  for (const auto& seg : segs) {
    SlotWeights& w = slots[seg.slot];
    if (w.A.defined() || sp[seg.slot] == 0.0f || lora_A[seg.slot].size(0) == 0) continue;
    // Scale 0 or rank 0: nothing to add (and inf / NaN in such an adapter never reads).
    w.A = lora_A[seg.slot].to(acc).contiguous();
    w.B = lora_B[seg.slot].to(acc).contiguous();  // [out, r] row-major: the direct path reads its rows
    if (!lora_E.empty()) w.E = lora_E[seg.slot].reshape({-1}).to(acc).contiguous();
    w.scale = static_cast<double>(sp[seg.slot]);
  }
  return slots;
}

// y (contiguous [..., out], x's dtype, holding the base output) += each row group's adapter.
inline void add_lowrank_rows(const at::Tensor& x, const std::vector<Segment>& segs, at::TensorList lora_A,
                             at::TensorList lora_B, at::TensorList lora_E, const at::Tensor& scales, int64_t out,
                             at::Tensor& y) {
  if (segs.empty() || y.numel() == 0) return;
  const int64_t in = x.size(-1), M = leading_rows(x);
  const at::Tensor x2 = x.reshape({M, in}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_add_lowrank_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const std::vector<SlotWeights> slots = used_slots(segs, lora_A, lora_B, lora_E, scales, acc);
    add_lowrank_rows_typed<scalar_t, acc_t>(x2.const_data_ptr<scalar_t>(), in, segs, slots, in, out,
                                            y.data_ptr<scalar_t>());
  });
}

// ---- (IA)³ per row group: each vector checked (ia3.h's rules) and widened once.
inline std::vector<at::Tensor> ia3_slot_vectors(const char* op, at::TensorList ia3_l, const std::vector<Segment>& segs,
                                                at::ScalarType x_dtype, int64_t features, const char* what) {
  std::vector<at::Tensor> vecs(ia3_l.size());
  const auto acc = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  check_ia3_vectors(op, ia3_l, x_dtype, features, what, device_rule(op, at::kCPU));
  for (const auto& s : segs)
    if (!vecs[s.slot].defined()) vecs[s.slot] = ia3_l[s.slot].reshape({-1}).to(acc).contiguous();
  return vecs;
}

// Rows of each segment of `src` ([M, cols], row stride lds, column stride css) scaled by
// their slot's vector into `dst` ([M, cols] contiguous; dst may be src: in place); rows
// of no segment are copied when dst is not src. One parallel pass over rows.
template <typename T, typename acc_t>
void ia3_scale_segments(const T* src, int64_t lds, int64_t css, const std::vector<Segment>& segs,
                        const std::vector<at::Tensor>& vecs, T* dst, int64_t M, int64_t cols) {
  if (M == 0 || cols == 0) return;
  std::vector<const acc_t*> lrow(M, nullptr);
  for (const auto& s : segs)
    for (int64_t i = s.i0; i < s.i1; ++i) lrow[i] = vecs[s.slot].template const_data_ptr<acc_t>();
  const bool in_place = src == dst;
  at::parallel_for(0, M, std::max<int64_t>(1, kIa3Grain / cols), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (lrow[i] != nullptr)
        ia3_scale(src + i * lds, lds, css, lrow[i], dst + i * cols, cols, 1, cols);
      else if (!in_place)
        for (int64_t k = 0; k < cols; ++k) dst[i * cols + k] = src[i * lds + k * css];
    }
  });
}

// y (contiguous [..., N]) with each segment's rows scaled in place by its vector.
inline void ia3_scale_output_rows(at::Tensor& y, const std::vector<Segment>& segs, const std::vector<at::Tensor>& vecs) {
  if (segs.empty() || y.numel() == 0) return;
  const int64_t N = y.size(-1), M = y.numel() / N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "peftcore_ia3_scale_output_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    ia3_scale_segments<scalar_t, acc_t>(yp, N, 1, segs, vecs, yp, M, N);
  });
}

// x' = x with each segment's rows scaled by its vector (round_x(acc(x) ⊙ l), PEFT's rounding),
// other rows as they are: a fresh contiguous [..., K] tensor in x's dtype, x read once.
inline at::Tensor ia3_scaled_input_rows(const at::Tensor& x, const std::vector<Segment>& segs,
                                        const std::vector<at::Tensor>& vecs) {
  const int64_t K = x.size(-1), M = leading_rows(x);
  const at::Tensor x2 = x.reshape({M, K});
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_ia3_scaled_input_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ia3_scale_segments<scalar_t, acc_t>(x2.const_data_ptr<scalar_t>(), x2.stride(0), x2.stride(1), segs, vecs,
                                        out.data_ptr<scalar_t>(), M, K);
  });
  return out;
}

}  // namespace peftcore::cpu
