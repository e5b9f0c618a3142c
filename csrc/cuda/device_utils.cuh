// Device-side helpers shared by the CUDA kernels: conversions to and from the float32
// accumulator, warp reductions, the per-adapter state read, launch checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

namespace peftcore::cuda {

constexpr int kWarp = 32;

// The accumulation type of a data type: float32, or float64 for float64 data.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_type<T> to_acc(T v) {
  return static_cast<acc_type<T>>(v);
}

// c10::Half / c10::BFloat16 construct from float with round-to-nearest-even, as the
// CPU kernels and ATen's casts do.
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One adapter's state value (LoRA scale / IA3 active flag): from device memory when the
// state vector is on the GPU (dev != nullptr), else the host value baked into the launch.
__device__ __forceinline__ float state_value(const float* dev, int32_t index, float host) {
  return dev != nullptr ? dev[index] : host;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size of a grid-stride loop over n items: enough blocks to fill the GPU a few
// times over, never more than needed.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = ceil_div(n, threads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, sms * 8)));
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace peftcore::cuda
