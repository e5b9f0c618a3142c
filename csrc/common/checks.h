// Boundary checks shared by every peftcore kernel.
//
// Each op validates its arguments once, at entry, through these helpers; the
// kernels behind them assume the checks passed. Messages name the op and the
// tensor (e.g. "lora_A[2]") and print the offending values, so a user who
// passes a mis-shaped adapter sees what went wrong without a debugger.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

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

// The device rule of the CPU kernels for the templated checks below: t on `dev`.
inline auto device_rule(const char* op, at::DeviceType dev) {
  return [op, dev](const at::Tensor& t, const std::string& name) { check_device(op, t, name, dev); };
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

// The LoRA ops' optional lora_E (AdaLoRA's singular values): r_a values per adapter,
// float32 or the base dtype, each on the backend's device. Returns the list, empty
// without it (plain LoRA).
template <class OnDevice>
inline at::TensorList lora_E_on(const char* op, const std::optional<at::TensorList>& lora_E, at::TensorList lora_A,
                                OnDevice&& on_device, at::ScalarType base) {
  if (!lora_E.has_value()) return {};
  check_same_count(op, "lora_E", lora_E->size(), "lora_A", lora_A.size());
  for (size_t a = 0; a < lora_E->size(); ++a) {
    const std::string en = indexed("lora_E", a);
    const at::Tensor& E = (*lora_E)[a];
    check_defined(op, E, en);
    on_device(E, en);
    check_adapter_dtype(op, E, en, base);
    TORCH_CHECK(E.numel() == lora_A[a].size(0), "peftcore::", op, ": ", en, " has shape ", E.sizes(),
                " but must hold one value per rank of lora_A[", a, "] (shape ", lora_A[a].sizes(), "; PEFT stores [",
                lora_A[a].size(0), ", 1])");
  }
  return *lora_E;
}

// The adapter lists on `dev` with one host-read scale per adapter (the CPU kernels).
inline void check_adapters(const char* op, at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                           at::DeviceType dev, at::ScalarType base, int64_t a_cols, const char* a_cols_what,
                           int64_t b_rows, const char* b_rows_what) {
  check_same_count(op, "lora_A", lora_A.size(), "lora_B", lora_B.size());
  check_scales(op, scales, lora_A.size());
  check_adapter_lists(op, lora_A, lora_B, device_rule(op, dev), base, a_cols, a_cols_what, b_rows, b_rows_what);
}

// bitsandbytes' 4-bit weight state for a [N, K] weight (formats: peftcore/reference.py):
// packed bytes, per-block absmax (float, or uint8 codes with the nested statistics of
// double quantization), the 16-value code. `on_device(t, name)` is the backend's device
// rule. The backends then take their pointers from the checked tensors.
template <class OnDevice>
inline void check_weight4_state(const char* op, const at::Tensor& qweight, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize, int64_t N,
                                int64_t K, OnDevice&& on_device) {
  check_defined(op, qweight, "qweight");
  on_device(qweight, "qweight");
  TORCH_CHECK(N >= 0 && K >= 0, "peftcore::", op, ": out_features (", N, ") and in_features (", K,
              ") must be >= 0");
  TORCH_CHECK(blocksize > 0, "peftcore::", op, ": blocksize must be positive but is ", blocksize);
  TORCH_CHECK(qweight.is_contiguous(), "peftcore::", op, ": qweight must be contiguous (bitsandbytes' packed bytes)");
  const int64_t bytes = qweight.numel() * qweight.element_size();
  TORCH_CHECK(bytes == (N * K + 1) / 2, "peftcore::", op, ": qweight holds ", bytes, " bytes but a [", N, ", ", K,
              "] 4-bit weight needs ", (N * K + 1) / 2, " (shape ", qweight.sizes(), ", dtype ", qweight.scalar_type(),
              ")");
  check_defined(op, code, "code");
  on_device(code, "code");
  check_float_dtype(op, code, "code");
  TORCH_CHECK(code.numel() == 16, "peftcore::", op, ": code must hold the 16 values of the 4-bit codes but has shape ",
              code.sizes());
  const int64_t n_blocks = (N * K + blocksize - 1) / blocksize;
  check_defined(op, absmax, "absmax");
  on_device(absmax, "absmax");
  TORCH_CHECK(absmax.numel() == n_blocks, "peftcore::", op, ": absmax has ", absmax.numel(), " values but a [", N,
              ", ", K, "] weight in blocks of ", blocksize, " has ", n_blocks, " blocks");
  if (!(nested_absmax.has_value() && nested_absmax->defined())) {
    check_float_dtype(op, absmax, "absmax");
    return;
  }
  TORCH_CHECK(absmax.scalar_type() == at::kByte, "peftcore::", op,
              ": with nested_absmax (double quantization) absmax must hold uint8 codes but has dtype ",
              absmax.scalar_type());
  TORCH_CHECK(nested_code.has_value() && nested_code->defined() && nested_code->numel() == 256, "peftcore::", op,
              ": double quantization needs nested_code with 256 values");
  TORCH_CHECK(nested_offset.has_value() && nested_offset->defined() && nested_offset->numel() == 1, "peftcore::", op,
              ": double quantization needs nested_offset with 1 value");
  TORCH_CHECK(nested_blocksize > 0, "peftcore::", op, ": nested_blocksize must be positive but is ", nested_blocksize);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*nested_absmax, "nested_absmax"},
                                {*nested_code, "nested_code"},
                                {*nested_offset, "nested_offset"}}) {
    on_device(t, name);
    check_float_dtype(op, t, name);
  }
  const int64_t n2 = (n_blocks + nested_blocksize - 1) / nested_blocksize;
  TORCH_CHECK(nested_absmax->numel() == n2, "peftcore::", op, ": nested_absmax has ", nested_absmax->numel(),
              " values but ", n_blocks, " absmax codes in blocks of ", nested_blocksize, " need ", n2);
}

