// Boundary checks of the CUDA kernels: common/checks.h's helpers, plus what differs on
// the GPU. Every tensor of a call must sit on x's CUDA device, except the per-layer state
// vectors (`scales` of the LoRA ops, `active` of the IA3 ops): those move with the model,
// so they are read on the device (no host sync, CUDA-graph safe) when they are CUDA
// tensors, and on the host when they are CPU tensors; both are accepted.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "../common/checks.h"

namespace peftcore::cuda {

// t lives on exactly `dev` (type and index: one GPU per call).
inline void check_on(const char* op, const at::Tensor& t, const std::string& name, const at::Device& dev) {
  check_defined(op, t, name);
  TORCH_CHECK(t.device() == dev, "peftcore::", op, ": ", name, " is on ", t.device(), " but this call runs on ", dev,
              " (all tensors of one call must share a device)");
}

// check_on as the device rule of common/checks.h's templated checks.
inline auto device_rule(const char* op, const at::Device& dev) {
  return [op, dev](const at::Tensor& t, const std::string& name) { check_on(op, t, name, dev); };
}

// A per-adapter state vector (scales / active): float, [n], on the CPU or on `dev`.
inline void check_state(const char* op, const at::Tensor& t, const char* name, size_t n, const at::Device& dev) {
  check_defined(op, t, name);
  TORCH_CHECK(t.device().is_cpu() || t.device() == dev, "peftcore::", op, ": ", name, " is on ", t.device(),
              " but must be on the CPU or on ", dev, " (the model's device)");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "peftcore::", op, ": ", name, " has dtype ", t.scalar_type(),
              "; expected float32");
  TORCH_CHECK(t.dim() == 1 && t.numel() == static_cast<int64_t>(n), "peftcore::", op, ": ", name, " has shape ",
              t.sizes(), " but there are ", n, " adapters (expected [", n, "])");
}

// common/checks.h's check_adapters with this file's device rules: the adapters on `dev`,
// `scales` on the CPU or on `dev`.
inline void check_adapters(const char* op, at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                           const at::Device& dev, at::ScalarType base, int64_t a_cols, const char* a_cols_what,
                           int64_t b_rows, const char* b_rows_what) {
  check_same_count(op, "lora_A", lora_A.size(), "lora_B", lora_B.size());
  check_state(op, scales, "scales", lora_A.size(), dev);
  check_adapter_lists(op, lora_A, lora_B, device_rule(op, dev), base, a_cols, a_cols_what, b_rows, b_rows_what);
}

inline int64_t leading_rows(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  return n;
}

struct LinearDims {
  int64_t n;    // rows: product of x's leading dims
  int64_t in;   // in_features
  int64_t out;  // out_features
};

// x [..., in] on a CUDA device (float dtype, >= 1 dim); bias [out] on x's device.
inline void check_x(const char* op, const at::Tensor& x) {
  check_defined(op, x, "x");
  TORCH_CHECK(x.is_cuda(), "peftcore::", op, ": x is on ", x.device(), " but this kernel runs on CUDA");
  check_float_dtype(op, x, "x");
  TORCH_CHECK(x.dim() >= 1, "peftcore::", op, ": x must have at least 1 dim (features last) but has shape ", x.sizes());
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Device& dev, int64_t out,
                       const char* out_what) {
  if (!bias.has_value() || !bias->defined()) return;
  check_on(op, *bias, "bias", dev);
  check_float_dtype(op, *bias, "bias");
  check_dim(op, *bias, "bias", 1);
  check_size(op, *bias, "bias", 0, out, out_what);
}

// The dense base layer: weight [out, in] in x's dtype (any strides), bias in x's dtype.
inline LinearDims check_base_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias) {
  check_x(op, x);
  check_on(op, weight, "weight", x.device());
  check_dim(op, weight, "weight", 2);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "peftcore::", op, ": weight has dtype ", weight.scalar_type(),
              " but x has dtype ", x.scalar_type(), " (the base layer runs in x's dtype; they must match)");
  const int64_t in = x.size(-1), out = weight.size(0);
  check_size(op, weight, "weight", 1, in, "x.shape[-1] (in_features)");
  check_bias(op, bias, x.device(), out, "weight.shape[0] (out_features)");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "peftcore::", op, ": bias has dtype ", bias->scalar_type(),
                " but x has dtype ", x.scalar_type());
  return {leading_rows(x), in, out};
}

inline void check_lora_x(const char* op, const std::optional<at::TensorList>& lora_x, const at::Tensor& x,
                         size_t n_adapters) {
  if (!lora_x.has_value()) return;
  check_same_count(op, "lora_x", lora_x->size(), "lora_A", n_adapters);
  for (size_t a = 0; a < lora_x->size(); ++a) {
    const std::string xn = indexed("lora_x", a);
    const at::Tensor& xa = (*lora_x)[a];
    check_on(op, xa, xn, x.device());
    check_float_dtype(op, xa, xn);
    TORCH_CHECK(xa.sizes() == x.sizes(), "peftcore::", op, ": ", xn, " has shape ", xa.sizes(), " but x has shape ",
                x.sizes(), " (each lora_x is the adapter's view of x)");
  }
}

inline LinearDims check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                    at::TensorList lora_B, const at::Tensor& scales,
                                    const std::optional<at::TensorList>& lora_x) {
  const LinearDims d = check_base_linear(op, x, weight, bias);
  check_adapters(op, lora_A, lora_B, scales, x.device(), x.scalar_type(), d.in, "x.shape[-1] (in_features)", d.out,
                 "weight.shape[0] (out_features)");
  check_lora_x(op, lora_x, x, lora_A.size());
  return d;
}

// The ops' optional lora_E on `dev` (common/checks.h): empty without it (plain LoRA).
inline at::TensorList checked_lora_E(const char* op, const std::optional<at::TensorList>& lora_E,
                                     at::TensorList lora_A, const at::Device& dev, at::ScalarType x_dtype) {
  return lora_E_on(op, lora_E, lora_A, device_rule(op, dev), x_dtype);
}

}  // namespace peftcore::cuda
