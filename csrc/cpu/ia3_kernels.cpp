// ia3_scale (declared and specified in ia3.h): out[i, k] = round(acc(x[i, k]) · l[k]),
// the one elementwise pass of every (IA)³ forward. Plain C++ that GCC vectorises, compiled
// per x86-64 level (clones.h); bfloat16 is rounded with the branch-free
// round-to-nearest-even of c10 / torch's .to(bfloat16), so results are bit-identical to
// reference.ia3_linear. Covered by tests/ops/test_ia3_linear.py, test_ia3_quantized.py;
// timed by benchmarks/bench_lora_linear.py (IA3 table).
#include "clones.h"
#include "ia3.h"

#include <cstdint>
#include <cstring>

namespace peftcore::cpu {
namespace {

PEFTCORE_INLINE float widen(float v) { return v; }
PEFTCORE_INLINE double widen(double v) { return v; }
PEFTCORE_INLINE float widen(c10::Half v) { return static_cast<float>(v); }
PEFTCORE_INLINE float widen(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
PEFTCORE_INLINE T narrow(float v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // round to nearest even on the top 16 bits; NaN -> the canonical quiet NaN (as c10)
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint16_t r = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return c10::BFloat16(v != v ? uint16_t(0x7FC0) : r, c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}
PEFTCORE_INLINE double narrow_d(double v) { return v; }

template <typename T, typename acc_t>
PEFTCORE_INLINE void scale_impl(const T* x, int64_t ldx, int64_t csx, const acc_t* l, T* out, int64_t ldo,
                                int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = x + i * ldx;
    T* oi = out + i * ldo;
    if (csx == 1) {
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) {
        if constexpr (std::is_same_v<acc_t, double>)
          oi[k] = narrow_d(widen(xi[k]) * l[k]);
        else
          oi[k] = narrow<T>(widen(xi[k]) * l[k]);
      }
    } else {  // a strided row of x (a transposed view): the scaled copy is contiguous
      for (int64_t k = 0; k < cols; ++k) {
        if constexpr (std::is_same_v<acc_t, double>)
          oi[k] = narrow_d(widen(xi[k * csx]) * l[k]);
        else
          oi[k] = narrow<T>(widen(xi[k * csx]) * l[k]);
      }
    }
  }
}

}  // namespace

PEFTCORE_CLONES void ia3_scale(const float* x, int64_t ldx, int64_t csx, const float* l, float* out, int64_t ldo,
                               int64_t rows, int64_t cols) {
  scale_impl(x, ldx, csx, l, out, ldo, rows, cols);
}
PEFTCORE_CLONES void ia3_scale(const c10::BFloat16* x, int64_t ldx, int64_t csx, const float* l, c10::BFloat16* out,
                               int64_t ldo, int64_t rows, int64_t cols) {
  scale_impl(x, ldx, csx, l, out, ldo, rows, cols);
}
PEFTCORE_CLONES void ia3_scale(const c10::Half* x, int64_t ldx, int64_t csx, const float* l, c10::Half* out,
                               int64_t ldo, int64_t rows, int64_t cols) {
  scale_impl(x, ldx, csx, l, out, ldo, rows, cols);
}
PEFTCORE_CLONES void ia3_scale(const double* x, int64_t ldx, int64_t csx, const double* l, double* out, int64_t ldo,
                               int64_t rows, int64_t cols) {
  scale_impl(x, ldx, csx, l, out, ldo, rows, cols);
}

}  // namespace peftcore::cpu
