// peftcore::lora_linear_4bit / ia3_linear_4bit / dequantize_4bit on CUDA, over a
// bitsandbytes nf4 / fp4 weight (quant.cuh's Quant4: packed codes, high nibble first,
// per-block absmax, optionally double-quantized):
//   lora_linear_4bit: y = x·Wᵀ + b + Σ_a s_a·(x_a·A_aᵀ)·B_aᵀ
//   ia3_linear_4bit:  the same base with IA3's scale on x (feedforward) or on the output.
// Base, 1-16 token rows: a fused GEMV (one warp per output row) that decodes the codes in
// registers (a 16-entry shared-memory table, one block scale per 16 codes), multiplies
// them with every token row in fp32 and writes the finished output (bias, rounding, IA3's
// output scale in its epilogue); W is never materialised. More rows (or float64): the
// weight is dequantized into a caching-allocator buffer (x's dtype) and cuBLAS runs with
// fp32 output, then the epilogue pass. The adapters are then added by lowrank.cu. The
// result y [..., out] (contiguous) is a fresh tensor or the caller's `out` (the .out
// overloads; common/output.h): both paths write it directly.
// Tests: tests/test_cuda.py (4-bit samples of tests/op_db.py, graph capture).
// The *_mixed variants (one adapter per row group, mixed.h) run the same base once for
// every row, then the per-row terms of lora_linear_mixed.cu / ia3_linear_mixed.cu.
// Benchmark: benchmarks/bench_cuda.py (nf4 rows, mixed rows).
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

// ------------------------------------------------------------------ kernels
template <typename T, typename LR>
struct Gemv4Params {
  Quant4 w;
  GemvIO<T> io;
  bool fast;  // K % 16 == 0, blocksize % 16 == 0, q 8-byte aligned: 16 codes per 8-byte load, one scale
  LR lr;      // the adapters added in the epilogue (LowrankBatch), or NoLowrank
};

// grid ceil(N / kGemvWarps); block kGemvWarps warps, one output row each; MR >= M token rows
// (rows past M repeat row M - 1: no branch in the loop, never written).
template <typename T, int MR, typename LR>
__global__ void __launch_bounds__(kGemvWarps* kWarp) gemv_4bit_kernel(const __grid_constant__ Gemv4Params<T, LR> p) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = p.w.code[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
  if (n >= p.w.N) return;
  const int64_t K = p.w.K, base = n * K;
  const GemvIO<T>& io = p.io;
  const T* xr[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) xr[m] = io.x + (m < io.M ? m : io.M - 1) * io.ldx;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;
  if (p.fast) {
    const uint2* qrow = reinterpret_cast<const uint2*>(p.w.q + base / 2);
    const int64_t chunks = K / 16;
#pragma unroll 2
    for (int64_t c = lane; c < chunks; c += kWarp) {
      const uint2 qv = qrow[c];
      const float s = block_scale(p.w, (base + c * 16) / p.w.blocksize);
      float wv[16];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t byte = ((j < 4 ? qv.x : qv.y) >> (8 * (j & 3))) & 0xffu;
        wv[2 * j] = lut[byte >> 4] * s;  // as reference.py: code · scale, rounded in fp32
        wv[2 * j + 1] = lut[byte & 15u] * s;
      }
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
  } else {  // any K, blocksize, alignment: one code at a time
    for (int64_t k = lane; k < K; k += kWarp) {
      const int64_t i = base + k;
      const uint32_t byte = p.w.q[i >> 1];
      const float w = lut[(i & 1) ? (byte & 15u) : (byte >> 4)] * block_scale(p.w, i / p.w.blocksize);
#pragma unroll
      for (int m = 0; m < MR; ++m) acc[m] += static_cast<float>(xr[m][k]) * w;
    }
  }
  gemv_store<T, MR>(io, p.w.N, n, acc, lane, 1.f, p.lr);
}

// One thread per byte (two codes); float64 output computes code · scale in float64 from
// the float32 scale, as reference.dequantize_4bit does.
template <typename T>
__global__ void dequantize_4bit_kernel(const __grid_constant__ Quant4 w, T* out) {
  using A = acc_type<T>;
  const int64_t n = w.N * w.K, bytes = (n + 1) / 2;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < bytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t byte = w.q[j];
    const int64_t i = 2 * j;
    out[i] = from_acc<T>(static_cast<A>(w.code[byte >> 4]) * static_cast<A>(block_scale(w, i / w.blocksize)));
    if (i + 1 < n)
      out[i + 1] = from_acc<T>(static_cast<A>(w.code[byte & 15u]) * static_cast<A>(block_scale(w, (i + 1) / w.blocksize)));
  }
}

