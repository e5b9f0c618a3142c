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

// The arguments of bitsandbytes' 4-bit weight (formats: peftcore/reference.py).
#define PEFTCORE_WEIGHT4_ARGS                                                                                   \
  const at::Tensor &qweight, const at::Tensor &absmax, const at::Tensor &code, int64_t blocksize,              \
      const std::optional<at::Tensor> &nested_absmax, const std::optional<at::Tensor> &nested_code,            \
      const std::optional<at::Tensor> &nested_offset, int64_t nested_blocksize, int64_t out_features

#define PEFTCORE_FORWARD_OPS(X)                                                                                  \
  /* lora_linear: y = x·Wᵀ + b + Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ, E_a = 1 without lora_E (AdaLoRA's         \
     singular values); every LoRA-family op below takes the same optional lora_E */                              \
  X(lora_linear, (const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,          \
                  at::TensorList lora_A, at::TensorList lora_B, std::optional<at::TensorList> lora_E,            \
                  const at::Tensor& scales, std::optional<at::TensorList> lora_x))                               \
  /* ia3_linear: y = round(float(x·Wᵀ + b) ⊙ l), or (feedforward) round(float(x) ⊙ l)·Wᵀ + b,                   \
     l = Π_{active a} ia3_l[a] */                                                                                \
  X(ia3_linear, (const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,           \
                 at::TensorList ia3_l, const at::Tensor& active, bool feedforward))                              \
  /* lora_embedding: y = W[idx] + Σ_a s_a · A_aᵀ[idx]·B_aᵀ */                                                    \
  X(lora_embedding, (const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,                 \
                     at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx))                      \
  /* lora_linear_4bit: lora_linear over an nf4 / fp4 W (+ double quantization) */                                \
  X(lora_linear_4bit, (const at::Tensor& x, PEFTCORE_WEIGHT4_ARGS, const std::optional<at::Tensor>& bias,        \
                       at::TensorList lora_A, at::TensorList lora_B, std::optional<at::TensorList> lora_E,       \
                       const at::Tensor& scales, std::optional<at::TensorList> lora_x))                          \
  /* lora_linear_int8: lora_linear over W = CB·SCB/127 (LLM.int8 weights) */                                     \
  X(lora_linear_int8, (const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,               \
                       const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,      \
                       std::optional<at::TensorList> lora_E, const at::Tensor& scales,                           \
                       std::optional<at::TensorList> lora_x))                                                    \
  /* ia3_linear_4bit / ia3_linear_int8: ia3_linear's scaling over the same quantized bases */                    \
  X(ia3_linear_4bit, (const at::Tensor& x, PEFTCORE_WEIGHT4_ARGS, const std::optional<at::Tensor>& bias,         \
                      at::TensorList ia3_l, const at::Tensor& active, bool feedforward))                         \
  X(ia3_linear_int8, (const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,                \
                      const std::optional<at::Tensor>& bias, at::TensorList ia3_l, const at::Tensor& active,     \
                      bool feedforward))                                                                         \
  /* Mixed batches: row group g of x uses adapter slot rows[g] alone (-1 = base); inference only.                \
     lora_linear_mixed: lora_linear per row group */                                                             \
  X(lora_linear_mixed, (const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,    \
                        at::TensorList lora_A, at::TensorList lora_B, std::optional<at::TensorList> lora_E,      \
                        const at::Tensor& scales, const at::Tensor& rows))                                       \
  /* ia3_linear_mixed: ia3_linear with one vector per row group */                                               \
  X(ia3_linear_mixed, (const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,     \
                       at::TensorList ia3_l, const at::Tensor& rows, bool feedforward))                          \
  /* the same over the quantized bases (4-bit LoRA: lora_x, when given, is what the LoRA terms read) */          \
  X(lora_linear_4bit_mixed, (const at::Tensor& x, PEFTCORE_WEIGHT4_ARGS, const std::optional<at::Tensor>& bias,  \
                             at::TensorList lora_A, at::TensorList lora_B, std::optional<at::TensorList> lora_E, \
                             const at::Tensor& scales, const at::Tensor& rows,                                   \
                             const std::optional<at::Tensor>& lora_x))                                           \
  X(ia3_linear_4bit_mixed, (const at::Tensor& x, PEFTCORE_WEIGHT4_ARGS, const std::optional<at::Tensor>& bias,   \
                            at::TensorList ia3_l, const at::Tensor& rows, bool feedforward))                     \
  X(lora_linear_int8_mixed, (const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,         \
                             const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B, \
                             std::optional<at::TensorList> lora_E, const at::Tensor& scales,                     \
                             const at::Tensor& rows))                                                            \
  X(ia3_linear_int8_mixed, (const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,          \
                            const std::optional<at::Tensor>& bias, at::TensorList ia3_l, const at::Tensor& rows, \
                            bool feedforward))

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
