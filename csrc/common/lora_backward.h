// The backward of lora_linear and lora_embedding, written once for the CPU and the CUDA
// kernels: ATen GEMMs, the base's in the base dtype (as F.linear's backward) and the
// adapters' in the accumulation dtype (float32, float64 for float64), each gradient cast
// back once, following reference.lora_linear_backward /
// reference.lora_embedding_backward. The callers check the arguments (with their device
// rules) and pass the state as State reads it (state.h): host values skip the adapters
// that are off; device values mask every term with a select, so a disabled adapter's NaN
// never leaks into the gradients and nothing syncs with the host.
// Tests: tests/test_autograd.py, tests/ops/ (lora_linear_backward / lora_embedding_backward
// samples), tests/test_cuda.py.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

#include "../ops.h"
#include "state.h"

namespace peftcore {

// in / out: x.shape[-1] and weight.shape[0].
inline LinearGrads lora_linear_grads(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                     at::TensorList lora_A, at::TensorList lora_B, const State& st,
                                     const std::optional<at::TensorList>& lora_x, std::array<bool, 4> output_mask,
                                     int64_t in, int64_t out) {
  const auto [want_x, want_w, want_b, want_ad] = output_mask;
  const auto f = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // bf16 / fp16: the base's GEMMs run in the base dtype, as F.linear's own backward runs
  // them (the GEMM library accumulates in float32 internally): never a float32 copy of W.
  // The adapter terms accumulate in f and join the base's input gradient before its one
  // cast back.
  const bool narrow = x.scalar_type() != f;
  const at::Tensor go = grad_out.reshape({-1, out});  // in x's dtype, as W (checked)
  const at::Tensor g = go.to(f);
  const at::Tensor x2 = x.reshape({-1, in});
  // A fresh empty tensor per output not asked for: outputs of an op must not alias.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = want_x ? at::mm(go, weight) : at::Tensor();
  at::Tensor gw = want_w ? at::mm(go.t(), x2) : empty();
  at::Tensor gb = want_b ? g.sum(0).to(grad_out.scalar_type()) : empty();
  at::Tensor gx_ad;  // narrow: the adapters' share of grad_x, in f

  std::vector<at::Tensor> gA, gB, gxa;
  for (size_t a = 0; a < lora_A.size(); ++a) {
    const at::Tensor &A = lora_A[a], &B = lora_B[a];
    if (A.size(0) == 0 || !st.maybe_on(a)) {  // took no part in the forward
      if (want_ad) {
        gA.push_back(at::zeros(A.sizes(), A.options()));
        gB.push_back(at::zeros(B.sizes(), B.options()));
      }
      if (lora_x.has_value()) gxa.push_back(at::zeros((*lora_x)[a].sizes(), (*lora_x)[a].options()));
      continue;
    }
    const at::Tensor xa2 = lora_x.has_value() ? (*lora_x)[a].reshape({-1, in}).to(f) : x2.to(f);
    const at::Tensor Af = A.to(f);
    const at::Tensor gt = st.scaled(at::mm(g, B.to(f)), a);  // [n, r]: grad wrt x_a·A_aᵀ
    if (want_ad) {
      const at::Tensor t = at::mm(xa2, Af.t());  // [n, r]
      gA.push_back(st.masked(at::mm(gt.t(), xa2), a).to(A.scalar_type()));
      gB.push_back(st.masked(st.scaled(at::mm(g.t(), t), a), a).to(B.scalar_type()));
    }
    if (lora_x.has_value()) {
      const at::Tensor& xa = (*lora_x)[a];
      gxa.push_back(st.masked(at::mm(gt, Af), a).reshape(xa.sizes()).to(xa.scalar_type()));
    } else if (want_x) {
      // Host state: one fused accumulate; device state: the masked term added.
      at::Tensor& acc = narrow ? gx_ad : gx;
      if (!acc.defined())
        acc = st.masked(at::mm(gt, Af), a);
      else if (st.on_device())
        acc.add_(st.masked(at::mm(gt, Af), a));
      else
        acc.addmm_(gt, Af);
    }
  }
  if (gx_ad.defined()) gx = gx_ad.add_(gx);  // in f: one rounding of the adapters' share
  gx = want_x ? gx.reshape(x.sizes()).to(x.scalar_type()) : empty();
  return {gx, gw, gb, gA, gB, gxa};
}

// idx: the flat int64 indices (checked); V, D: weight's [V, D].
inline EmbeddingGrads lora_embedding_grads(const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& weight,
                                           at::TensorList lora_A, at::TensorList lora_B, const State& st,
                                           int64_t padding_idx, std::array<bool, 2> output_mask) {
  const int64_t V = weight.size(0), D = weight.size(1);
  const auto [want_w, want_ad] = output_mask;
  const auto f = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_out.reshape({-1, D}).to(f);
  // Tokens at padding_idx send no gradient into the tables they read (W's row, A's
  // column); B still sees their activations, so it uses the unmasked g.
  const at::Tensor g_tab = padding_idx < 0 ? g : g * (idx != padding_idx).unsqueeze(1).to(f);
  at::Tensor gw = want_w ? at::zeros({V, D}, weight.options().dtype(f)).index_add_(0, idx, g_tab).to(weight.scalar_type())
                         : at::empty({0}, weight.options());
  std::vector<at::Tensor> gA, gB;
  if (want_ad) {
    for (size_t a = 0; a < lora_A.size(); ++a) {
      const at::Tensor &A = lora_A[a], &B = lora_B[a];
      if (A.size(0) == 0 || !st.maybe_on(a)) {
        gA.push_back(at::zeros(A.sizes(), A.options()));
        gB.push_back(at::zeros(B.sizes(), B.options()));
        continue;
      }
      const at::Tensor t = A.to(f).t().index_select(0, idx);       // [n, r]
      const at::Tensor gt = st.scaled(at::mm(g_tab, B.to(f)), a);  // [n, r]
      const at::Tensor gAt = at::zeros({V, A.size(0)}, A.options().dtype(f)).index_add_(0, idx, gt);
      gA.push_back(st.masked(gAt.t(), a).to(A.scalar_type()).contiguous());  // laid out like A (the fake says so)
      gB.push_back(st.masked(st.scaled(at::mm(g.t(), t), a), a).to(B.scalar_type()));
    }
  }
  return {gw, gA, gB};
}

}  // namespace peftcore
