// Host side shared by the quantized-base CUDA ops (lora_linear_4bit.cu,
// lora_linear_int8.cu): argument checks of x and the bias, the launch-side view of x for
// the fused GEMVs, and the many-token path (cuBLAS on a dequantized weight + epilogue).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "ia3.h"
#include "lowrank.h"
#include "quant.cuh"
#include "../common/state.h"

namespace peftcore::cuda {

// A LoRA op's adapters, offered to the fused GEMV's epilogue; done = it added them.
struct LoraEpilogue {
  at::TensorList lora_A, lora_B, lora_E;  // lora_E: empty (LoRA) or AdaLoRA's E
  std::optional<at::TensorList> lora_x;
  State scales;
  bool done = false;
};

void check_quant_x_and_bias(const char* op, const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias);

// bias in the accumulation dtype (fp32, fp64 for fp64 x), contiguous; undefined if none.
at::Tensor bias_acc(const std::optional<at::Tensor>& bias, at::ScalarType x_dtype);

// True when the fused GEMV serves this call (1-16 token rows, float / bfloat16 / float16).
inline bool use_gemv(int64_t M, at::ScalarType dt) { return M <= kGemvMaxRows && dt != at::kDouble; }

// The GEMV's view of x2 ([M, K], unit column stride), y2 ([M, N]) and the epilogue.
template <typename T>
GemvIO<T> gemv_io(const at::Tensor& x2, const at::Tensor& bias_f, const Ia3* out_scale, at::Tensor& y2) {
  GemvIO<T> io{};
  io.x = x2.const_data_ptr<T>();
  io.ldx = x2.stride(0);
  io.M = static_cast<int32_t>(x2.size(0));
  io.vec_x = aligned(io.x, 16) && (io.ldx * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  io.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  io.has_ia3 = out_scale != nullptr;
  if (out_scale != nullptr) io.ia3 = out_scale->view<float>();
  io.y = y2.data_ptr<T>();
  return io;
}

// y2 [M, N] = epilogue(x2 · Wᵀ) with W the dequantized weight [N, K] (x's dtype, or fp32 /
// fp64): cuBLAS with fp32 (fp64) output, then one pass adding the bias, rounding, and
// IA3's output scale.
void gemm_base(const at::Tensor& x2, const at::Tensor& W, const at::Tensor& bias_f, const Ia3* out_scale,
               at::Tensor& y2);

// x as [M, K] rows with unit stride (a view when possible), IA3's input scale applied
// (a scaled contiguous copy) when given.
at::Tensor quant_rows(const at::Tensor& x, const Ia3* in_scale);

}  // namespace peftcore::cuda