// ------------------------------------------------------------------ host
struct Weight4 {
  Quant4 w{};
  std::vector<at::Tensor> keep;  // float32 / contiguous copies the pointers refer to
};

const float* f32(const at::Tensor& t, std::vector<at::Tensor>& keep) {
  keep.push_back(t.to(at::kFloat).contiguous());
  return keep.back().const_data_ptr<float>();
}

Weight4 check_weight4(const char* op, const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& code,
                      int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                      const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& nested_offset,
                      int64_t nested_blocksize, int64_t N, int64_t K, const at::Device& dev) {
  check_weight4_state(op, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                      nested_blocksize, N, K, device_rule(op, dev));
  Weight4 r;
  r.w.q = static_cast<const uint8_t*>(qweight.const_data_ptr());
  r.w.code = f32(code, r.keep);
  r.w.blocksize = blocksize;
  r.w.N = N;
  r.w.K = K;
  r.w.nbs = 1;
  if (!(nested_absmax.has_value() && nested_absmax->defined())) {
    r.w.absmax = f32(absmax, r.keep);
    return r;
  }
  r.keep.push_back(absmax.contiguous());
  r.w.qabsmax = r.keep.back().const_data_ptr<uint8_t>();
  r.w.ncode = f32(*nested_code, r.keep);
  r.w.nabsmax = f32(*nested_absmax, r.keep);
  r.w.noffset = f32(*nested_offset, r.keep);  // stays on the device: read by the kernels
  r.w.nbs = nested_blocksize;
  return r;
}

// W [N, K] in dtype (float / bfloat16 / float16 / float64).
at::Tensor dequantize(const Weight4& w, const at::TensorOptions& opts, at::ScalarType dtype) {
  at::Tensor out = at::empty({w.w.N, w.w.K}, opts.dtype(dtype));
  if (out.numel() == 0) return out;
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "peftcore_dequantize_4bit", [&] {
    dequantize_4bit_kernel<scalar_t><<<grid_for((out.numel() + 1) / 2, threads), threads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(w.w, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename T, typename LR>
void launch_gemv4(const Gemv4Params<T, LR>& p) {
  const unsigned grid = static_cast<unsigned>(ceil_div(p.w.N, kGemvWarps));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_row_tile(p.io.M, [&](auto mr) {
    gemv_4bit_kernel<T, decltype(mr)::value, LR><<<grid, kGemvWarps * kWarp, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The 4-bit base x·Wᵀ + b (checked arguments), with IA3's scales where given, written into
// y (contiguous [..., N], x's dtype: the op's result). With `lora`, the fused GEMV also adds the adapters (shrink launched first, expand in its
// epilogue) where it can, and sets lora->done; otherwise the caller adds them.
void linear_4bit(const at::Tensor& x, const Weight4& w, const std::optional<at::Tensor>& bias, const Ia3* in_scale,
                 const Ia3* out_scale, at::Tensor& y, LoraEpilogue* lora = nullptr) {
  const int64_t K = x.size(-1), N = w.w.N, M = leading_rows(x);
  if (y.numel() == 0) return;
  at::Tensor y2 = y.view({M, N});
  const at::Tensor x2 = quant_rows(x, in_scale);
  const at::Tensor bf = bias_acc(bias, x.scalar_type());
  if (!use_gemv(M, x.scalar_type())) {
    gemm_base(x2, dequantize(w, x.options(), x.scalar_type()), bf, out_scale, y2);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_gemv_4bit", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const GemvIO<scalar_t> io = gemv_io<scalar_t>(x2, bf, out_scale, y2);
      const bool fast = K % 16 == 0 && w.w.blocksize % 16 == 0 && aligned(w.w.q, 8);
      LowrankBatch<scalar_t, float> lr{};
      std::vector<at::Tensor> keep;
      if (lora != nullptr &&
          shrink_for_epilogue<scalar_t>(x, lora->lora_A, lora->lora_B, lora->lora_E, lora->lora_x, lora->scales, N, lr,
                                        keep)) {
        launch_gemv4(Gemv4Params<scalar_t, LowrankBatch<scalar_t, float>>{w.w, io, fast, lr});
        lora->done = true;
      } else {
        launch_gemv4(Gemv4Params<scalar_t, NoLowrank>{w.w, io, fast, {}});
      }
    }
  });
}

// The checks of every 4-bit op on an x at entry: x and the bias, then the stored weight
// on x's device (its conversions allocate there).
Weight4 check_linear_4bit(const char* op, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS)) {
  check_quant_x_and_bias(op, x, out_features, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  return check_weight4(op, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                       nested_blocksize, out_features, x.size(-1), x.device());
}

}  // namespace

at::Tensor lora_linear_4bit_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_LORA_ARGS,
                                 std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear_4bit";
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code,
                                      nested_offset, nested_blocksize, out_features, bias);
  const int64_t K = x.size(-1), N = out_features;
  const c10::cuda::CUDAGuard guard(x.device());
  check_adapters(op, lora_A, lora_B, scales, x.device(), x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "out_features");
  check_lora_x(op, lora_x, x, lora_A.size());
  const at::TensorList E = checked_lora_E(op, lora_E, lora_A, x.device(), x.scalar_type());
  LoraEpilogue lora{lora_A, lora_B, E, lora_x, read_state(scales)};
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_4bit(x, w, bias, nullptr, nullptr, y, lora_A.empty() ? nullptr : &lora);
    if (!lora.done && !lora_A.empty() && y.numel() > 0) add_lowrank(x, lora_A, lora_B, lora_x, E, lora.scales, y);
  });
}

