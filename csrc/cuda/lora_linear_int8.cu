// peftcore::lora_linear_int8 / ia3_linear_int8 / dequantize_int8 on CUDA, over a
// bitsandbytes LLM.int8 weight: CB int8 [out, in] and SCB [out], W = CB·SCB/127:
//   lora_linear_int8: y = x·Wᵀ + b + Σ_a s_a·(x_a·A_aᵀ)·B_aᵀ
//   ia3_linear_int8:  the same base with IA3's scale on x (feedforward) or on the output.
// Base, 1-16 token rows: a fused GEMV (one warp per output row, 16 int8 per 16-byte load)
// summing x·CB in fp32 (exact products for bfloat16 / float16 x), the row's SCB·(1/127)
// applied to the sum, bias / rounding / IA3 in the epilogue. More rows (or float64): W
// dequantized as bitsandbytes does ((CB·SCB)·(1/127) in fp32) into a caching-allocator
// buffer, cuBLAS with fp32 output, the epilogue pass. Adapters: lowrank.cu. The result
// y [..., out] (contiguous) is a fresh tensor or the caller's `out` (the .out overloads;
// common/output.h): both paths write it directly.
// The *_mixed variants (one adapter per row group, mixed.h): the same base once for every
// row, then the per-row terms of lora_linear_mixed.cu / ia3_linear_mixed.cu.
// Tests: tests/test_cuda.py (int8 samples of tests/op_db.py). Benchmark: benchmarks/bench_cuda.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "../common/checks.h"
#include "checks_cuda.h"
#include "lowrank.h"
#include "mixed.h"
#include "ops_cuda.h"
#include "quant.h"

