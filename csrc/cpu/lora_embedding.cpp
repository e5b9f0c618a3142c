// peftcore::lora_embedding on CPU: y[t] = W[idx_t] + Σ_a s_a · A_a[:, idx_t]ᵀ·B_aᵀ, and its backward.
// Layout: indices int64/int32 [...], W [V, D], A_a [r_a, V], B_a [D, r_a]; y [..., D] contiguous
// in W's dtype (the .out overload writes it into the caller's `out`: common/output.h).
// Forward: per thread, gathers the adapters' A columns into T rows, then one expand
// pass per token reads W's row, adds T·Bt in fp32 and writes y (rounded once). Backward:
// the ATen index_add / GEMMs of common/lora_backward.h (shared with CUDA).
// Tests: tests/ops/test_lora_embedding.py, test_opcheck.py, tests/test_autograd.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/checks.h"
#include "../common/lora_backward.h"
#include "../ops.h"
#include "lowrank.h"
#include "lowrank_parallel.h"

namespace peftcore {
namespace {

void check_embedding_args(const char* op, const at::Tensor& indices, const at::Tensor& weight,
                          at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                          int64_t padding_idx) {
  const auto cpu = at::kCPU;
  check_defined(op, indices, "indices");
  check_defined(op, weight, "weight");
  check_device(op, indices, "indices", cpu);
  check_device(op, weight, "weight", cpu);
  check_dtype_in(op, indices, "indices", {at::kLong, at::kInt});
  check_dim(op, weight, "weight", 2);
  check_float_dtype(op, weight, "weight");
  const int64_t V = weight.size(0), D = weight.size(1);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < V, "peftcore::", op, ": padding_idx = ", padding_idx,
              " is outside [-1, ", V, ") (num_embeddings = weight.shape[0] = ", V, "; -1 means none)");
  check_adapters(op, lora_A, lora_B, scales, cpu, weight.scalar_type(), V, "weight.shape[0] (num_embeddings)", D,
                 "weight.shape[1] (embedding_dim)");
}

// indices as contiguous int64, every one checked to lie in [0, V).
at::Tensor checked_indices(const char* op, const at::Tensor& indices, int64_t V) {
  at::Tensor idx = indices.reshape({-1}).to(at::kLong).contiguous();
  if (idx.numel() == 0) return idx;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  if (lo < 0 || hi >= V) {
    const int64_t bad = lo < 0 ? lo : hi;
    const int64_t pos = (idx == bad).nonzero()[0].item<int64_t>();
    TORCH_CHECK(false, "peftcore::", op, ": index ", bad, " (at flat position ", pos, " of indices with shape ",
                indices.sizes(), ") is out of range for an embedding table of ", V, " rows");
  }
  return idx;
}

template <typename wt, typename acc_t>
void lowrank_embedding(const at::Tensor& idx, const at::Tensor& weight, at::TensorList lora_A, at::TensorList lora_B,
                       const std::vector<cpu::ActiveAdapter>& active, int64_t R, at::Tensor& y) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n = idx.numel(), D = weight.size(1);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  std::vector<at::Tensor> As, Bs;
  std::vector<cpu::BView<acc_t>> Bv;
  for (const auto& ad : active) {
    As.push_back(lora_A[ad.index].to(acc));
    Bs.push_back(lora_B[ad.index].to(acc));
    Bv.push_back({Bs.back().template const_data_ptr<acc_t>(), Bs.back().stride(0), Bs.back().stride(1)});
  }
  // T[t, offset + k] = A_a[k, idx_t]: the "shrink" of a one-hot input is a gather (its
  // one reduction index is p = 0; a part without it adds nothing).
  const auto fill_T = [&](int64_t t0, int64_t t1, const cpu::TPart& part, acc_t* T, int64_t ldt) {
    for (size_t a = 0; a < active.size(); ++a) {
      const acc_t* Ap = As[a].template const_data_ptr<acc_t>();
      const int64_t s0 = As[a].stride(0), s1 = As[a].stride(1), off = active[a].offset;
      const int64_t q0 = std::max(part.q0, off), q1 = std::min(part.q1, off + active[a].rank);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t q = q0; q < q1; ++q)
          T[(t - t0) * ldt + q] = part.p0 == 0 ? Ap[(q - off) * s0 + ip[t] * s1] : acc_t(0);
    }
  };
  // W's rows are read straight from the table (no gathered copy): base_rows = idx.
  const at::Tensor W = weight.contiguous();
  cpu::lowrank_update<acc_t, wt>(n, D, R, 1, fill_T, active, Bv, W.const_data_ptr<wt>(), D, ip, y.data_ptr<wt>());
}

}  // namespace

at::Tensor lora_embedding_cpu(const Out* out, const at::Tensor& indices, const at::Tensor& weight,
                              at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                              int64_t padding_idx) {
  const char* op = "lora_embedding";
  check_embedding_args(op, indices, weight, lora_A, lora_B, scales, padding_idx);
  const int64_t D = weight.size(1);
  const at::Tensor idx = checked_indices(op, indices, weight.size(0));
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(D);
  return write_output(op, out, shape, weight, [&](at::Tensor& y) {
    if (y.numel() == 0) return;
    int64_t R = 0;
    const auto active = cpu::active_adapters(scales, lora_A, R);
    if (active.empty()) {
      // padding_idx only affects gradients (as in F.embedding), so the plain gather
      // (F.embedding's index_select) is exact.
      at::Tensor y2 = y.view({idx.numel(), D});
      at::index_select_out(y2, weight, 0, idx);
      return;
    }
    switch (weight.scalar_type()) {
      case at::kFloat: lowrank_embedding<float, float>(idx, weight, lora_A, lora_B, active, R, y); break;
      case at::kBFloat16: lowrank_embedding<c10::BFloat16, float>(idx, weight, lora_A, lora_B, active, R, y); break;
      case at::kHalf: lowrank_embedding<c10::Half, float>(idx, weight, lora_A, lora_B, active, R, y); break;
      case at::kDouble: lowrank_embedding<double, double>(idx, weight, lora_A, lora_B, active, R, y); break;
      default: TORCH_CHECK(false, "peftcore::lora_embedding: unsupported dtype ", weight.scalar_type());
    }
  });
}

EmbeddingGrads lora_embedding_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx, std::array<bool, 2> output_mask) {
  const char* op = "lora_embedding_backward";
  check_embedding_args(op, indices, weight, lora_A, lora_B, scales, padding_idx);
  const int64_t V = weight.size(0), D = weight.size(1);
  check_defined(op, grad_out, "grad_out");
  check_device(op, grad_out, "grad_out", at::kCPU);
  check_float_dtype(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == D && grad_out.numel() == indices.numel() * D, "peftcore::",
              op, ": grad_out has shape ", grad_out.sizes(), " but the forward output has shape indices.shape + [", D,
              "] with indices.shape = ", indices.sizes());
  const at::Tensor idx = checked_indices(op, indices, V);
  return lora_embedding_grads(grad_out, idx, weight, lora_A, lora_B, read_state(scales), padding_idx, output_mask);
}

}  // namespace peftcore
