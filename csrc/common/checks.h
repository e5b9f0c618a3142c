// Boundary checks shared by every peftcore kernel.
//
// Each op validates its arguments once, at entry, through these helpers; the
// kernels behind them assume the checks passed. Messages name the op and the
// tensor (e.g. "lora_A[2]") and print the offending values, so a user who
// passes a mis-shaped adapter sees what went wrong without a debugger.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace peftcore {

// "lora_A" + 2 -> "lora_A[2]"
inline std::string indexed(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

inline std::string dtypes_str(std::initializer_list<at::ScalarType> allowed) {
  std::ostringstream os;
  bool first = true;
  for (auto t : allowed) {
    os << (first ? "" : ", ") << t;
    first = false;
  }
  return os.str();
}

inline void check_defined(const char* op, const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.defined(), "peftcore::", op, ": ", name, " is an undefined tensor");
}

inline void check_device(const char* op, const at::Tensor& t, const std::string& name, at::DeviceType dev) {
  TORCH_CHECK(t.device().type() == dev, "peftcore::", op, ": ", name, " is on ", t.device(), " but this kernel runs on ",
              at::Device(dev), " (all tensors of one call must share a device)");
}

inline void check_dim(const char* op, const at::Tensor& t, const std::string& name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "peftcore::", op, ": ", name, " must be ", dim, "-D but has shape ", t.sizes());
}

inline void check_dtype_in(const char* op, const at::Tensor& t, const std::string& name,
                           std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed)
    if (t.scalar_type() == d) return;
  TORCH_CHECK(false, "peftcore::", op, ": ", name, " has dtype ", t.scalar_type(), "; expected one of {",
              dtypes_str(allowed), "}");
}

inline void check_size(const char* op, const at::Tensor& t, const std::string& name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "peftcore::", op, ": ", name, " has shape ", t.sizes(), " but its dim ", dim,
              " must equal ", what, " = ", expected);
}

// The compute dtypes every kernel supports for activations / frozen weights.
inline void check_float_dtype(const char* op, const at::Tensor& t, const std::string& name) {
  check_dtype_in(op, t, name, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
}

// Adapter weights may be float32 (PEFT's autocast_adapter_dtype default) or the
// base model's dtype.
inline void check_adapter_dtype(const char* op, const at::Tensor& t, const std::string& name, at::ScalarType base) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == base, "peftcore::", op, ": ", name, " has dtype ",
              t.scalar_type(), "; adapter weights must be float32 or the base dtype ", base);
}

// scales: one float per adapter, read on the host.
inline void check_scales(const char* op, const at::Tensor& scales, size_t n_adapters) {
  check_defined(op, scales, "scales");
  TORCH_CHECK(scales.device().is_cpu(), "peftcore::", op, ": scales must be a CPU tensor (read on the host) but is on ",
              scales.device());
  TORCH_CHECK(at::isFloatingType(scales.scalar_type()), "peftcore::", op, ": scales has dtype ", scales.scalar_type(),
              "; expected float32");
  TORCH_CHECK(scales.dim() == 1 && scales.numel() == static_cast<int64_t>(n_adapters), "peftcore::", op,
              ": scales has shape ", scales.sizes(), " but there are ", n_adapters, " adapters (expected [",
              n_adapters, "])");
}

inline void check_same_count(const char* op, const char* a, size_t na, const char* b, size_t nb) {
  TORCH_CHECK(na == nb, "peftcore::", op, ": ", a, " has ", na, " tensors but ", b, " has ", nb,
              " (one per adapter each)");
}

// The adapter lists of every LoRA op: lora_A[a] is [r_a, a_cols], lora_B[a] is
// [b_rows, r_a], float32 or the base dtype. `on_device(t, name)` checks each tensor's
// device: the rule is the backend's (the CPU kernels' below, cuda/checks_cuda.h's).
template <class OnDevice>
inline void check_adapter_lists(const char* op, at::TensorList lora_A, at::TensorList lora_B, OnDevice&& on_device,
                                at::ScalarType base, int64_t a_cols, const char* a_cols_what, int64_t b_rows,
                                const char* b_rows_what) {
  check_same_count(op, "lora_A", lora_A.size(), "lora_B", lora_B.size());
  for (size_t a = 0; a < lora_A.size(); ++a) {
    const std::string an = indexed("lora_A", a), bn = indexed("lora_B", a);
    const at::Tensor &A = lora_A[a], &B = lora_B[a];
    check_defined(op, A, an);
    check_defined(op, B, bn);
    on_device(A, an);
    on_device(B, bn);
    check_dim(op, A, an, 2);
    check_dim(op, B, bn, 2);
    check_size(op, A, an, 1, a_cols, a_cols_what);
    check_size(op, B, bn, 0, b_rows, b_rows_what);
    TORCH_CHECK(B.size(1) == A.size(0), "peftcore::", op, ": ", bn, " has shape ", B.sizes(), " but ", an,
                " has shape ", A.sizes(), " (expected ", bn, " = [", b_rows, ", ", A.size(0), "])");
    check_adapter_dtype(op, A, an, base);
    check_adapter_dtype(op, B, bn, base);
  }
}

// The adapter lists on `dev` with one host-read scale per adapter (the CPU kernels).
inline void check_adapters(const char* op, at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                           at::DeviceType dev, at::ScalarType base, int64_t a_cols, const char* a_cols_what,
                           int64_t b_rows, const char* b_rows_what) {
  check_same_count(op, "lora_A", lora_A.size(), "lora_B", lora_B.size());
  check_scales(op, scales, lora_A.size());
  check_adapter_lists(
      op, lora_A, lora_B, [&](const at::Tensor& t, const std::string& name) { check_device(op, t, name, dev); },
      base, a_cols, a_cols_what, b_rows, b_rows_what);
}

}  // namespace peftcore