namespace peftcore {

using namespace peftcore::cuda;

namespace {

// bitsandbytes multiplies by the float32 constant 1/127.
constexpr float kInv127 = 7.874015718698502e-3f;

template <typename T, typename LR>
struct Gemv8Params {
  const int8_t* cb;  // [N, K], row-major
  const float* scb;  // [N]
  int64_t N, K;
  GemvIO<T> io;
  bool fast;  // K % 16 == 0 and cb 16-byte aligned: 16 weights per load
  LR lr;      // the adapters added in the epilogue (LowrankBatch), or NoLowrank
};

// grid ceil(N / kGemvWarps); block kGemvWarps warps, one output row each.
template <typename T, int MR, typename LR>
__global__ void __launch_bounds__(kGemvWarps* kWarp) gemv_int8_kernel(const __grid_constant__ Gemv8Params<T, LR> p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
  if (n >= p.N) return;
  const int64_t K = p.K;
  const int8_t* row = p.cb + n * K;
  const GemvIO<T>& io = p.io;
  const T* xr[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) xr[m] = io.x + (m < io.M ? m : io.M - 1) * io.ldx;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;
  if (p.fast) {
    const uint4* qrow = reinterpret_cast<const uint4*>(row);
    const int64_t chunks = K / 16;
#pragma unroll 2
    for (int64_t c = lane; c < chunks; c += kWarp) {
      const uint4 qv = qrow[c];
      const int8_t* b = reinterpret_cast<const int8_t*>(&qv);
      float wv[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) wv[j] = static_cast<float>(b[j]);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        float xv[16];
        if (io.vec_x)
          load16(xr[m] + c * 16, xv);
        else
          load16_scalar(xr[m] + c * 16, xv);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[m] += xv[j] * wv[j];
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += kWarp) {
      const float w = static_cast<float>(row[k]);
#pragma unroll
      for (int m = 0; m < MR; ++m) acc[m] += static_cast<float>(xr[m][k]) * w;
    }
  }
  gemv_store<T, MR>(io, p.N, n, acc, lane, p.scb[n] * kInv127, p.lr);
}

// W = (CB·SCB)·(1/127), two roundings in fp32 (fp64 for fp64 output), as
// reference.dequantize_int8 and bitsandbytes.
template <typename T>
__global__ void dequantize_int8_kernel(const int8_t* cb, const float* scb, int64_t N, int64_t K, T* out) {
  using A = acc_type<T>;
  const int64_t total = N * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A t = static_cast<A>(cb[i]) * static_cast<A>(scb[i / K]);
    out[i] = from_acc<T>(t * static_cast<A>(kInv127));
  }
}

struct Int8Weight {
  at::Tensor cb, scb;  // contiguous int8 [N, K], float32 [N]
};

Int8Weight check_int8(const char* op, PEFTCORE_WEIGHT_INT8_ARGS, const at::Device& dev) {
  check_int8_state(op, weight, row_scale, device_rule(op, dev));
  return {weight.contiguous(), row_scale.reshape({-1}).to(at::kFloat).contiguous()};
}

at::Tensor dequantize(const Int8Weight& w, at::ScalarType dtype) {
  const int64_t N = w.cb.size(0), K = w.cb.size(1);
  at::Tensor out = at::empty({N, K}, w.cb.options().dtype(dtype));
  if (out.numel() == 0) return out;
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "peftcore_dequantize_int8", [&] {
    dequantize_int8_kernel<scalar_t><<<grid_for(N * K, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.cb.const_data_ptr<int8_t>(), w.scb.const_data_ptr<float>(), N, K, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename T, typename LR>
void launch_gemv8(const Gemv8Params<T, LR>& p) {
  const unsigned grid = static_cast<unsigned>(ceil_div(p.N, kGemvWarps));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_row_tile(p.io.M, [&](auto mr) {
    gemv_int8_kernel<T, decltype(mr)::value, LR><<<grid, kGemvWarps * kWarp, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The LLM.int8 base x·Wᵀ + b (checked arguments), with IA3's scales where given, written
// into y (contiguous [..., N], x's dtype: the op's result). With `lora`, the fused GEMV
// also adds the adapters where it can (see linear_4bit).
void linear_int8(const at::Tensor& x, const Int8Weight& w, const std::optional<at::Tensor>& bias, const Ia3* in_scale,
                 const Ia3* out_scale, at::Tensor& y, LoraEpilogue* lora = nullptr) {
  const int64_t N = w.cb.size(0), K = w.cb.size(1), M = leading_rows(x);
  if (y.numel() == 0) return;
  at::Tensor y2 = y.view({M, N});
  const at::Tensor x2 = quant_rows(x, in_scale);
  const at::Tensor bf = bias_acc(bias, x.scalar_type());
  if (!use_gemv(M, x.scalar_type())) {
    gemm_base(x2, dequantize(w, x.scalar_type()), bf, out_scale, y2);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_gemv_int8", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const int8_t* cb = w.cb.const_data_ptr<int8_t>();
      const float* scb = w.scb.const_data_ptr<float>();
      const GemvIO<scalar_t> io = gemv_io<scalar_t>(x2, bf, out_scale, y2);
      const bool fast = K % 16 == 0 && aligned(cb, 16);
      LowrankBatch<scalar_t, float> lr{};
      std::vector<at::Tensor> keep;
      if (lora != nullptr &&
          shrink_for_epilogue<scalar_t>(x, lora->lora_A, lora->lora_B, lora->lora_E, lora->lora_x, lora->scales, N, lr,
                                        keep)) {
        launch_gemv8(Gemv8Params<scalar_t, LowrankBatch<scalar_t, float>>{cb, scb, N, K, io, fast, lr});
        lora->done = true;
      } else {
        launch_gemv8(Gemv8Params<scalar_t, NoLowrank>{cb, scb, N, K, io, fast, {}});
      }
    }
  });
}

// The checks of every int8 op on an x at entry: x, the stored weight on x's device, the
// bias and in_features.
Int8Weight check_linear_int8(const char* op, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS)) {
  check_x(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Int8Weight w = check_int8(op, weight, row_scale, x.device());
  check_quant_x_and_bias(op, x, weight.size(0), bias);
  check_size(op, weight, "weight", 1, x.size(-1), "x.shape[-1] (in_features)");
  return w;
}

}  // namespace

at::Tensor lora_linear_int8_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS), PEFTCORE_LORA_ARGS,
                                 std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear_int8";
  const Int8Weight w = check_linear_int8(op, x, weight, row_scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = x.size(-1);
  check_adapters(op, lora_A, lora_B, scales, x.device(), x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "weight.shape[0] (out_features)");
  check_lora_x(op, lora_x, x, lora_A.size());
  const at::TensorList E = checked_lora_E(op, lora_E, lora_A, x.device(), x.scalar_type());
  LoraEpilogue lora{lora_A, lora_B, E, lora_x, read_state(scales)};
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_int8(x, w, bias, nullptr, nullptr, y, lora_A.empty() ? nullptr : &lora);
    if (!lora.done && !lora_A.empty() && y.numel() > 0) add_lowrank(x, lora_A, lora_B, lora_x, E, lora.scales, y);
  });
}

at::Tensor ia3_linear_int8_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS),
                                PEFTCORE_IA3_ARGS(const at::Tensor& active)) {
  const char* op = "ia3_linear_int8";
  const Int8Weight w = check_linear_int8(op, x, weight, row_scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = x.size(-1);
  const Ia3 v = prepare_ia3(op, ia3_l, active, x.scalar_type(), feedforward ? K : N,
                            feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                        : "output feature (feedforward=False: weight.shape[0])",
                            x.device());
  const Ia3* scale = v.none() ? nullptr : &v;  // host flags all off: the base alone
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_int8(x, w, bias, feedforward ? scale : nullptr, feedforward ? nullptr : scale, y);
  });
}

