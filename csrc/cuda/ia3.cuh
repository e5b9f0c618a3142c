// (IA)³ on the GPU, shared by ia3_linear and the quantized ia3 ops: the combined vector
// l[k] = Π_{active a} ia3_l[a][k] evaluated where it is used (ia3_factor: one to three
// multiplies per element, the active flags read on the device), and the scaling
// out = round(acc(in) · l) in PEFT's order (l in fp32, fp64 for fp64 data; see
// reference.ia3_linear). No adapter active: l = 1 and the scaling is exact, so the
// result equals the base layer's bit for bit.
#pragma once

#include "device_utils.cuh"

namespace peftcore::cuda {

constexpr int kMaxIa3 = 16;  // vectors per launch; more are multiplied into one first

template <typename A>
struct Ia3View {
  const A* v[kMaxIa3];     // flattened vectors in the accumulation dtype
  int32_t index[kMaxIa3];  // position in `active`
  float host[kMaxIa3];     // host flags (when active == nullptr)
  int32_t n;
  const float* active;     // device flags, or null
};

template <typename A>
__device__ __forceinline__ A ia3_factor(const Ia3View<A>& p, int64_t k) {
  A l = A(1);
  for (int i = 0; i < p.n; ++i)
    if (state_value(p.active, p.index[i], p.host[i]) != 0.f) l *= p.v[i][k];
  return l;
}

}  // namespace peftcore::cuda
