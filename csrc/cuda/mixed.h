// Host side of the CUDA mixed batches (the *_mixed ops): row group g of x (its leading
// rows, M of them, in G = rows.numel() consecutive groups of M / G) uses adapter slot
// rows[g] alone, -1 = the base (see ../cpu/mixed.h for the layout and its rationale).
// `rows` may live on the GPU (the model's layers keep it there): its values are then
// read only by the kernels, never on the host, so a call does not sync. Hence the one
// difference from the CPU kernels: a device-resident value outside [-1, n_slots) cannot
// be reported and makes its group the base alone (as -1). CPU `rows` are range-checked on
// the host with the CPU kernels' message. Implementations: lora_linear_mixed.cu (the
// LoRA terms), ia3_linear_mixed.cu (the IA3 scaling).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks_cuda.h"
#include "../common/state.h"

namespace peftcore::cuda {

// Checks `rows` (dtype, shape, that its groups divide M; its values too when it is a CPU
// tensor) with the CPU kernels' messages; returns it as int64 on x's device.
at::Tensor check_rows(const char* op, const at::Tensor& rows, int64_t M, int64_t n_slots, const at::Device& dev);

// y (contiguous [M, N] base output, xa's dtype) += for each row m of a group with slot k:
// s_k · ((xa[m]·A_kᵀ) ⊙ E_k)·B_kᵀ, rounded once. xa: [..., K] (x, or the 4-bit ops'
// lora_x); lora_E empty (LoRA) or one vector per slot (AdaLoRA). Slots with scale 0 or
// rank 0 are never read. Checked arguments only; rows from check_rows.
void add_lowrank_mixed(const at::Tensor& xa, at::TensorList lora_A, at::TensorList lora_B, at::TensorList lora_E,
                       const State& scales, const at::Tensor& rows, at::Tensor& y);

// The per-row (IA)³ scaling of a [M, F] matrix: row m of a group with slot k gets
// out[m] = round(acc(in[m]) ⊙ ia3_l[k]) (ia3.cu's rounding); other rows are copied (out
// of place) or left as they are (in place: out is in). in: any strides; out contiguous.
void ia3_scale_rows(at::TensorList ia3_l, const at::Tensor& rows, const at::Tensor& in, at::Tensor& out);

// The (IA)³ mixed forward around a base layer, for the dense and quantized ia3_*_mixed ops
// (arguments checked, rows from check_rows): `base(x, y)` writes x's base output into y
// (contiguous [..., N], x's dtype: the op's result, possibly the caller's `out`).
// feedforward, each row group's x rows scaled before the base; otherwise its output rows
// scaled after it in y, bias included (the rounded base rounded again: ia3_linear's
// roundings).
template <typename Base>
void ia3_mixed_around(const at::Tensor& x, at::TensorList ia3_l, const at::Tensor& rows, bool feedforward,
                      at::Tensor& y, const Base& base) {
  if (ia3_l.empty()) {
    base(x, y);
    return;
  }
  const int64_t K = x.size(-1), M = leading_rows(x);
  if (feedforward) {
    at::Tensor xs = at::empty({M, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
    ia3_scale_rows(ia3_l, rows, x.reshape({M, K}), xs);
    base(xs.view(x.sizes()), y);
    return;
  }
  base(x, y);
  at::Tensor y2 = y.view({M, y.size(-1)});
  ia3_scale_rows(ia3_l, rows, y2, y2);
}

}  // namespace peftcore::cuda
