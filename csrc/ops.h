// Every native entry point of peftcore, one per (op, device). The schemas live in
// peftcore/_ops.py; these signatures must match them argument for argument
// (the dispatcher checks at load time). Registered in csrc/cpu/register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace peftcore {

// ---- lora_linear: y = x·Wᵀ + b + Σ_a s_a · (x_a·A_aᵀ)·B_aᵀ
at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                           std::optional<at::TensorList> lora_x);

// (grad_x, grad_weight, grad_bias, grad_lora_A[], grad_lora_B[], grad_lora_x[])
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                         std::optional<at::TensorList> lora_x, std::array<bool, 4> output_mask);

// ---- adalora_linear: y = x·Wᵀ + b + Σ_a s_a · ((x_a·A_aᵀ) ⊙ E_aᵀ)·B_aᵀ
at::Tensor adalora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::TensorList lora_A, at::TensorList lora_E, at::TensorList lora_B,
                              const at::Tensor& scales, std::optional<at::TensorList> lora_x);

// ---- ia3_linear: y = round(float(x·Wᵀ + b) ⊙ l), or (feedforward) round(float(x) ⊙ l)·Wᵀ + b,
// l = Π_{active a} ia3_l[a]
at::Tensor ia3_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::TensorList ia3_l, const at::Tensor& active, bool feedforward);

// ---- lora_embedding: y = W[idx] + Σ_a s_a · A_aᵀ[idx]·B_aᵀ
at::Tensor lora_embedding_cpu(const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
                              at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx);

// (grad_weight, grad_lora_A[], grad_lora_B[])
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_embedding_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx, std::array<bool, 2> output_mask);

// ---- bitsandbytes-quantized bases (formats: peftcore/reference.py)
// lora_linear_4bit: y = x·Wᵀ + b + Σ_a s_a·(x_a·A_aᵀ)·B_aᵀ, W nf4/fp4 packed (+ double quant)
at::Tensor lora_linear_4bit_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                int64_t out_features, const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                at::TensorList lora_B, const at::Tensor& scales, std::optional<at::TensorList> lora_x);
at::Tensor dequantize_4bit_cpu(const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                               int64_t out_features, int64_t in_features, at::ScalarType dtype);
// lora_linear_int8: the same over W = CB·SCB/127 (LLM.int8 weights)
at::Tensor lora_linear_int8_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                                const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,
                                const at::Tensor& scales, std::optional<at::TensorList> lora_x);
// ia3_linear_4bit / ia3_linear_int8: ia3_linear's scaling over the same quantized bases
at::Tensor ia3_linear_4bit_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                               int64_t out_features, const std::optional<at::Tensor>& bias, at::TensorList ia3_l,
                               const at::Tensor& active, bool feedforward);
at::Tensor ia3_linear_int8_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                               const std::optional<at::Tensor>& bias, at::TensorList ia3_l, const at::Tensor& active,
                               bool feedforward);
// ---- mixed batches: row group g of x uses adapter slot rows[g] alone (-1 = base); inference only
// lora_linear_mixed: lora_linear (adalora_linear with lora_E) per row group
at::Tensor lora_linear_mixed_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 at::TensorList lora_A, at::TensorList lora_B, std::optional<at::TensorList> lora_E,
                                 const at::Tensor& scales, const at::Tensor& rows);
// ia3_linear_mixed: ia3_linear with one vector per row group
at::Tensor ia3_linear_mixed_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::TensorList ia3_l, const at::Tensor& rows, bool feedforward);
// lora_linear_4bit_mixed / lora_linear_int8_mixed / ia3_linear_4bit_mixed / ia3_linear_int8_mixed: the same
// over the quantized bases (4-bit LoRA: lora_x, when given, is what the LoRA terms read instead of x)
at::Tensor lora_linear_4bit_mixed_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                      const at::Tensor& code, int64_t blocksize,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                      int64_t out_features, const std::optional<at::Tensor>& bias,
                                      at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                                      const at::Tensor& rows, const std::optional<at::Tensor>& lora_x);
at::Tensor ia3_linear_4bit_mixed_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                     int64_t out_features, const std::optional<at::Tensor>& bias, at::TensorList ia3_l,
                                     const at::Tensor& rows, bool feedforward);
at::Tensor lora_linear_int8_mixed_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                                      const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                      at::TensorList lora_B, const at::Tensor& scales, const at::Tensor& rows);
at::Tensor ia3_linear_int8_mixed_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                                     const std::optional<at::Tensor>& bias, at::TensorList ia3_l,
                                     const at::Tensor& rows, bool feedforward);
at::Tensor dequantize_int8_cpu(const at::Tensor& weight, const at::Tensor& row_scale, at::ScalarType dtype);

}  // namespace peftcore
