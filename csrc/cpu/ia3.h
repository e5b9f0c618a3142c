// What the (IA)³ ops share on CPU (ia3_linear.cpp, and ia3_linear_4bit / _int8 in
// quant_linear.cpp): the checks of the IA3 vectors, their product over the active
// adapters, and the one-pass feature scaling out[i, k] = round(acc(in[i, k]) · l[k])
// (loops in ia3_kernels.cpp), which serves both directions: the output columns of a
// finished base (in place; feedforward = False) and the scaled copy of x (feedforward = True).
// Numerics are PEFT's (reference.ia3_linear): l in float32 (float64 for float64 x), the
// product taken in float32 and rounded to the data's dtype once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "linear_common.h"

namespace peftcore::cpu {

// out[i·ldo + k] = round(acc(x[i·ldx + k·csx]) · l[k]) for i < rows, k < cols, on the
// calling thread. out may be x itself (ldo = ldx, csx = 1: in place).
void ia3_scale(const float* x, int64_t ldx, int64_t csx, const float* l, float* out, int64_t ldo, int64_t rows,
               int64_t cols);
void ia3_scale(const c10::BFloat16* x, int64_t ldx, int64_t csx, const float* l, c10::BFloat16* out, int64_t ldo,
               int64_t rows, int64_t cols);
void ia3_scale(const c10::Half* x, int64_t ldx, int64_t csx, const float* l, c10::Half* out, int64_t ldo,
               int64_t rows, int64_t cols);
void ia3_scale(const double* x, int64_t ldx, int64_t csx, const double* l, double* out, int64_t ldo, int64_t rows,
               int64_t cols);

// The combined vector l = Π_{a: active[a] != 0} ia3_l[a] (flattened, in adapter order) as a
// contiguous 1-D tensor of `features` values in float32 (float64 for float64 x), or an
// undefined tensor when no adapter is active (the op is then exactly its base layer).
// Checks every vector (active or not) and `active` once; `what` names what `features` is.
inline at::Tensor ia3_vector(const char* op, at::TensorList ia3_l, const at::Tensor& active, at::ScalarType x_dtype,
                             int64_t features, const char* what) {
  check_defined(op, active, "active");
  TORCH_CHECK(active.device().is_cpu(), "peftcore::", op,
              ": active must be a CPU tensor (read on the host) but is on ", active.device());
  TORCH_CHECK(at::isFloatingType(active.scalar_type()), "peftcore::", op, ": active has dtype ",
              active.scalar_type(), "; expected float32 (entry != 0: the adapter takes part)");
  TORCH_CHECK(active.dim() == 1 && active.numel() == static_cast<int64_t>(ia3_l.size()), "peftcore::", op,
              ": active has shape ", active.sizes(), " but there are ", ia3_l.size(), " IA3 vectors (expected [",
              ia3_l.size(), "])");
  check_ia3_vectors(op, ia3_l, x_dtype, features, what, device_rule(op, at::kCPU));
  const at::Tensor act = active.to(at::kFloat).contiguous();
  const float* ap = act.const_data_ptr<float>();
  std::vector<size_t> on;
  for (size_t a = 0; a < ia3_l.size(); ++a)
    if (ap[a] != 0.0f) on.push_back(a);
  if (on.empty()) return {};
  const auto acc = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  // One active adapter (the usual case): its own storage, when already in acc and contiguous.
  if (on.size() == 1) return ia3_l[on[0]].reshape({-1}).to(acc).contiguous();
  // Several: multiplied in adapter order in acc (inputs widened exactly), as PEFT's
  // `scaling *= ia3_l[a].flatten()`. Inactive vectors (NaN allowed) are never read.
  at::Tensor l = ia3_l[on[0]].reshape({-1}).to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  for (size_t k = 1; k < on.size(); ++k) l.mul_(ia3_l[on[k]].reshape({-1}));
  return l;
}

// Below this many elements per task a thread hand-off costs more than the pass saves.
constexpr int64_t kIa3Grain = 32768;

// ia3_scale over rows [0, rows), threaded over bands of rows.
template <typename T, typename acc_t>
void ia3_scale_parallel(const T* x, int64_t ldx, int64_t csx, const acc_t* l, T* out, int64_t ldo, int64_t rows,
                        int64_t cols) {
  if (rows == 0 || cols == 0) return;
  at::parallel_for(0, rows, std::max<int64_t>(1, kIa3Grain / cols), [&](int64_t i0, int64_t i1) {
    ia3_scale(x + i0 * ldx, ldx, csx, l, out + i0 * ldo, ldo, i1 - i0, cols);
  });
}

// y (contiguous, [..., N]) scaled in place over its last dim: y[..., j] = round(acc(y[..., j])·l[j]).
inline void ia3_scale_output(at::Tensor& y, const at::Tensor& l) {
  const int64_t N = y.size(-1);
  if (y.numel() == 0) return;
  const int64_t rows = y.numel() / N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "peftcore_ia3_scale_output", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    ia3_scale_parallel<scalar_t, acc_t>(yp, N, 1, l.const_data_ptr<acc_t>(), yp, N, rows, N);
  });
}

// x' = round(acc(x) ⊙ l) over the last dim, as a fresh contiguous [M, K] tensor in x's
// dtype, in one pass reading x through its strides (a copy only where reshape needs one).
inline at::Tensor ia3_scaled_rows(const at::Tensor& x, const at::Tensor& l) {
  const int64_t K = x.size(-1), M = leading_rows(x);
  const at::Tensor x2 = x.reshape({M, K});
  at::Tensor out = at::empty({M, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_ia3_scaled_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ia3_scale_parallel<scalar_t, acc_t>(x2.const_data_ptr<scalar_t>(), x2.stride(0), x2.stride(1),
                                        l.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(), K, M, K);
  });
  return out;
}

}  // namespace peftcore::cpu
