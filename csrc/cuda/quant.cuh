// Device pieces of the quantized-base ops (lora_linear_4bit.cu, lora_linear_int8.cu):
// bitsandbytes' 4-bit layout and its block scales, and the epilogue every base output
// goes through: y = round(acc + b), then (IA3, attention side) y = round(float(y) · l[n]),
// as reference.lora_linear_4bit / reference.ia3_linear_4bit round it.
#pragma once

#include <type_traits>

#include "device_utils.cuh"
#include "ia3.cuh"
#include "lowrank.cuh"

namespace peftcore::cuda {

constexpr int kGemvMaxRows = 16;  // token rows up to which the fused GEMV runs (else dequantize + cuBLAS)
constexpr int kGemvWarps = 4;     // output rows per GEMV block (one warp each)

// A bitsandbytes 4-bit weight, standard layout (reference.dequantize_4bit): row-major
// W [N, K] flattened, two codes per byte, the high nibble first; element i is
// code[q_i] · scale(i / blocksize) (blocks run over the flattened weight: they may
// straddle rows).
struct Quant4 {
  const uint8_t* q;
  const float* code;      // [16]
  const float* absmax;    // plain block scales, or null with double quantization:
  const uint8_t* qabsmax; //   scale(b) = ncode[qabsmax[b]] · nabsmax[b / nbs] + *noffset
  const float* ncode;
  const float* nabsmax;
  const float* noffset;   // on the device: never read on the host
  int64_t blocksize, nbs, N, K;
};

// Rounded after the product and after the sum (no FMA), as bitsandbytes resolves it.
__device__ __forceinline__ float block_scale(const Quant4& w, int64_t b) {
  if (w.absmax != nullptr) return w.absmax[b];
  return __fadd_rn(__fmul_rn(w.ncode[w.qabsmax[b]], w.nabsmax[b / w.nbs]), *w.noffset);
}

// The finished base output of one element: the bias joins the fp32 (fp64) sum before the
// one rounding; IA3's output scale then multiplies the rounded base, rounded again.
template <typename T, typename A>
__device__ __forceinline__ T base_epilogue(A acc, const A* bias, int64_t n, const Ia3View<A>& ia3, bool has_ia3) {
  if (bias != nullptr) acc += bias[n];
  T y = from_acc<T>(acc);
  if (has_ia3) y = from_acc<T>(to_acc(y) * ia3_factor(ia3, n));
  return y;
}

// The fused GEMVs are instantiated for 1, 2, 4, 8 and 16 token rows: calls
// f(std::integral_constant<int, MR>{}) with the smallest MR >= M (M <= kGemvMaxRows).
template <typename F>
void with_row_tile(int M, const F& f) {
  if (M == 1) f(std::integral_constant<int, 1>{});
  else if (M == 2) f(std::integral_constant<int, 2>{});
  else if (M <= 4) f(std::integral_constant<int, 4>{});
  else if (M <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

// Parameters every fused GEMV shares: x rows, the epilogue, y.
template <typename T>
struct GemvIO {
  const T* x;  // rows of K values, unit stride, row stride ldx
  int64_t ldx;
  int32_t M;    // token rows (<= kGemvMaxRows)
  bool vec_x;   // x rows 16-byte aligned: vector loads
  const float* bias;  // fp32 or null
  Ia3View<float> ia3;
  bool has_ia3;
  T* y;  // [M, N]
};

// 16 values of x from p (16-byte aligned), widened to fp32.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&v)[16]) {
  constexpr int per = 16 / sizeof(T);  // values per 16-byte load
#pragma unroll
  for (int c = 0; c < 16 / per; ++c) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + c * per);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < per; ++j) v[c * per + j] = static_cast<float>(t[j]);
  }
}

template <typename T>
__device__ __forceinline__ void load16_scalar(const T* p, float (&v)[16]) {
#pragma unroll
  for (int j = 0; j < 16; ++j) v[j] = static_cast<float>(p[j]);
}

// The GEMV's finish for output row n: acc[m] warp-reduced, times the row's factor (int8's
// SCB/127, else 1), the base epilogue (bias, rounding, IA3), then the adapters' terms when
// lr is a LowrankBatch (expand_row: y rounded once more), stored by lane m.
template <typename T, int MR, typename LR>
__device__ __forceinline__ void gemv_store(const GemvIO<T>& io, int64_t N, int64_t n, float (&acc)[MR], int lane,
                                           float row_mult, const LR& lr) {
  float out[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m)
    out[m] = static_cast<float>(base_epilogue<T, float>(warp_sum(acc[m]) * row_mult, io.bias, n, io.ia3, io.has_ia3));
  expand_row(lr, n, lane, out);
#pragma unroll
  for (int m = 0; m < MR; ++m)
    if (lane == m && m < io.M) io.y[static_cast<int64_t>(m) * N + n] = from_acc<T>(out[m]);
}

}  // namespace peftcore::cuda
