// Pieces shared by the CPU linear-layer ops (lora_linear, ia3_linear and
// the quantized lora_linear_4bit / lora_linear_int8): the checks of x / W / b / lora_x and
// the low-rank update that adds Σ_a s_a·((x_a·A_aᵀ) ⊙ e_a)·B_aᵀ to a base output already
// in y (e_a: AdaLoRA's per-rank singular values; absent, i.e. 1, for LoRA).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "lowrank.h"
#include "lowrank_parallel.h"

namespace peftcore::cpu {

struct LinearDims {
  int64_t n;    // rows: product of x's leading dims
  int64_t in;   // in_features
  int64_t out;  // out_features
};

inline int64_t leading_rows(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  return n;
}

inline void check_lora_x(const char* op, const std::optional<at::TensorList>& lora_x, const at::Tensor& x,
                         size_t n_adapters) {
  if (!lora_x.has_value()) return;
  check_same_count(op, "lora_x", lora_x->size(), "lora_A", n_adapters);
  for (size_t a = 0; a < lora_x->size(); ++a) {
    const std::string xn = indexed("lora_x", a);
    const at::Tensor& xa = (*lora_x)[a];
    check_defined(op, xa, xn);
    check_device(op, xa, xn, at::kCPU);
    check_float_dtype(op, xa, xn);
    TORCH_CHECK(xa.sizes() == x.sizes(), "peftcore::", op, ": ", xn, " has shape ", xa.sizes(), " but x has shape ",
                x.sizes(), " (each lora_x is the adapter's view of x)");
  }
}

// x [..., in] (float dtype, >= 1 dim), weight [out, in] in x's dtype (any strides),
// bias [out] in x's dtype or None: the base layer of the dense linear ops.
inline LinearDims check_base_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias) {
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
  return {leading_rows(x), in, out};
}

// The base layer plus the LoRA adapter lists (lora_linear and its backward).
inline LinearDims check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                    at::TensorList lora_B, const at::Tensor& scales,
                                    const std::optional<at::TensorList>& lora_x) {
  const LinearDims d = check_base_linear(op, x, weight, bias);
  check_adapters(op, lora_A, lora_B, scales, at::kCPU, x.scalar_type(), d.in, "x.shape[-1] (in_features)", d.out,
                 "weight.shape[0] (out_features)");
  check_lora_x(op, lora_x, x, lora_A.size());
  return d;
}

// The ops' optional lora_E on the CPU (common/checks.h): empty without it (plain LoRA).
inline at::TensorList checked_lora_E(const char* op, const std::optional<at::TensorList>& lora_E,
                                     at::TensorList lora_A, at::ScalarType x_dtype) {
  return lora_E_on(op, lora_E, lora_A, device_rule(op, at::kCPU), x_dtype);
}

