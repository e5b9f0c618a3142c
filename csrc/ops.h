// Every native entry point of peftcore, listed once for every device. The schemas live
// in peftcore/_ops.py; these signatures must match them argument for argument (the
// dispatcher checks at load time). The CPU kernels are declared here and registered in
// cpu/register.cpp; cuda/ops_cuda.h and cuda/register.cu use the same lists.
//
// Forward ops, X(name, (arguments)): each has the functional op and its `.out` overload
// (`name.out(arguments, *, Tensor(a!) out) -> ()`), both served by one entry point
//   at::Tensor name_<device>(const Out* out, arguments)    (common/output.h)
// Other ops, X(return type, name, (arguments)): the backward ops and the dequantizers.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/output.h"

#define PEFTCORE_UNPAREN(...) __VA_ARGS__

// The arguments of bitsandbytes' 4-bit weight (formats: peftcore/reference.py dequantize_4bit).
#define PEFTCORE_WEIGHT4_ARGS                                                                                          \
  const at::Tensor &qweight, const at::Tensor &absmax, const at::Tensor &code, int64_t blocksize,                      \
      const std::optional<at::Tensor> &nested_absmax, const std::optional<at::Tensor> &nested_code,                 \
      const std::optional<at::Tensor> &nested_offset, int64_t nested_blocksize, int64_t out_features

// The op table (peftcore/_ops.py OPS) in C++: the linear family is x, a base kind's weight
// arguments (BASES), the bias, then a method's arguments (METHODS).
#define PEFTCORE_WEIGHT_ARGS const at::Tensor &weight
#define PEFTCORE_WEIGHT_INT8_ARGS const at::Tensor &weight, const at::Tensor &row_scale
#define PEFTCORE_LINEAR_ARGS(WEIGHT) const at::Tensor &x, WEIGHT, const std::optional<at::Tensor> &bias
// The LoRA family's adapters with their optional per-adapter extras (lora_E: AdaLoRA's E).
#define PEFTCORE_LORA_ARGS                                                                                             \
  at::TensorList lora_A, at::TensorList lora_B, std::optional<at::TensorList> lora_E, const at::Tensor &scales
// IA3's vectors; `select` is the single op's active mask or the mixed op's rows.
#define PEFTCORE_IA3_ARGS(select) at::TensorList ia3_l, select, bool feedforward

#define PEFTCORE_FORWARD_OPS(X)                                                                                        \
  /* lora_linear: y = x·Wᵀ + b + Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ, E_a = 1 without lora_E (AdaLoRA's singular        \
     values) */                                                                                                        \
  X(lora_linear, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_LORA_ARGS,                                      \
                  std::optional<at::TensorList> lora_x))                                                               \
  /* lora_linear_4bit / _int8: lora_linear over an nf4 / fp4 W (+ double quantization), over W = CB·SCB/127 */         \
  X(lora_linear_4bit, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_LORA_ARGS,                                \
                       std::optional<at::TensorList> lora_x))                                                          \
  X(lora_linear_int8, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS), PEFTCORE_LORA_ARGS,                            \
                       std::optional<at::TensorList> lora_x))                                                          \
  /* Mixed batches: row group g of x uses adapter slot rows[g] alone (-1 = base); inference only. On a 4-bit base,     \
     lora_x (when given) is what the LoRA terms read. */                                                               \
  X(lora_linear_mixed, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_LORA_ARGS, const at::Tensor& rows))       \
  X(lora_linear_4bit_mixed, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_LORA_ARGS, const at::Tensor& rows,  \
                             const std::optional<at::Tensor>& lora_x))                                                 \
  X(lora_linear_int8_mixed, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS), PEFTCORE_LORA_ARGS,                      \
                             const at::Tensor& rows))                                                                  \
  /* ia3_linear: y = round(float(x·Wᵀ + b) ⊙ l), or (feedforward) round(float(x) ⊙ l)·Wᵀ + b, l = Π_{active a}         \
     ia3_l[a]; the _mixed forms: one vector per row group */                                                           \
  X(ia3_linear, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_IA3_ARGS(const at::Tensor& active)))             \
  X(ia3_linear_4bit, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_IA3_ARGS(const at::Tensor& active)))       \
  X(ia3_linear_int8, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS), PEFTCORE_IA3_ARGS(const at::Tensor& active)))   \
  X(ia3_linear_mixed, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_ARGS), PEFTCORE_IA3_ARGS(const at::Tensor& rows)))         \
  X(ia3_linear_4bit_mixed, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_IA3_ARGS(const at::Tensor& rows)))   \
  X(ia3_linear_int8_mixed, (PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS),                                           \
                            PEFTCORE_IA3_ARGS(const at::Tensor& rows)))                                                \
  /* lora_embedding: y = W[idx] + Σ_a s_a · A_aᵀ[idx]·B_aᵀ */                                                          \
  X(lora_embedding, (const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,                       \
                     at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx))

