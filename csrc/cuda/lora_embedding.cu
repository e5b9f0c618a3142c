// peftcore::lora_embedding on CUDA: y[t] = W[idx_t] + Σ_a s_a · A_a[:, idx_t]ᵀ·B_aᵀ, and its backward.
// Layout: indices int64/int32 [...], W [V, D] (any strides), A_a [r_a, V], B_a [D, r_a];
// y [..., D] contiguous (a fresh tensor or the caller's `out`). Forward: ATen's embedding
// gather for W written into y, the rows of A_aᵀ gathered into the fp32 t buffer (the
// shrink of a one-hot input), then lowrank.cu's expand adding into y in place (one
// rounding). Out-of-range indices trip the gathers' device-side assert (no host check:
// that would sync). Backward: the ATen index_add / GEMMs of common/lora_backward.h
// (shared with the CPU), disabled adapters masked on the device.
// Tests: tests/test_cuda.py (lora_embedding samples).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "checks_cuda.h"
#include "lowrank.h"
#include "ops_cuda.h"
#include "../common/lora_backward.h"
#include "../common/state.h"

namespace peftcore {

using namespace peftcore::cuda;

namespace {

void check_embedding_args(const char* op, const at::Tensor& indices, const at::Tensor& weight,
                          at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                          int64_t padding_idx) {
  check_defined(op, weight, "weight");
  TORCH_CHECK(weight.is_cuda(), "peftcore::", op, ": weight is on ", weight.device(), " but this kernel runs on CUDA");
  check_on(op, indices, "indices", weight.device());
  check_dtype_in(op, indices, "indices", {at::kLong, at::kInt});
  check_dim(op, weight, "weight", 2);
  check_float_dtype(op, weight, "weight");
  const int64_t V = weight.size(0), D = weight.size(1);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < V, "peftcore::", op, ": padding_idx = ", padding_idx,
              " is outside [-1, ", V, ") (num_embeddings = weight.shape[0] = ", V, "; -1 means none)");
  check_adapters(op, lora_A, lora_B, scales, weight.device(), weight.scalar_type(), V,
                 "weight.shape[0] (num_embeddings)", D, "weight.shape[1] (embedding_dim)");
}

}  // namespace

at::Tensor lora_embedding_cuda(const Out* out, const at::Tensor& indices, const at::Tensor& weight,
                               at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                               int64_t padding_idx) {
  const char* op = "lora_embedding";
  check_embedding_args(op, indices, weight, lora_A, lora_B, scales, padding_idx);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t D = weight.size(1);
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(D);
  return write_output(op, out, shape, weight, [&](at::Tensor& y) {
    at::Tensor y2 = y.view({indices.numel(), D});  // no -1: D or the index count may be 0
    const at::Tensor idx = indices.reshape({-1});
    // at::embedding's own call (index_select of the flat indices): the same gather, written
    // into y. padding_idx only affects gradients (as in F.embedding), so it is exact.
    at::index_select_out(y2, weight, 0, idx);
    if (lora_A.empty() || y.numel() == 0) return;
    add_lowrank_embedding(idx.to(at::kLong), lora_A, lora_B, read_state(scales), y2);
  });
}

EmbeddingGrads lora_embedding_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx, std::array<bool, 2> output_mask) {
  const char* op = "lora_embedding_backward";
  check_embedding_args(op, indices, weight, lora_A, lora_B, scales, padding_idx);
  const int64_t D = weight.size(1);
  check_on(op, grad_out, "grad_out", weight.device());
  check_float_dtype(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == D && grad_out.numel() == indices.numel() * D, "peftcore::",
              op, ": grad_out has shape ", grad_out.sizes(), " but the forward output has shape indices.shape + [", D,
              "] with indices.shape = ", indices.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor idx = indices.reshape({-1}).to(at::kLong);
  return lora_embedding_grads(grad_out, idx, weight, lora_A, lora_B, read_state(scales), padding_idx, output_mask);
}

}  // namespace peftcore
