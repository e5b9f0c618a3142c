// Host API of the CUDA low-rank update (lowrank.cu), shared by every LoRA-family op:
//   y += Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_a)·B_aᵀ
// on a base output y already computed (ATen GEMM, or the quantized base kernels).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "lowrank.cuh"
#include "../common/state.h"

namespace peftcore::cuda {

// y: contiguous [M, N] view of the base output in x's dtype, updated in place and
// rounded once. x: [..., K] (any strides), lora_x: per-adapter inputs shaped like x,
// lora_E: empty (LoRA) or r_a values per adapter (AdaLoRA). Adapters with rank 0, or
// whose host scale is 0, are skipped; with device scales the kernels skip those whose
// scale reads 0, so NaN in a disabled adapter never reaches y. Checked arguments only.
void add_lowrank(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                 const std::optional<at::TensorList>& lora_x, at::TensorList lora_E, const State& scales,
                 at::Tensor& y);

// The embedding form: t_a[m, q] = A_a[q, idx[m]] (a gather in place of the shrink), then the
// same expand. idx: flat int64 indices on y's device; y: contiguous [M, D].
void add_lowrank_embedding(const at::Tensor& idx, at::TensorList lora_A, at::TensorList lora_B,
                           const State& scales, at::Tensor& y);

// For a base kernel that adds the adapters in its own epilogue (the fused quantized
// GEMVs; see expand_row in lowrank.cuh): launches the shrink into an fp32 t buffer and
// fills `batch` (y unset) for the epilogue. Returns false, launching nothing, when the
// fused form does not apply (no adapter possibly on, more than kShrinkMaxRows rows or
// kMaxAdapters adapters, adapters not float32, an odd lora_x dtype): the caller then adds
// them with add_lowrank. `keep` holds the buffers the launch refers to. lora_E (AdaLoRA)
// scales the shrink result in the shrink kernel, as in add_lowrank.
template <typename T>
bool shrink_for_epilogue(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B, at::TensorList lora_E,
                         const std::optional<at::TensorList>& lora_x, const State& scales, int64_t N,
                         LowrankBatch<T, float>& batch, std::vector<at::Tensor>& keep);

}  // namespace peftcore::cuda