namespace peftcore {
// (grad_x, grad_weight, grad_bias, grad_lora_A[], grad_lora_B[], grad_lora_x[])
using LinearGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                               std::vector<at::Tensor>>;
// (grad_weight, grad_lora_A[], grad_lora_B[])
using EmbeddingGrads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;
}  // namespace peftcore

#define PEFTCORE_OTHER_OPS(X)                                                                                    \
  X(LinearGrads, lora_linear_backward,                                                                           \
    (const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::TensorList lora_A,           \
     at::TensorList lora_B, const at::Tensor& scales, std::optional<at::TensorList> lora_x,                      \
     std::array<bool, 4> output_mask))                                                                           \
  X(EmbeddingGrads, lora_embedding_backward,                                                                     \
    (const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,     \
     at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx, std::array<bool, 2> output_mask))     \
  /* W of the 4-bit / int8 ops as a dense [out, in] tensor of `dtype` */                                         \
  X(at::Tensor, dequantize_4bit, (PEFTCORE_WEIGHT4_ARGS, int64_t in_features, at::ScalarType dtype))             \
  X(at::Tensor, dequantize_int8, (const at::Tensor& weight, const at::Tensor& row_scale, at::ScalarType dtype))

// Declarations and registrations of one device's entry points (`suffix`: cpu, cuda).
#define PEFTCORE_DECLARE(suffix)                                                               \
  PEFTCORE_FORWARD_OPS(PEFTCORE_DECLARE_FORWARD_##suffix)                                      \
  PEFTCORE_OTHER_OPS(PEFTCORE_DECLARE_OTHER_##suffix)
#define PEFTCORE_DECLARE_FORWARD_cpu(name, args) at::Tensor name##_cpu(const Out* out, PEFTCORE_UNPAREN args);
#define PEFTCORE_DECLARE_OTHER_cpu(ret, name, args) ret name##_cpu args;
#define PEFTCORE_DECLARE_FORWARD_cuda(name, args) at::Tensor name##_cuda(const Out* out, PEFTCORE_UNPAREN args);
#define PEFTCORE_DECLARE_OTHER_cuda(ret, name, args) ret name##_cuda args;

// Inside TORCH_LIBRARY_IMPL(peftcore, <KEY>, m).
#define PEFTCORE_REGISTER(suffix)                                                              \
  PEFTCORE_FORWARD_OPS(PEFTCORE_REGISTER_FORWARD_##suffix)                                     \
  PEFTCORE_OTHER_OPS(PEFTCORE_REGISTER_OTHER_##suffix)
#define PEFTCORE_REGISTER_FORWARD_cpu(name, args)                        \
  m.impl(#name, &peftcore::Forward<&peftcore::name##_cpu>::functional); \
  m.impl(#name ".out", &peftcore::Forward<&peftcore::name##_cpu>::out);
#define PEFTCORE_REGISTER_OTHER_cpu(ret, name, args) m.impl(#name, &peftcore::name##_cpu);
#define PEFTCORE_REGISTER_FORWARD_cuda(name, args)                        \
  m.impl(#name, &peftcore::Forward<&peftcore::name##_cuda>::functional); \
  m.impl(#name ".out", &peftcore::Forward<&peftcore::name##_cuda>::out);
#define PEFTCORE_REGISTER_OTHER_cuda(ret, name, args) m.impl(#name, &peftcore::name##_cuda);

namespace peftcore {
PEFTCORE_DECLARE(cpu)
}  // namespace peftcore
