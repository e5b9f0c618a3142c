// AVX2 + FMA kernels of quant.h (float32 compute; chunk 16: within each 16 codes the
// 8 even positions, then the 8 odd ones), for x86 CPUs without AVX-512 — the CPUs on
// which bitsandbytes' CPU backend falls back to scalar code. A 4-bit code picks one
// of 16 scaled values (code·absmax): two 8-entry vpermps lookups and a blend on the
// code's top bit. Reached through the run-time dispatch in quant_generic.cpp (also
// forced with PEFTCORE_CPU_ISA=avx2 on AVX-512 machines, which is how
// tests/test_isa_generic.py covers it). Timed by benchmarks/bench_quant.py --isa avx2.
#include "quant_avx2.h"

#if PEFTCORE_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#define PEFTCORE_AVX2_FN __attribute__((target("avx2,fma")))
#define PEFTCORE_AVX2_INLINE PEFTCORE_AVX2_FN inline __attribute__((always_inline))

namespace peftcore::cpu::quant::avx2 {
namespace {

// The 16 scaled code values as two 8-float halves.
struct Table {
  __m256 lo, hi;
};

PEFTCORE_AVX2_INLINE Table make_table(const float* code, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  return {_mm256_mul_ps(_mm256_loadu_ps(code), sv), _mm256_mul_ps(_mm256_loadu_ps(code + 8), sv)};
}

// Values of the 8 codes held in the low 4 bits of each 32-bit lane of idx (higher
// bits ignored): vpermps reads bits 0-2, bit 3 moved to the sign bit picks the half.
PEFTCORE_AVX2_INLINE __m256 lookup(const Table& t, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(t.lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 16 codes from 8 bytes: (even positions = high nibbles, odd = low nibbles).
PEFTCORE_AVX2_INLINE void decode16(const uint8_t* q, const Table& t, __m256& even, __m256& odd) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  even = lookup(t, _mm256_srli_epi32(b, 4));
  odd = lookup(t, b);
}

template <typename T>
void zero_rows(T* buf, int64_t nr, int64_t Kp) {
  std::memset(static_cast<void*>(buf + nr * Kp), 0, sizeof(T) * (kPanelRows - nr) * Kp);
}

}  // namespace

PEFTCORE_AVX2_FN void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0,
                                  float* buf, int64_t Kp) {
  for (int64_t j = 0; j < nr; ++j) {
    float* row = buf + j * Kp;
    const int64_t i0 = (n0 + j) * w.K;
    const uint8_t* q = w.q + i0 / 2;
    int64_t b = i0 / w.blocksize, left = 0;
    Table t{};
    for (int64_t k = 0; k < w.K; k += 16, left -= 16) {
      if (left == 0) {
        if (k > 0) ++b;
        left = k > 0 ? w.blocksize : w.blocksize - i0 % w.blocksize;
        t = make_table(w.code, bscale[b - b0]);
      }
      if (k % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(q) + k / 2 + 2 * w.K, _MM_HINT_T0);  // next panel
      __m256 e, o;
      decode16(q + k / 2, t, e, o);
      _mm256_storeu_ps(row + k, e);
      _mm256_storeu_ps(row + k + 8, o);
    }
    std::memset(static_cast<void*>(row + w.K), 0, sizeof(float) * (Kp - w.K));
  }
  zero_rows(buf, nr, Kp);
}

PEFTCORE_AVX2_FN void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, float* buf, int64_t Kp) {
  for (int64_t j = 0; j < nr; ++j) {
    const int8_t* src = cb + (n0 + j) * K;
    float* row = buf + j * Kp;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(src) + k + 4 * K, _MM_HINT_T0);  // next panel
      _mm256_storeu_ps(row + k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k)))));
    }
    for (; k < K; ++k) row[k] = static_cast<float>(src[k]);
    std::memset(static_cast<void*>(row + K), 0, sizeof(float) * (Kp - K));
  }
  zero_rows(buf, nr, Kp);
}

namespace {

// MR token rows × 4 weight rows: 4·MR accumulators + MR x vectors + 1 weight vector
// within the 16 ymm registers (MR <= 3).
template <int MR>
PEFTCORE_AVX2_INLINE void dot_f32(const float* buf, const float* x, int64_t Kp, float* out) {
  __m256 acc[MR][4];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 8) {
    __m256 v[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) v[m] = _mm256_loadu_ps(x + m * Kp + k);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = _mm256_loadu_ps(buf + j * Kp + k);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[m][j] = _mm256_fmadd_ps(wv, v[m], acc[m][j]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[m][j]), _mm256_extractf128_ps(acc[m][j], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      out[m * 4 + j] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    }
}

}  // namespace

PEFTCORE_AVX2_FN void panel_dot(const float* buf, const float* xp, int64_t M, int64_t Kp, float* out) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) dot_f32<3>(buf, xp + m * Kp, Kp, out + m * 4);
  if (M - m == 2) dot_f32<2>(buf, xp + m * Kp, Kp, out + m * 4);
  if (M - m == 1) dot_f32<1>(buf, xp + m * Kp, Kp, out + m * 4);
}

}  // namespace peftcore::cpu::quant::avx2

#endif  // PEFTCORE_HAVE_AVX2
