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

// ---- lora_embedding: y = W[idx] + Σ_a s_a · A_aᵀ[idx]·B_aᵀ
at::Tensor lora_embedding_cpu(const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
                              at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx);

// (grad_weight, grad_lora_A[], grad_lora_B[])
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_embedding_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& weight, at::TensorList lora_A,
    at::TensorList lora_B, const at::Tensor& scales, int64_t padding_idx, std::array<bool, 2> output_mask);

}  // namespace peftcore
