// peftcore::lora_linear on CUDA: y = x·Wᵀ + b + Σ_a s_a · (x_a·A_aᵀ)·B_aᵀ, and its backward.
// Layout: x [..., in] (any strides), W [out, in] (any strides: GPT-2's Conv1D passes a
// transposed view), A_a [r_a, in], B_a [out, r_a]; y [..., out] contiguous, a fresh
// tensor or the caller's `out` (the .out overload; common/output.h).
// Forward: the base written into y through F.linear's ATen calls (cuBLAS; with no adapter
// on, y is the frozen layer's output bit for bit), then the low-rank update of lowrank.cu:
// one shrink launch over all adapters and one expand launch adding into y in place, on the
// current stream, scales read on the device when they live there (no sync: graph-capturable).
// Backward: ATen GEMMs following reference.lora_linear_backward (training only).
// Tests: tests/test_cuda.py (lora_linear / lora_linear_backward samples, opcheck, graph
// capture). Benchmark: benchmarks/bench_cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks_cuda.h"
#include "lowrank.h"
#include "ops_cuda.h"
#include "state.h"

namespace peftcore {

using namespace peftcore::cuda;

at::Tensor lora_linear_cuda(at::Tensor* out, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,
                            const at::Tensor& scales, std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear";
  const LinearDims d = check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, lora_x);
  const c10::cuda::CUDAGuard guard(x.device());
  return write_output(op, out, rows_then(x, d.out), x, {x, weight, or_undefined(bias)}, [&](at::Tensor& y) {
    linear_into(y, x, weight, bias);
    if (lora_A.empty() || y.numel() == 0) return;
    add_lowrank(x, lora_A, lora_B, lora_x, {}, read_state(scales), y);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                          std::optional<at::TensorList> lora_x, std::array<bool, 4> output_mask) {
  const char* op = "lora_linear_backward";
  const LinearDims d = check_linear_args(op, x, weight, std::nullopt, lora_A, lora_B, scales, lora_x);
  check_on(op, grad_out, "grad_out", x.device());
  check_float_dtype(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == d.out && grad_out.numel() == d.n * d.out, "peftcore::", op,
              ": grad_out has shape ", grad_out.sizes(), " but the forward output has shape x.shape[:-1] + [", d.out,
              "] with x.shape = ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [want_x, want_w, want_b, want_ad] = output_mask;

  const auto f = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_out.reshape({-1, d.out}).to(f);
  const at::Tensor x2 = x.reshape({-1, d.in});
  // A fresh empty tensor per output not asked for: outputs of an op must not alias.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = want_x ? at::mm(g, weight.to(f)) : at::Tensor();
  at::Tensor gw = want_w ? at::mm(g.t(), x2.to(f)).to(weight.scalar_type()) : empty();
  at::Tensor gb = want_b ? g.sum(0).to(grad_out.scalar_type()) : empty();

  const State st = read_state(scales);
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
    // Device scales: every term is computed and masked where the scale reads 0 (a select,
    // so a disabled adapter's NaN never leaks into the gradients).
    const at::Tensor xa2 = lora_x.has_value() ? (*lora_x)[a].reshape({-1, d.in}).to(f) : x2.to(f);
    const at::Tensor Af = A.to(f);
    const at::Tensor gt = st.scaled(at::mm(g, B.to(f)), a);  // [n, r]: grad wrt x_a·A_aᵀ
    if (want_ad) {
      const at::Tensor t = at::mm(xa2, Af.t());
      gA.push_back(st.masked(at::mm(gt.t(), xa2), a).to(A.scalar_type()));
      gB.push_back(st.masked(st.scaled(at::mm(g.t(), t), a), a).to(B.scalar_type()));
    }
    const at::Tensor contrib = st.masked(at::mm(gt, Af), a);
    if (lora_x.has_value()) {
      const at::Tensor& xa = (*lora_x)[a];
      gxa.push_back(contrib.reshape(xa.sizes()).to(xa.scalar_type()));
    } else if (want_x) {
      gx.add_(contrib);
    }
  }
  gx = want_x ? gx.reshape(x.sizes()).to(x.scalar_type()) : empty();
  return {gx, gw, gb, gA, gB, gxa};
}

}  // namespace peftcore