at::Tensor dequantize_int8_cuda(PEFTCORE_WEIGHT_INT8_ARGS, at::ScalarType dtype) {
  const char* op = "dequantize_int8";
  check_defined(op, weight, "weight");
  TORCH_CHECK(weight.is_cuda(), "peftcore::", op, ": weight is on ", weight.device(), " but this kernel runs on CUDA");
  const c10::cuda::CUDAGuard guard(weight.device());
  const Int8Weight w = check_int8(op, weight, row_scale, weight.device());
  TORCH_CHECK(at::isFloatingType(dtype), "peftcore::", op, ": dtype must be a floating type but is ", dtype);
  return dequantize(w, dtype);
}

// ---- mixed batches (mixed.h): the base once for every row, then each row group's adapter.
at::Tensor lora_linear_int8_mixed_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS),
                                       PEFTCORE_LORA_ARGS, const at::Tensor& rows) {
  const char* op = "lora_linear_int8_mixed";
  const Int8Weight w = check_linear_int8(op, x, weight, row_scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = x.size(-1);
  check_adapters(op, lora_A, lora_B, scales, x.device(), x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "weight.shape[0] (out_features)");
  const at::TensorList E = checked_lora_E(op, lora_E, lora_A, x.device(), x.scalar_type());
  const at::Tensor r = check_rows(op, rows, leading_rows(x), static_cast<int64_t>(lora_A.size()), x.device());
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_int8(x, w, bias, nullptr, nullptr, y);
    if (!lora_A.empty() && y.numel() > 0) add_lowrank_mixed(x, lora_A, lora_B, E, read_state(scales), r, y);
  });
}

at::Tensor ia3_linear_int8_mixed_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS),
                                      PEFTCORE_IA3_ARGS(const at::Tensor& rows)) {
  const char* op = "ia3_linear_int8_mixed";
  const Int8Weight w = check_linear_int8(op, x, weight, row_scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0), K = x.size(-1), M = leading_rows(x);
  const at::Tensor r = check_rows(op, rows, M, static_cast<int64_t>(ia3_l.size()), x.device());
  check_ia3_vectors(op, ia3_l, x.scalar_type(), feedforward ? K : N,
                    feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                : "output feature (feedforward=False: weight.shape[0])",
                    device_rule(op, x.device()));
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    ia3_mixed_around(x, ia3_l, r, feedforward, y, [&](const at::Tensor& t, at::Tensor& yt) {
      linear_int8(t, w, bias, nullptr, nullptr, yt);
    });
  });
}

}  // namespace peftcore
