// The CUDA entry points of peftcore, one per op: same arguments as the CPU ones in
// ../ops.h (and the schemas in peftcore/_ops.py). Registered in register.cu.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace peftcore {

// lora_linear: y = x·Wᵀ + b + Σ_a s_a·(x_a·A_aᵀ)·B_aᵀ (cuBLAS base, one shrink + one expand launch)
at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                            std::optional<at::TensorList> lora_x);
// lora_linear_backward: ATen GEMMs, disabled adapters masked on the device
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                          std::optional<at::TensorList> lora_x, std::array<bool, 4> output_mask);
// adalora_linear: lora_linear with AdaLoRA's E applied to the shrink result
at::Tensor adalora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::TensorList lora_A, at::TensorList lora_E, at::TensorList lora_B,
                               const at::Tensor& scales, std::optional<at::TensorList> lora_x);
// ia3_linear: cuBLAS base, the IA3 scaling as one pass (x for feedforward, else y in place)
at::Tensor ia3_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::TensorList ia3_l, const at::Tensor& active, bool feedforward);
// lora_embedding: ATen gather of W and of Aᵀ's rows, then the low-rank expand
at::Tensor lora_embedding_cuda(const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
                               at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx);
// lora_embedding_backward: ATen index_add / GEMMs
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_embedding_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx, std::array<bool, 2> output_mask);
// lora_linear_4bit: fused nf4/fp4 GEMV (1-16 tokens) or dequantize + cuBLAS, then the low-rank update
at::Tensor lora_linear_4bit_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                 const at::Tensor& code, int64_t blocksize,
                                 const std::optional<at::Tensor>& nested_absmax,
                                 const std::optional<at::Tensor>& nested_code,
                                 const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                 int64_t out_features, const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                 at::TensorList lora_B, const at::Tensor& scales, std::optional<at::TensorList> lora_x);
// dequantize_4bit: one elementwise decode kernel
at::Tensor dequantize_4bit_cuda(const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                int64_t out_features, int64_t in_features, at::ScalarType dtype);
// lora_linear_int8: fused int8 GEMV (1-16 tokens) or dequantize + cuBLAS, then the low-rank update
at::Tensor lora_linear_int8_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                                 const std::optional<at::Tensor>& bias, at::TensorList lora_A, at::TensorList lora_B,
                                 const at::Tensor& scales, std::optional<at::TensorList> lora_x);
// ia3_linear_4bit: the 4-bit base with IA3's scale on x (feedforward) or in the GEMV epilogue
at::Tensor ia3_linear_4bit_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                int64_t out_features, const std::optional<at::Tensor>& bias, at::TensorList ia3_l,
                                const at::Tensor& active, bool feedforward);
// ia3_linear_int8: the int8 base with IA3's scale on x (feedforward) or in the GEMV epilogue
at::Tensor ia3_linear_int8_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                                const std::optional<at::Tensor>& bias, at::TensorList ia3_l, const at::Tensor& active,
                                bool feedforward);
// dequantize_int8: one elementwise kernel, (CB·SCB)·(1/127) as bitsandbytes
at::Tensor dequantize_int8_cuda(const at::Tensor& weight, const at::Tensor& row_scale, at::ScalarType dtype);

// lora_linear_mixed: cuBLAS base, then per window of 32 slots a gathered shrink + per-row expand
at::Tensor lora_linear_mixed_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::TensorList lora_A, at::TensorList lora_B, std::optional<at::TensorList> lora_E,
                                  const at::Tensor& scales, const at::Tensor& rows);
// ia3_linear_mixed: cuBLAS base, each row scaled by its slot's vector (x's rows, or y's in place)
at::Tensor ia3_linear_mixed_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 at::TensorList ia3_l, const at::Tensor& rows, bool feedforward);
// lora_linear_4bit_mixed: the 4-bit base (GEMV or dequantize + cuBLAS), then the per-row LoRA terms
at::Tensor lora_linear_4bit_mixed_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                       const at::Tensor& code, int64_t blocksize,
                                       const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                       int64_t out_features, const std::optional<at::Tensor>& bias,
                                       at::TensorList lora_A, at::TensorList lora_B, const at::Tensor& scales,
                                       const at::Tensor& rows, const std::optional<at::Tensor>& lora_x);
// ia3_linear_4bit_mixed: the 4-bit base over per-row scaled x (feedforward), or its output rows scaled
at::Tensor ia3_linear_4bit_mixed_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                      const at::Tensor& code, int64_t blocksize,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                                      int64_t out_features, const std::optional<at::Tensor>& bias,
                                      at::TensorList ia3_l, const at::Tensor& rows, bool feedforward);
// lora_linear_int8_mixed: the int8 base (GEMV or dequantize + cuBLAS), then the per-row LoRA terms
at::Tensor lora_linear_int8_mixed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                                       const std::optional<at::Tensor>& bias, at::TensorList lora_A,
                                       at::TensorList lora_B, const at::Tensor& scales, const at::Tensor& rows);
// ia3_linear_int8_mixed: the int8 base over per-row scaled x (feedforward), or its output rows scaled
at::Tensor ia3_linear_int8_mixed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                                      const std::optional<at::Tensor>& bias, at::TensorList ia3_l,
                                      const at::Tensor& rows, bool feedforward);

}  // namespace peftcore