at::Tensor ia3_linear_4bit_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS),
                                PEFTCORE_IA3_ARGS(const at::Tensor& active)) {
  const char* op = "ia3_linear_4bit";
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code,
                                      nested_offset, nested_blocksize, out_features, bias);
  const int64_t K = x.size(-1), N = out_features;
  const c10::cuda::CUDAGuard guard(x.device());
  const Ia3 v = prepare_ia3(op, ia3_l, active, x.scalar_type(), feedforward ? K : N,
                            feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                        : "output feature (feedforward=False: out_features)",
                            x.device());
  const Ia3* scale = v.none() ? nullptr : &v;  // host flags all off: the base alone
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_4bit(x, w, bias, feedforward ? scale : nullptr, feedforward ? nullptr : scale, y);
  });
}

at::Tensor dequantize_4bit_cuda(PEFTCORE_WEIGHT4_ARGS, int64_t in_features, at::ScalarType dtype) {
  const char* op = "dequantize_4bit";
  check_defined(op, qweight, "qweight");
  TORCH_CHECK(qweight.is_cuda(), "peftcore::", op, ": qweight is on ", qweight.device(), " but this kernel runs on CUDA");
  const c10::cuda::CUDAGuard guard(qweight.device());
  const Weight4 w = check_weight4(op, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                                  nested_blocksize, out_features, in_features, qweight.device());
  TORCH_CHECK(at::isFloatingType(dtype), "peftcore::", op, ": dtype must be a floating type but is ", dtype);
  return dequantize(w, qweight.options(), dtype);
}

// ---- mixed batches (mixed.h): the base once for every row (the GEMV / GEMM above, no
// adapter in its epilogue: the per-row terms follow), then each row group's adapter.
at::Tensor lora_linear_4bit_mixed_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_LORA_ARGS,
                                       const at::Tensor& rows, const std::optional<at::Tensor>& lora_x) {
  const char* op = "lora_linear_4bit_mixed";
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code,
                                      nested_offset, nested_blocksize, out_features, bias);
  const int64_t K = x.size(-1), N = out_features;
  const c10::cuda::CUDAGuard guard(x.device());
  check_adapters(op, lora_A, lora_B, scales, x.device(), x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "out_features");
  const bool has_lx = lora_x.has_value() && lora_x->defined();
  if (has_lx) check_lora_x(op, std::optional<at::TensorList>(at::TensorList(*lora_x)), x, 1);
  const at::TensorList E = checked_lora_E(op, lora_E, lora_A, x.device(), x.scalar_type());
  const at::Tensor r = check_rows(op, rows, leading_rows(x), static_cast<int64_t>(lora_A.size()), x.device());
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_4bit(x, w, bias, nullptr, nullptr, y);
    if (!lora_A.empty() && y.numel() > 0)
      add_lowrank_mixed(has_lx ? *lora_x : x, lora_A, lora_B, E, read_state(scales), r, y);
  });
}

at::Tensor ia3_linear_4bit_mixed_cuda(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS),
                                      PEFTCORE_IA3_ARGS(const at::Tensor& rows)) {
  const char* op = "ia3_linear_4bit_mixed";
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code,
                                      nested_offset, nested_blocksize, out_features, bias);
  const int64_t K = x.size(-1), N = out_features, M = leading_rows(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor r = check_rows(op, rows, M, static_cast<int64_t>(ia3_l.size()), x.device());
  check_ia3_vectors(op, ia3_l, x.scalar_type(), feedforward ? K : N,
                    feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                : "output feature (feedforward=False: out_features)",
                    device_rule(op, x.device()));
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    ia3_mixed_around(x, ia3_l, r, feedforward, y, [&](const at::Tensor& t, at::Tensor& yt) {
      linear_4bit(t, w, bias, nullptr, nullptr, yt);
    });
  });
}

}  // namespace peftcore
