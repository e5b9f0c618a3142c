// peftcore::lora_linear on CPU: y = x·Wᵀ + b + Σ_a s_a · (x_a·A_aᵀ)·B_aᵀ, and its backward.
// Layout: x [..., in] (any strides), W [out, in] (any strides: GPT-2's Conv1D passes
// a transposed [in, out] view), A_a [r_a, in], B_a [out, r_a]; y [..., out] contiguous.
// Forward = ATen GEMM for the base + the fused low-rank shrink / expand of lowrank.h,
// threaded in one parallel region by lowrank_parallel.h's lowrank_update;
// backward = ATen GEMMs following reference.lora_linear_backward.
// Tests: tests/ops/test_lora_linear.py, test_opcheck.py, tests/test_autograd.py.
// Benchmark: benchmarks/bench_lora_linear.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/checks.h"
#include "../ops.h"
#include "lowrank.h"
#include "linear_common.h"
#include "lowrank_parallel.h"

namespace peftcore {

using cpu::check_linear_args;

at::Tensor lora_linear_cpu(at::Tensor* out, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,
                           const at::Tensor& scales, std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear";
  const cpu::LinearDims d = check_linear_args(op, x, weight, bias, lora_A, lora_B, scales, lora_x);
  return write_output(op, out, rows_then(x, d.out), x, {x, weight, or_undefined(bias)}, [&](at::Tensor& y) {
    // The base goes through F.linear's ATen calls, so with no active adapter the
    // result is bit-identical to the frozen layer.
    linear_into(y, x, weight, bias);
    int64_t R = 0;
    const auto active = cpu::active_adapters(scales, lora_A, R);
    if (active.empty() || y.numel() == 0) return;
    cpu::add_lowrank(x, lora_A, lora_B, lora_x, active, R, d, y);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                         std::optional<at::TensorList> lora_x, std::array<bool, 4> output_mask) {
  const char* op = "lora_linear_backward";
  const cpu::LinearDims d = check_linear_args(op, x, weight, std::nullopt, lora_A, lora_B, scales, lora_x);
  check_defined(op, grad_out, "grad_out");
  check_device(op, grad_out, "grad_out", at::kCPU);
  check_float_dtype(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == d.out && grad_out.numel() == d.n * d.out, "peftcore::", op,
              ": grad_out has shape ", grad_out.sizes(), " but the forward output has shape x.shape[:-1] + [", d.out,
              "] with x.shape = ", x.sizes());
  const auto [want_x, want_w, want_b, want_ad] = output_mask;

  // Training only: ATen GEMMs in the accumulation dtype, each grad cast back once.
  const auto f = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_out.reshape({-1, d.out}).to(f);
  const at::Tensor x2 = x.reshape({-1, d.in});
  // A fresh empty tensor per output not asked for: outputs of an op must not alias.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = want_x ? at::mm(g, weight.to(f)) : at::Tensor();
  at::Tensor gw = want_w ? at::mm(g.t(), x2.to(f)).to(weight.scalar_type()) : empty();
  at::Tensor gb = want_b ? g.sum(0).to(grad_out.scalar_type()) : empty();

  const std::vector<double> scale_of = cpu::scale_per_adapter(scales, lora_A);

  std::vector<at::Tensor> gA, gB, gxa;
  for (size_t a = 0; a < lora_A.size(); ++a) {
    const at::Tensor &A = lora_A[a], &B = lora_B[a];
    if (scale_of[a] == 0.0) {  // scale 0 or rank 0: the adapter took no part in the forward
      if (want_ad) {
        gA.push_back(at::zeros(A.sizes(), A.options()));
        gB.push_back(at::zeros(B.sizes(), B.options()));
      }
      if (lora_x.has_value()) gxa.push_back(at::zeros((*lora_x)[a].sizes(), (*lora_x)[a].options()));
      continue;
    }
    const double s = scale_of[a];
    const at::Tensor xa2 = lora_x.has_value() ? (*lora_x)[a].reshape({-1, d.in}).to(f) : x2.to(f);
    const at::Tensor Af = A.to(f);
    const at::Tensor gt = at::mm(g, B.to(f)).mul_(s);  // [n, r]: grad wrt x_a·A_aᵀ
    if (want_ad) {
      const at::Tensor t = at::mm(xa2, Af.t());  // [n, r]
      gA.push_back(at::mm(gt.t(), xa2).to(A.scalar_type()));
      gB.push_back(at::mm(g.t(), t).mul_(s).to(B.scalar_type()));
    }
    if (lora_x.has_value()) {
      const at::Tensor& xa = (*lora_x)[a];
      gxa.push_back(at::mm(gt, Af).reshape(xa.sizes()).to(xa.scalar_type()));
    } else if (want_x) {
      gx.addmm_(gt, Af);
    }
  }
  gx = want_x ? gx.reshape(x.sizes()).to(x.scalar_type()) : empty();
  return {gx, gw, gb, gA, gB, gxa};
}

}  // namespace peftcore
