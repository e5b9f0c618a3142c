// Host-side plumbing shared by the CPU LoRA forwards: which adapters are active,
// the per-call Bt scratch (scaled, transposed B's, R_active × out) and the
// threading of the shrink / expand kernels of lowrank.h over 2-D task grids.
// Used by lora_linear.cpp and lora_embedding.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

// Runs f(i0, i1, j0, j1) over a rows × cols grid cut into row_chunk × col_chunk
// tiles. One flat task list serves both regimes: many rows (prefill) split by rows,
// one row (decode) still splits by columns so every thread gets work.
template <typename F>
void parallel_tiles(int64_t rows, int64_t row_chunk, int64_t cols, int64_t col_chunk, int64_t work_per_cell, F f) {
  if (rows == 0 || cols == 0) return;
  const int64_t nr = (rows + row_chunk - 1) / row_chunk;
  const int64_t nc = (cols + col_chunk - 1) / col_chunk;
  const int64_t work_per_task = std::max<int64_t>(1, std::min(rows, row_chunk) * std::min(cols, col_chunk) * work_per_cell);
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / work_per_task);
  at::parallel_for(0, nr * nc, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t / nc) * row_chunk, j0 = (t % nc) * col_chunk;
      f(i0, std::min(rows, i0 + row_chunk), j0, std::min(cols, j0 + col_chunk));
    }
  });
}

// Bt[offset + k, j] = scale · B[j, k] for every active adapter, in acc_t. B may
// have any strides; one pass, threaded over output columns.
template <typename acc_t>
at::Tensor pack_bt(at::TensorList lora_B, const std::vector<ActiveAdapter>& active, int64_t out, int64_t R) {
  at::Tensor Bt = at::empty({R, out}, lora_B[active[0].index].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* bt = Bt.data_ptr<acc_t>();
  for (const auto& ad : active) {
    const at::Tensor& B = lora_B[ad.index];
    const int64_t s0 = B.stride(0), s1 = B.stride(1);
    const acc_t scale = static_cast<acc_t>(ad.scale);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, B.scalar_type(), "pack_bt", [&] {
      const scalar_t* b = B.const_data_ptr<scalar_t>();
      at::parallel_for(0, out, std::max<int64_t>(1, kMinParallelWork / ad.rank), [&](int64_t j0, int64_t j1) {
        // A transpose in 16-column strips: the strip's 16 rows of B (r values each)
        // stay in L1 while each of the r output rows gets one full cache line.
        // (Column by column would either re-read B's lines r times or scatter single
        // writes over r rows `out` apart, which alias in the L1 sets.)
        acc_t* dst = bt + ad.offset * out;
        for (int64_t jb = j0; jb < j1; jb += 16) {
          const int64_t je = std::min(j1, jb + 16);
          for (int64_t k = 0; k < ad.rank; ++k)
            for (int64_t j = jb; j < je; ++j) dst[k * out + j] = scale * static_cast<acc_t>(b[j * s0 + k * s1]);
        }
      });
    });
  }
  return Bt;
}

// y[i, :] = cast(base[row(i), :] + T[i, :] · Bt), threaded over 16-row × 256-column tiles.
template <typename acc_t, typename ot>
void expand_parallel(const acc_t* T, const acc_t* Bt, int64_t R, const ot* base, int64_t ld_base,
                     const int64_t* base_rows, ot* y, int64_t rows, int64_t cols) {
  parallel_tiles(rows, 16, cols, 256, R, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    expand(T + i0 * R, R, Bt + j0, cols, R, base_rows ? base + j0 : base + i0 * ld_base + j0, ld_base,
           base_rows ? base_rows + i0 : nullptr, y + i0 * cols + j0, cols, i1 - i0, j1 - j0);
  });
}

// Up to this many rows the expand multiplies by B as stored (a BLAS GEMV per
// adapter into an fp32 row, then one add-and-cast pass over y) instead of building
// Bt: transposing B (out × r) costs more than the whole product for one token,
// and strided B reads do not vectorise without hardware gathers. Above, the
// transpose is amortised over the rows and the register-blocked `expand` wins.
constexpr int64_t kDirectMaxRows = 4;

// The whole expand step: y[i, :] = cast(base[row(i), :] + Σ_a s_a · T[i, a's ranks] · B_aᵀ).
template <typename acc_t, typename ot>
void expand_lowrank(const at::Tensor& T, at::TensorList lora_B, const std::vector<ActiveAdapter>& active, int64_t R,
                    const ot* base, int64_t ld_base, const int64_t* base_rows, ot* y, int64_t rows, int64_t cols) {
  if (rows <= kDirectMaxRows) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor P;
    for (const auto& ad : active) {
      // s_a folded into T's r_a columns (rows × r_a values), B used as stored.
      const at::Tensor Ta = T.narrow(1, ad.offset, ad.rank) * ad.scale;
      const at::Tensor Bt = lora_B[ad.index].to(acc).t();
      if (P.defined())
        P.addmm_(Ta, Bt);
      else
        P = at::mm(Ta, Bt);
    }
    P = P.contiguous();
    const acc_t* Pp = P.template const_data_ptr<acc_t>();
    parallel_tiles(rows, rows, cols, 1024, 1, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      add_cast(Pp + j0, cols, base + j0, ld_base, base_rows, y + j0, cols, i1 - i0, j1 - j0);
    });
    return;
  }
  const at::Tensor Bt = pack_bt<acc_t>(lora_B, active, cols, R);
  expand_parallel<acc_t, ot>(T.template const_data_ptr<acc_t>(), Bt.template const_data_ptr<acc_t>(), R, base, ld_base,
                             base_rows, y, rows, cols);
}

}  // namespace peftcore::cpu
