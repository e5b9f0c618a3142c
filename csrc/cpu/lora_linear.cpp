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
#include "lowrank_parallel.h"

namespace peftcore {
namespace {

struct LinearDims {
  int64_t n;    // rows: product of x's leading dims
  int64_t in;   // in_features
  int64_t out;  // out_features
};

// All checks of the forward and backward, done once at the boundary.
LinearDims check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,
                             const at::Tensor& scales, const std::optional<at::TensorList>& lora_x) {
  const auto cpu = at::kCPU;
  check_defined(op, x, "x");
  check_defined(op, weight, "weight");
  check_device(op, x, "x", cpu);
  check_device(op, weight, "weight", cpu);
  check_float_dtype(op, x, "x");
  TORCH_CHECK(x.dim() >= 1, "peftcore::", op, ": x must have at least 1 dim (features last) but has shape ", x.sizes());
  check_dim(op, weight, "weight", 2);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "peftcore::", op, ": weight has dtype ", weight.scalar_type(),
              " but x has dtype ", x.scalar_type(), " (the base layer runs in x's dtype; they must match)");
  const int64_t in = x.size(-1), out = weight.size(0);
  check_size(op, weight, "weight", 1, in, "x.shape[-1] (in_features)");
  if (bias.has_value() && bias->defined()) {
    check_device(op, *bias, "bias", cpu);
    check_dim(op, *bias, "bias", 1);
    check_size(op, *bias, "bias", 0, out, "weight.shape[0] (out_features)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "peftcore::", op, ": bias has dtype ", bias->scalar_type(),
                " but x has dtype ", x.scalar_type());
  }
  check_adapters(op, lora_A, lora_B, scales, cpu, x.scalar_type(), in, "x.shape[-1] (in_features)", out,
                 "weight.shape[0] (out_features)");
  if (lora_x.has_value()) {
    check_same_count(op, "lora_x", lora_x->size(), "lora_A", lora_A.size());
    for (size_t a = 0; a < lora_x->size(); ++a) {
      const std::string xn = indexed("lora_x", a);
      const at::Tensor& xa = (*lora_x)[a];
      check_defined(op, xa, xn);
      check_device(op, xa, xn, cpu);
      check_float_dtype(op, xa, xn);
      TORCH_CHECK(xa.sizes() == x.sizes(), "peftcore::", op, ": ", xn, " has shape ", xa.sizes(),
                  " but x has shape ", x.sizes(), " (each lora_x is the adapter's view of x)");
    }
  }
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  return {n, in, out};
}

// y += Σ_active s_a · (x_a·A_aᵀ)·B_aᵀ in acc_t, rounded once into y's dtype xt.
template <typename xt, typename acc_t>
void add_lowrank(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                 const std::optional<at::TensorList>& lora_x, const std::vector<cpu::ActiveAdapter>& active,
                 int64_t R, const LinearDims& d, at::Tensor& y) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t in = d.in;

  // Each adapter's input (x or its dropped-out copy) made contiguous once, and its
  // A and B in the accumulation dtype (no-ops for the usual fp32 adapters).
  const at::Tensor xc = x.contiguous();
  std::vector<at::Tensor> xs, As, Bs;
  std::vector<cpu::BView<acc_t>> Bv;
  for (const auto& ad : active) {
    at::Tensor xa = lora_x.has_value() ? (*lora_x)[ad.index] : xc;
    if (xa.scalar_type() != x.scalar_type()) xa = xa.to(acc);  // odd lora_x dtype: widen exactly, once
    xs.push_back(xa.contiguous());
    As.push_back(lora_A[ad.index].to(acc).contiguous());
    Bs.push_back(lora_B[ad.index].to(acc));
    Bv.push_back({Bs.back().template const_data_ptr<acc_t>(), Bs.back().stride(0), Bs.back().stride(1)});
  }

  // Shrink, on whichever thread needs the rows: t[i - i0, offset_a + q] = x_a[i]·A_a[q].
  const auto fill_T = [&](int64_t i0, int64_t i1, acc_t* t, int64_t ldt) {
    for (size_t k = 0; k < active.size(); ++k) {
      const acc_t* A = As[k].template const_data_ptr<acc_t>();
      acc_t* tk = t + active[k].offset;
      if (xs[k].scalar_type() == x.scalar_type())
        cpu::shrink(xs[k].template const_data_ptr<xt>() + i0 * in, in, A, in, tk, ldt, i1 - i0, active[k].rank, in);
      else
        cpu::shrink(xs[k].template const_data_ptr<acc_t>() + i0 * in, in, A, in, tk, ldt, i1 - i0, active[k].rank, in);
    }
  };
  // Expand: one pass over y, adding the low-rank product to the base output in place.
  xt* yp = y.data_ptr<xt>();
  cpu::lowrank_update<acc_t, xt>(d.n, d.out, R, R * in, fill_T, active, Bv, yp, d.out, nullptr, yp);
}

}  // namespace

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                           std::optional<at::TensorList> lora_x) {
  const LinearDims d = check_linear_args("lora_linear", x, weight, bias, lora_A, lora_B, scales, lora_x);
  // The base goes through the same ATen call as F.linear, so with no active adapter
  // the result is bit-identical to the frozen layer.
  at::Tensor y = at::linear(x, weight, bias);
  int64_t R = 0;
  const auto active = cpu::active_adapters(scales, lora_A, R);
  if (active.empty() || y.numel() == 0) return y;
  if (!y.is_contiguous()) y = y.contiguous();
  switch (x.scalar_type()) {
    case at::kFloat: add_lowrank<float, float>(x, lora_A, lora_B, lora_x, active, R, d, y); break;
    case at::kBFloat16: add_lowrank<c10::BFloat16, float>(x, lora_A, lora_B, lora_x, active, R, d, y); break;
    case at::kHalf: add_lowrank<c10::Half, float>(x, lora_A, lora_B, lora_x, active, R, d, y); break;
    case at::kDouble: add_lowrank<double, double>(x, lora_A, lora_B, lora_x, active, R, d, y); break;
    default: TORCH_CHECK(false, "peftcore::lora_linear: unsupported dtype ", x.scalar_type());
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                         std::optional<at::TensorList> lora_x, std::array<bool, 4> output_mask) {
  const char* op = "lora_linear_backward";
  const LinearDims d = check_linear_args(op, x, weight, std::nullopt, lora_A, lora_B, scales, lora_x);
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