// y += Σ_active s_a · ((x_a·A_aᵀ) ⊙ e_a)·B_aᵀ in acc_t, rounded once into y's dtype xt.
// lora_E: empty (LoRA), or one tensor of r_a values per adapter (AdaLoRA's E, checked
// by the caller), applied to the shrink result t (rows × r_a multiplies) rather than
// to A (r_a × in) so that A ⊙ E is never built. wt: the element type the kernels read
// A and B in: acc_t, or xt for adapters kept in x's dtype (autocast_adapter_dtype=False),
// which shrink / pack_bt widen as they read them instead of a float32 copy per call.
template <typename xt, typename acc_t, typename wt>
void add_lowrank_impl(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                      const std::optional<at::TensorList>& lora_x, const std::vector<ActiveAdapter>& active,
                      int64_t R, const LinearDims& d, at::Tensor& y, at::TensorList lora_E) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto wdt = c10::CppTypeToScalarType<wt>::value;
  const int64_t in = d.in;

  // Each adapter's input (x or its dropped-out copy) made contiguous once, and its
  // A and B in wt (no-ops for the usual fp32 adapters, and for base-dtype ones).
  const at::Tensor xc = x.contiguous();
  std::vector<at::Tensor> xs, As, Bs, Es;
  std::vector<BView<wt>> Bv;
  for (const auto& ad : active) {
    at::Tensor xa = lora_x.has_value() ? (*lora_x)[ad.index] : xc;
    if (xa.scalar_type() != x.scalar_type()) xa = xa.to(acc);  // odd lora_x dtype: widen exactly, once
    xs.push_back(xa.contiguous());
    As.push_back(lora_A[ad.index].to(wdt).contiguous());
    Bs.push_back(lora_B[ad.index].to(wdt));
    Bv.push_back({Bs.back().template const_data_ptr<wt>(), Bs.back().stride(0), Bs.back().stride(1)});
    if (!lora_E.empty()) Es.push_back(lora_E[ad.index].reshape({-1}).to(acc).contiguous());
  }

  // Shrink, on whichever thread needs the rows: t[i - i0, q] = x_a[i, p0:p1]·A_a[q - offset_a, p0:p1]
  // for the ranks q of the part that fall in adapter a.
  const auto fill_T = [&](int64_t i0, int64_t i1, const TPart& part, acc_t* t, int64_t ldt) {
    for (size_t k = 0; k < active.size(); ++k) {
      const int64_t q0 = std::max(part.q0, active[k].offset), q1 = std::min(part.q1, active[k].offset + active[k].rank);
      if (q0 >= q1) continue;
      const int64_t p0 = part.p0, width = part.p1 - part.p0, nq = q1 - q0;
      const wt* A = As[k].template const_data_ptr<wt>() + (q0 - active[k].offset) * in + p0;
      acc_t* tk = t + q0;
      bool widened = false;  // an odd-dtype lora_x, widened to acc_t (only with acc_t adapters)
      if constexpr (std::is_same_v<wt, acc_t>) {
        if (xs[k].scalar_type() != x.scalar_type()) {
          shrink(xs[k].template const_data_ptr<acc_t>() + i0 * in + p0, in, A, in, tk, ldt, i1 - i0, nq, width);
          widened = true;
        }
      }
      if (!widened)
        shrink(xs[k].template const_data_ptr<xt>() + i0 * in + p0, in, A, in, tk, ldt, i1 - i0, nq, width);
      if (!Es.empty()) {  // AdaLoRA: t[:, q] *= e[q], as reference.lora_linear rounds it
        const acc_t* e = Es[k].template const_data_ptr<acc_t>() + (q0 - active[k].offset);
        for (int64_t i = 0; i < i1 - i0; ++i) {
          acc_t* ti = tk + i * ldt;
#pragma omp simd
          for (int64_t q = 0; q < nq; ++q) ti[q] *= e[q];
        }
      }
    }
  };
  // Expand: one pass over y, adding the low-rank product to the base output in place.
  xt* yp = y.data_ptr<xt>();
  lowrank_update<acc_t, xt>(d.n, d.out, R, in, fill_T, active, Bv, yp, d.out, nullptr, yp);
}

template <typename xt, typename acc_t>
void add_lowrank_typed(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                       const std::optional<at::TensorList>& lora_x, const std::vector<ActiveAdapter>& active,
                       int64_t R, const LinearDims& d, at::Tensor& y, at::TensorList lora_E) {
  if constexpr (!std::is_same_v<xt, acc_t>) {
    // Every active adapter (and its input) in x's dtype: the kernels read them as they are.
    const auto xd = x.scalar_type();
    bool low = true;
    for (const auto& ad : active)
      low = low && lora_A[ad.index].scalar_type() == xd && lora_B[ad.index].scalar_type() == xd &&
            (!lora_x.has_value() || (*lora_x)[ad.index].scalar_type() == xd);
    if (low) return add_lowrank_impl<xt, acc_t, xt>(x, lora_A, lora_B, lora_x, active, R, d, y, lora_E);
  }
  add_lowrank_impl<xt, acc_t, acc_t>(x, lora_A, lora_B, lora_x, active, R, d, y, lora_E);
}

// y (contiguous, x's dtype, holding the base output) += the active adapters' terms.
inline void add_lowrank(const at::Tensor& x, at::TensorList lora_A, at::TensorList lora_B,
                        const std::optional<at::TensorList>& lora_x, const std::vector<ActiveAdapter>& active,
                        int64_t R, const LinearDims& d, at::Tensor& y, at::TensorList lora_E = {}) {
  const auto& E = lora_E;
  switch (x.scalar_type()) {
    case at::kFloat: add_lowrank_typed<float, float>(x, lora_A, lora_B, lora_x, active, R, d, y, E); break;
    case at::kBFloat16: add_lowrank_typed<c10::BFloat16, float>(x, lora_A, lora_B, lora_x, active, R, d, y, E); break;
    case at::kHalf: add_lowrank_typed<c10::Half, float>(x, lora_A, lora_B, lora_x, active, R, d, y, E); break;
    case at::kDouble: add_lowrank_typed<double, double>(x, lora_A, lora_B, lora_x, active, R, d, y, E); break;
    default: TORCH_CHECK(false, "peftcore: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace peftcore::cpu