// bitsandbytes' LLM.int8 weight state: CB int8 [N, K], SCB (row_scale) N floats.
template <class OnDevice>
inline void check_int8_state(const char* op, const at::Tensor& weight, const at::Tensor& row_scale,
                             OnDevice&& on_device) {
  check_defined(op, weight, "weight");
  on_device(weight, "weight");
  check_dim(op, weight, "weight", 2);
  TORCH_CHECK(weight.scalar_type() == at::kChar, "peftcore::", op,
              ": weight must be bitsandbytes' int8 CB but has dtype ", weight.scalar_type());
  check_defined(op, row_scale, "row_scale");
  on_device(row_scale, "row_scale");
  check_float_dtype(op, row_scale, "row_scale");
  TORCH_CHECK(row_scale.numel() == weight.size(0), "peftcore::", op, ": row_scale (SCB) has ", row_scale.numel(),
              " values but weight has ", weight.size(0), " rows");
}

// Every IA3 vector: defined, on the backend's device (`on_device`), float32 or x's dtype,
// `features` values (`what` names them in the message).
template <class OnDevice>
inline void check_ia3_vectors(const char* op, at::TensorList ia3_l, at::ScalarType x_dtype, int64_t features,
                              const char* what, OnDevice&& on_device) {
  for (size_t a = 0; a < ia3_l.size(); ++a) {
    const std::string n = indexed("ia3_l", a);
    const at::Tensor& v = ia3_l[a];
    check_defined(op, v, n);
    on_device(v, n);
    check_adapter_dtype(op, v, n, x_dtype);
    TORCH_CHECK(v.numel() == features, "peftcore::", op, ": ", n, " has shape ", v.sizes(), " (", v.numel(),
                " values) but must hold one value per ", what, " = ", features,
                " (PEFT stores (out_features, 1), or (1, in_features) for feedforward layers)");
  }
}

// The mixed-batch row index: int32 / int64 [G], G >= 1 dividing the M token rows into
// equal groups; `on_device(rows)` is the backend's placement rule.
template <class OnDevice>
inline void check_rows_shape(const char* op, const at::Tensor& rows, int64_t M, OnDevice&& on_device) {
  check_defined(op, rows, "rows");
  on_device(rows);
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, "peftcore::", op,
              ": rows has dtype ", rows.scalar_type(), "; expected int64 (one adapter slot per row group, -1 = base)");
  TORCH_CHECK(rows.dim() == 1 && rows.numel() >= 1, "peftcore::", op,
              ": rows must be 1-D with at least one entry but has shape ", rows.sizes());
  const int64_t G = rows.numel();
  TORCH_CHECK(M % G == 0, "peftcore::", op, ": x has ", M, " rows (the product of its leading dims) but rows holds ",
              G, " adapter indices; the rows must split into ", G,
              " equal groups of consecutive rows (one per batch row, with its beams / return sequences)");
}

// Host values of the row index (G int64 at rp): each -1 (the base) or a slot < n_slots.
inline void check_row_slots(const char* op, const int64_t* rp, int64_t G, int64_t n_slots) {
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(rp[g] >= -1 && rp[g] < n_slots, "peftcore::", op, ": rows[", g, "] = ", rp[g],
                " is not an adapter slot (expected -1 for the base or 0..", n_slots - 1, ": there are ", n_slots,
                " adapters)");
}

}  // namespace peftcore
