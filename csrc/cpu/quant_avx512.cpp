// AVX-512 kernels of quant.h: decoding bitsandbytes 4-bit / int8 rows into the
// per-thread panel buffer, and the panel × x dot products.
//   4-bit → float32: 32 codes (16 bytes) per step; the block's 16 scaled code values
//     (code·absmax, float32, exactly bitsandbytes' dequantized values) sit in one zmm
//     and vpermps looks up 16 codes at once (it reads only the low 4 bits of each
//     index, so the low nibble needs no masking).
//   4-bit → bfloat16: 64 codes (32 bytes) per step through vpermw on a 32-entry
//     table (the 16 values, rounded to bf16 once, twice over: again no masking), or
//     32 codes per step with 256-bit vpermw when blocks are 32 long.
//   int8 → float32 / bfloat16: integers are exact in both; row scales come later.
//   panel_dot: 4 weight rows × up to 6 token rows of accumulators (fp32 FMA, or
//     vdpbf16ps: bf16 pairs, fp32 accumulation), reduced once per output.
// Covered by tests/ops/ (quantized samples of tests/op_db.py); timed by
// benchmarks/bench_quant.py.
#include "quant_avx512.h"

#if PEFTCORE_HAVE_AVX512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>

#define PEFTCORE_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define PEFTCORE_AVX512BF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define PEFTCORE_AVX512VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

namespace peftcore::cpu::quant::avx512 {
namespace {

template <typename T>
void zero_rows(T* buf, int64_t nr, int64_t Kp) {
  std::memset(static_cast<void*>(buf + nr * Kp), 0, sizeof(T) * (kPanelRows - nr) * Kp);
}

template <typename T>
void zero_tail(T* row, int64_t K, int64_t Kp) {
  std::memset(static_cast<void*>(row + K), 0, sizeof(T) * (Kp - K));
}

// 64 codes (32 bytes at q) through a 32-entry bf16 table (the block's 16 values twice:
// vpermw reads 5 index bits, so the low nibble needs no mask): the even positions (high
// nibbles) into we, the odd ones into wo (quant.h, "Buffer layout").
PEFTCORE_AVX512_FN inline __attribute__((always_inline)) void decode64_bf16(const uint8_t* q, __m512i table,
                                                                            __m512i& we, __m512i& wo) {
  const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  we = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
  wo = _mm512_permutexvar_epi16(v, table);
}

// The even / odd halves of a 64-value chunk of M bf16 token rows (x prepared in that order).
template <int M>
PEFTCORE_AVX512_FN inline __attribute__((always_inline)) void load_x64(const uint16_t* xp, int64_t Kp, int64_t k,
                                                                       __m512i (&xe)[M], __m512i (&xo)[M]) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    xe[m] = _mm512_loadu_si512(xp + m * Kp + k);
    xo[m] = _mm512_loadu_si512(xp + m * Kp + k + 32);
  }
}

}  // namespace

PEFTCORE_AVX512_FN void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0,
                                    int64_t chunk, float* buf, int64_t Kp) {
  // chunk == 32 (chunk_4bit never gives 64 for float32).
  const __m512 code = _mm512_loadu_ps(w.code);
  for (int64_t j = 0; j < nr; ++j) {
    float* row = buf + j * Kp;
    const int64_t i0 = (n0 + j) * w.K;
    const uint8_t* q = w.q + i0 / 2;
    // Block of the current chunk, advanced without a division per chunk.
    int64_t b = i0 / w.blocksize, left = 0;
    __m512 table = code;
    for (int64_t k = 0; k < w.K; k += 32, left -= 32) {
      if (left == 0) {
        if (k > 0) ++b;
        left = k > 0 ? w.blocksize : w.blocksize - i0 % w.blocksize;
        table = _mm512_mul_ps(code, _mm512_set1_ps(bscale[b - b0]));
      }
      if (k % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(q) + k / 2 + 2 * w.K, _MM_HINT_T0);  // next panel
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
      _mm512_storeu_ps(row + k, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table));  // even k: high nibbles
      _mm512_storeu_ps(row + k + 16, _mm512_permutexvar_ps(idx, table));                   // odd k: low nibbles
    }
    zero_tail(row, w.K, Kp);
  }
  zero_rows(buf, nr, Kp);
}

PEFTCORE_AVX512BF16_FN void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0,
                                        int64_t chunk, c10::BFloat16* buf, int64_t Kp) {
  const __m512 code = _mm512_loadu_ps(w.code);
  for (int64_t j = 0; j < nr; ++j) {
    auto* row = reinterpret_cast<uint16_t*>(buf + j * Kp);
    const int64_t i0 = (n0 + j) * w.K;
    const uint8_t* q = w.q + i0 / 2;
    int64_t b = i0 / w.blocksize, left = 0;
    __m256i t16 = _mm256_setzero_si256();
    for (int64_t k = 0; k < w.K; k += chunk, left -= chunk) {
      if (left == 0) {
        if (k > 0) ++b;
        left = k > 0 ? w.blocksize : w.blocksize - i0 % w.blocksize;
        // One rounding: bf16(code · absmax), round to nearest even.
        t16 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(bscale[b - b0])));
      }
      if (k % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(q) + k / 2 + 2 * w.K, _MM_HINT_T0);  // next panel
      if (chunk == 64) {
        __m512i we, wo;
        decode64_bf16(q + k / 2, _mm512_broadcast_i64x4(t16), we, wo);
        _mm512_storeu_si512(row + k, we);
        _mm512_storeu_si512(row + k + 32, wo);
      } else {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k),
                            _mm256_permutexvar_epi16(_mm256_srli_epi16(v, 4), t16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k + 16), _mm256_permutexvar_epi16(v, t16));
      }
    }
    zero_tail(buf + j * Kp, w.K, Kp);
  }
  zero_rows(buf, nr, Kp);
}

// Natural order: 16 bytes hold 32 codes, element 2i in the high nibble of byte i and 2i + 1
// in its low one; interleaving the two nibble vectors byte by byte puts them in order.
namespace {
PEFTCORE_AVX512_FN inline __attribute__((always_inline)) void nibbles_in_order(const uint8_t* q, __m128i& first,
                                                                               __m128i& second) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask), lo = _mm_and_si128(v, mask);
  first = _mm_unpacklo_epi8(hi, lo);  // codes 0..15
  second = _mm_unpackhi_epi8(hi, lo);  // codes 16..31
}
}  // namespace

PEFTCORE_AVX512_FN void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale, int64_t b0,
                                         float* out) {
  const __m512 code = _mm512_loadu_ps(w.code);
  for (int64_t b = e0 / w.blocksize; b * w.blocksize < e1; ++b) {
    const int64_t lo = std::max(e0, b * w.blocksize), hi = std::min(e1, (b + 1) * w.blocksize);
    const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(bscale[b - b0]));
    for (int64_t e = lo; e < hi; e += 32) {
      __m128i first, second;
      nibbles_in_order(w.q + e / 2, first, second);
      _mm512_storeu_ps(out + (e - e0), _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(first), table));
      _mm512_storeu_ps(out + (e - e0) + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(second), table));
    }
  }
}

PEFTCORE_AVX512BF16_FN void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale,
                                             int64_t b0, c10::BFloat16* out_) {
  auto* out = reinterpret_cast<uint16_t*>(out_);
  const __m512 code = _mm512_loadu_ps(w.code);
  for (int64_t b = e0 / w.blocksize; b * w.blocksize < e1; ++b) {
    const int64_t lo = std::max(e0, b * w.blocksize), hi = std::min(e1, (b + 1) * w.blocksize);
    // One rounding: bf16(code · absmax), round to nearest even (as the float32 result's .to(bf16)).
    const __m256i t16 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(bscale[b - b0])));
    const __m512i table = _mm512_broadcast_i64x4(t16);
    for (int64_t e = lo; e < hi; e += 32) {
      __m128i first, second;
      nibbles_in_order(w.q + e / 2, first, second);
      const __m512i idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(second, first));
      _mm512_storeu_si512(out + (e - e0), _mm512_permutexvar_epi16(idx, table));
    }
  }
}

// Rows of W = CB·SCB/127 as bitsandbytes computes them: (CB·SCB)·(1/127) in float32, two
// roundings (two products: nothing to contract into an FMA), then for bf16 one rounding to
// nearest even (as the float32 result's .to(bf16)). 32 values per step, masked tail.
namespace {
template <bool kBf16>
PEFTCORE_AVX512BF16_FN inline __attribute__((always_inline)) void dequant_int8_loop(const int8_t* cb,
                                                                                   const float* scb, int64_t K,
                                                                                   int64_t n0, int64_t n1,
                                                                                   void* out) {
  const __m512 inv127 = _mm512_set1_ps(7.874015718698502e-3f);
  for (int64_t n = n0; n < n1; ++n) {
    const __m512 sc = _mm512_set1_ps(scb[n]);
    const int8_t* src = cb + n * K;
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t c = std::min<int64_t>(32, K - k);
      const __mmask32 m = c == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << c) - 1);
      const __m256i b = _mm256_maskz_loadu_epi8(m, src + k);
      const __m512 lo0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 hi0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      const __m512 lo = _mm512_mul_ps(_mm512_mul_ps(lo0, sc), inv127), hi = _mm512_mul_ps(_mm512_mul_ps(hi0, sc), inv127);
      const int64_t at = (n - n0) * K + k;
      if constexpr (kBf16) {
        _mm512_mask_storeu_epi16(static_cast<uint16_t*>(out) + at, m, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(out) + at, __mmask16(m), lo);
        _mm512_mask_storeu_ps(static_cast<float*>(out) + at + 16, __mmask16(m >> 16), hi);
      }
    }
  }
}
}  // namespace

PEFTCORE_AVX512BF16_FN void dequant_int8_rows(const int8_t* cb, const float* scb, int64_t K, int64_t n0, int64_t n1,
                                              c10::BFloat16* out) {
  dequant_int8_loop<true>(cb, scb, K, n0, n1, out);
}

PEFTCORE_AVX512_FN void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, float* buf, int64_t Kp) {
  for (int64_t j = 0; j < nr; ++j) {
    const int8_t* src = cb + (n0 + j) * K;
    float* row = buf + j * Kp;
    for (int64_t k = 0; k < K; k += 16) {
      const int64_t n = std::min<int64_t>(16, K - k);
      const __mmask16 m = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(src) + k + 4 * K, _MM_HINT_T0);  // next panel
      // Masked lanes load zeros: the padding of the row is written here too.
      const __m128i b = _mm_maskz_loadu_epi8(m, src + k);
      _mm512_storeu_ps(row + k, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
    }
    zero_tail(row, (K + 15) / 16 * 16, Kp);
  }
  zero_rows(buf, nr, Kp);
}

PEFTCORE_AVX512BF16_FN void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, c10::BFloat16* buf,
                                        int64_t Kp) {
  for (int64_t j = 0; j < nr; ++j) {
    const int8_t* src = cb + (n0 + j) * K;
    auto* row = reinterpret_cast<uint16_t*>(buf + j * Kp);
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t n = std::min<int64_t>(32, K - k);
      const __mmask32 m = n == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
      _mm_prefetch(reinterpret_cast<const char*>(src) + k + 4 * K, _MM_HINT_T0);  // next panel
      const __m256i b = _mm256_maskz_loadu_epi8(m, src + k);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      _mm512_storeu_si512(row + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // exact: |v| <= 128
    }
    zero_tail(buf + j * Kp, (K + 31) / 32 * 32, Kp);
  }
  zero_rows(buf, nr, Kp);
}

namespace {

// MR token rows × 4 weight rows; U independent accumulator sets along k so that
// small MR still keeps enough FMA chains in flight (latency 4, two ports).
template <int MR, int U>
PEFTCORE_AVX512_FN inline __attribute__((always_inline)) void dot_f32(const float* buf, const float* x, int64_t Kp,
                                                                       float* out) {
  __m512 acc[U][MR][4];
#pragma GCC unroll 64
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) acc[u][m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 16 * U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const int64_t kk = k + 16 * u;
      const __m512 w0 = _mm512_loadu_ps(buf + kk), w1 = _mm512_loadu_ps(buf + Kp + kk);
      const __m512 w2 = _mm512_loadu_ps(buf + 2 * Kp + kk), w3 = _mm512_loadu_ps(buf + 3 * Kp + kk);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 v = _mm512_loadu_ps(x + m * Kp + kk);
        acc[u][m][0] = _mm512_fmadd_ps(w0, v, acc[u][m][0]);
        acc[u][m][1] = _mm512_fmadd_ps(w1, v, acc[u][m][1]);
        acc[u][m][2] = _mm512_fmadd_ps(w2, v, acc[u][m][2]);
        acc[u][m][3] = _mm512_fmadd_ps(w3, v, acc[u][m][3]);
      }
    }
  }
#pragma GCC unroll 64
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) {
      __m512 s = acc[0][m][j];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][m][j]);
      out[m * 4 + j] = _mm512_reduce_add_ps(s);
    }
}

template <int MR, int U>
PEFTCORE_AVX512BF16_FN inline __attribute__((always_inline)) void dot_bf16(const uint16_t* buf, const uint16_t* x,
                                                                           int64_t Kp, float* out) {
  __m512 acc[U][MR][4];
#pragma GCC unroll 64
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) acc[u][m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 32 * U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const int64_t kk = k + 32 * u;
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(buf + kk);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(buf + Kp + kk);
      const __m512bh w2 = (__m512bh)_mm512_loadu_si512(buf + 2 * Kp + kk);
      const __m512bh w3 = (__m512bh)_mm512_loadu_si512(buf + 3 * Kp + kk);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512bh v = (__m512bh)_mm512_loadu_si512(x + m * Kp + kk);
        acc[u][m][0] = _mm512_dpbf16_ps(acc[u][m][0], w0, v);
        acc[u][m][1] = _mm512_dpbf16_ps(acc[u][m][1], w1, v);
        acc[u][m][2] = _mm512_dpbf16_ps(acc[u][m][2], w2, v);
        acc[u][m][3] = _mm512_dpbf16_ps(acc[u][m][3], w3, v);
      }
    }
  }
#pragma GCC unroll 64
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) {
      __m512 s = acc[0][m][j];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][m][j]);
      out[m * 4 + j] = _mm512_reduce_add_ps(s);
    }
}

// ---- fused GEMV for 1-2 token rows: decode in registers, no panel buffer.

// A panel's 4 rows are 4 interleaved streams over one contiguous range (4·K/2 bytes
// for 4-bit); the hardware prefetchers alone leave a single thread at a fraction of
// the memory bandwidth. Per 64 codes of each row (2 cache lines of the panel), fetch
// the matching 2 lines three panels ahead (1-12 panels and the T0 / T2 hints measured no
// better on Zen 5).
PEFTCORE_AVX512_FN inline __attribute__((always_inline)) void prefetch_next_panel(const uint8_t* panel, int64_t K,
                                                                                  int64_t k) {
  const char* next = reinterpret_cast<const char*>(panel) + 6 * K + 2 * k;
  _mm_prefetch(next, _MM_HINT_T1);
  _mm_prefetch(next + 64, _MM_HINT_T1);
}

// A full panel's 4 rows: their packed codes and their float32 block scales (bs_row0 holds
// the panel's scales row after row, blocks each).
struct PanelRows {
  const uint8_t* q[4];
  const float* sc[4];
  PanelRows(const Packed4& w, int64_t n0, const float* bs_row0, int64_t blocks) {
    for (int r = 0; r < 4; ++r) {
      q[r] = w.q + (n0 + r) * w.K / 2;
      sc[r] = bs_row0 + r * blocks;
    }
  }
};

// 4 rows × M token rows, bf16 products: the 16 code values rounded to bf16 once
// (vpermw table), each block's partial dot products scaled by its float32 absmax.
template <int M>
PEFTCORE_AVX512BF16_FN inline __attribute__((always_inline)) void gemv_4bit_bf16(const Packed4& w, int64_t n0,
                                                                                 const float* bs_row0,
                                                                                 const uint16_t* xp, int64_t Kp,
                                                                                 float* out) {
  const int64_t K = w.K, bs = w.blocksize, blocks = K / bs;
  const __m512i table = _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w.code)));
  const PanelRows rows(w, n0, bs_row0, blocks);
  const uint8_t* const* q = rows.q;
  const float* const* sc = rows.sc;
  __m512 acc[M][4];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m512 p[M][4];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) p[m][r] = _mm512_setzero_ps();
    for (int64_t k = blk * bs; k < (blk + 1) * bs; k += 64) {
      prefetch_next_panel(q[0], K, k);
      __m512i xe[M], xo[M], we, wo;
      load_x64<M>(xp, Kp, k, xe, xo);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        decode64_bf16(q[r] + k / 2, table, we, wo);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          p[m][r] = _mm512_dpbf16_ps(p[m][r], (__m512bh)we, (__m512bh)xe[m]);
          p[m][r] = _mm512_dpbf16_ps(p[m][r], (__m512bh)wo, (__m512bh)xo[m]);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m512 s = _mm512_set1_ps(sc[r][blk]);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(p[m][r], s, acc[m][r]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) out[m * 4 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// 4 rows × MR (<= 4) token rows, bf16 products, for 3+ token rows: per row and block,
// the 16 scaled code values rounded once, bf16(code · absmax), as decode_4bit writes them
// (so the sums equal the panel buffer's up to their order), twice over in one zmm
// (vcvtne2ps2bf16) for vpermw; each 64-code step of a row decoded in registers and
// multiplied by every token row of the group. The decode (shuffles) and the dot products
// (vdpbf16ps) overlap, where decode + panel_dot runs them one after the other; the caller
// re-decodes the panel for each group of MR token rows, which costs little next to the
// MR·8 dot products per step. out[m * 4 + r]: token row m, panel row r.
template <int MR>
PEFTCORE_AVX512BF16_FN inline __attribute__((always_inline)) void fused_4bit_bf16(
    const Packed4& w, int64_t n0, const float* bs_row0, const uint16_t* xp, int64_t Kp, bool prefetch, float* out) {
  const int64_t K = w.K, bs = w.blocksize, blocks = K / bs;
  const __m512 code = _mm512_loadu_ps(w.code);
  const PanelRows rows(w, n0, bs_row0, blocks);
  const uint8_t* const* q = rows.q;
  const float* const* sc = rows.sc;
  __m512 acc[MR][4];
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m512i t[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m512 s = _mm512_mul_ps(code, _mm512_set1_ps(sc[r][blk]));
      t[r] = (__m512i)_mm512_cvtne2ps_pbh(s, s);
    }
    for (int64_t k = blk * bs; k < (blk + 1) * bs; k += 64) {
      if (prefetch) prefetch_next_panel(q[0], K, k);
      __m512i xe[MR], xo[MR], we, wo;
      load_x64<MR>(xp, Kp, k, xe, xo);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        decode64_bf16(q[r] + k / 2, t[r], we, wo);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)we, (__m512bh)xe[m]);
          acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wo, (__m512bh)xo[m]);
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) out[m * 4 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// 4 rows × M token rows, float32 products of exact values: each block's 16 scaled
// code values (code·absmax) in one zmm, looked up by vpermps.
template <int M>
PEFTCORE_AVX512_FN inline __attribute__((always_inline)) void gemv_4bit_f32(const Packed4& w, int64_t n0,
                                                                            const float* bs_row0, const float* xp,
                                                                            int64_t Kp, float* out) {
  const int64_t K = w.K, bs = w.blocksize, blocks = K / bs;
  const __m512 code = _mm512_loadu_ps(w.code);
  const PanelRows rows(w, n0, bs_row0, blocks);
  const uint8_t* const* q = rows.q;
  const float* const* sc = rows.sc;
  __m512 acc[2][M][4];  // even / odd halves: twice the independent FMA chains
#pragma GCC unroll 16
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) acc[h][m][r] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m512 t[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) t[r] = _mm512_mul_ps(code, _mm512_set1_ps(sc[r][blk]));
    for (int64_t k = blk * bs; k < (blk + 1) * bs; k += 32) {
      if (k % 64 == 0) prefetch_next_panel(q[0], K, k);
      __m512 xe[M], xo[M];
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        xe[m] = _mm512_loadu_ps(xp + m * Kp + k);
        xo[m] = _mm512_loadu_ps(xp + m * Kp + k + 16);
      }
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + k / 2)));
        const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t[r]);
        const __m512 wo = _mm512_permutexvar_ps(v, t[r]);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          acc[0][m][r] = _mm512_fmadd_ps(we, xe[m], acc[0][m][r]);
          acc[1][m][r] = _mm512_fmadd_ps(wo, xo[m], acc[1][m][r]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) out[m * 4 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m][r], acc[1][m][r]));
}

// 4 rows × M token rows of int8 against float32 x (integers exact; row scales later).
template <int M>
PEFTCORE_AVX512_FN inline __attribute__((always_inline)) void gemv_int8_f32(const int8_t* cb, int64_t K, int64_t n0,
                                                                            const float* xp, int64_t Kp, float* out) {
  const int8_t* q[4];
  for (int r = 0; r < 4; ++r) q[r] = cb + (n0 + r) * K;
  __m512 acc[2][M][4];
#pragma GCC unroll 16
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) acc[h][m][r] = _mm512_setzero_ps();
  // Whole 32-value steps, then one masked step (masked lanes load 0; x is zero-padded).
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t n = std::min<int64_t>(32, K - k);
    const __mmask32 mask = n == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
    // 4 rows × 32 int8 = 2 cache lines per step, one panel (4·K bytes) ahead.
    _mm_prefetch(reinterpret_cast<const char*>(q[0]) + 4 * K + 4 * k, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q[0]) + 4 * K + 4 * k + 64, _MM_HINT_T0);
    __m512 x0[M], x1[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      x0[m] = _mm512_loadu_ps(xp + m * Kp + k);
      x1[m] = _mm512_loadu_ps(xp + m * Kp + k + 16);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256i b = _mm256_maskz_loadu_epi8(mask, q[r] + k);
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        acc[0][m][r] = _mm512_fmadd_ps(w0, x0[m], acc[0][m][r]);
        acc[1][m][r] = _mm512_fmadd_ps(w1, x1[m], acc[1][m][r]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) out[m * 4 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m][r], acc[1][m][r]));
}

}  // namespace

PEFTCORE_AVX512BF16_FN void gemv_4bit(const Packed4& w, int64_t n0, const float* bs_row0, const c10::BFloat16* xp,
                                      int64_t M, int64_t Kp, float* out) {
  const auto* x = reinterpret_cast<const uint16_t*>(xp);
  if (M == 1) return gemv_4bit_bf16<1>(w, n0, bs_row0, x, Kp, out);
  gemv_4bit_bf16<2>(w, n0, bs_row0, x, Kp, out);
}
PEFTCORE_AVX512BF16_FN void fused_4bit(const Packed4& w, int64_t n0, const float* bs_row0, const c10::BFloat16* xp,
                                       int64_t M, int64_t Kp, float* out) {
  const auto* x = reinterpret_cast<const uint16_t*>(xp);
  // Groups of at most 4 token rows, as even as possible (7 = 4 + 3): 16 accumulators,
  // 8 x vectors and the 4 tables fit the 32 registers (5-6 rows spilled: measured slower).
  // Each group runs over the whole of K (walking K in L1-sized chunks for all groups, or
  // making the tables once per panel for all groups, measured slower on Zen 5). Only the
  // first group prefetches the next panel.
  const int64_t groups = (M + 3) / 4;
  for (int64_t g = 0, m0 = 0; g < groups; ++g) {
    const int64_t mr = (M - m0) / (groups - g);
    const uint16_t* xg = x + m0 * Kp;
    float* og = out + m0 * 4;
    switch (mr) {
      case 4: fused_4bit_bf16<4>(w, n0, bs_row0, xg, Kp, g == 0, og); break;
      case 3: fused_4bit_bf16<3>(w, n0, bs_row0, xg, Kp, g == 0, og); break;
      default: fused_4bit_bf16<2>(w, n0, bs_row0, xg, Kp, g == 0, og); break;  // M >= 3: groups of >= 2
    }
    m0 += mr;
  }
}
PEFTCORE_AVX512_FN void gemv_4bit(const Packed4& w, int64_t n0, const float* bs_row0, const float* xp, int64_t M,
                                  int64_t Kp, float* out) {
  if (M == 1) return gemv_4bit_f32<1>(w, n0, bs_row0, xp, Kp, out);
  gemv_4bit_f32<2>(w, n0, bs_row0, xp, Kp, out);
}
PEFTCORE_AVX512_FN void gemv_int8(const int8_t* cb, int64_t K, int64_t n0, const float* xp, int64_t M, int64_t Kp,
                                  float* out) {
  if (M == 1) return gemv_int8_f32<1>(cb, K, n0, xp, Kp, out);
  gemv_int8_f32<2>(cb, K, n0, xp, Kp, out);
}

// ---- double-quantized block scales: out[b - b0] = ncode[qabsmax[b]] · nabsmax[g] + offset.
// The 256-entry code is looked up in registers, never by a gather (a 16-lane gather cost
// ~16 cycles on AMD Zen 5: as much as the 4-bit GEMV's own work per block at one token).
//   AVX512_VBMI: 64 blocks per step, each byte of the float32 values from its own 256-byte
//     plane (NestedCode): two vpermi2b (128 entries each, index bits 0-6) and a blend on
//     bit 7 per plane, then the 4 planes interleaved back into floats by 8 unpacks; the
//     unpacks work within 128-bit lanes, so the indices are first permuted (one vpermb)
//     into the order that makes the unpacked floats come out in sequence.
//   else: 16 per step, vpermi2ps on 32 entries at a time and 7 blends on index bits 5-7.
// The _round_ intrinsics are builtins the compiler never fuses into an FMA: the product
// and the sum are rounded separately, exactly as bitsandbytes computes them.
#define PEFTCORE_AVX512VBMI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma")))
namespace {
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

PEFTCORE_AVX512_FN inline __attribute__((always_inline)) __m512 lookup256(const __m512 (&t)[16], __m512i idx) {
  __m512 r[8];
#pragma GCC unroll 8
  for (int g = 0; g < 8; ++g) r[g] = _mm512_permutex2var_ps(t[2 * g], idx, t[2 * g + 1]);
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) r[g] = _mm512_mask_blend_ps(b5, r[2 * g], r[2 * g + 1]);
  r[0] = _mm512_mask_blend_ps(b6, r[0], r[1]);
  r[1] = _mm512_mask_blend_ps(b6, r[2], r[3]);
  return _mm512_mask_blend_ps(b7, r[0], r[1]);
}

PEFTCORE_AVX512_FN void nested_scales_f32(const uint8_t* qabsmax, const float* ncode, const float* nabsmax,
                                          float offset, int64_t nbs, int64_t b0, int64_t b1, float* out) {
  const __m512 off = _mm512_set1_ps(offset);
  __m512 t[16];
  for (int i = 0; i < 16; ++i) t[i] = _mm512_loadu_ps(ncode + 16 * i);
  int64_t b = b0;
  while (b < b1) {
    const int64_t g = b / nbs, e = std::min(b1, (g + 1) * nbs);  // one nested group: one nested absmax
    const __m512 a2 = _mm512_set1_ps(nabsmax[g]);
    // Step by n, not 16: a group's last step is partial, and the next group starts at e.
    for (int64_t n; b < e; b += n) {
      n = std::min<int64_t>(16, e - b);
      const __mmask16 m = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
      const __m512 c = lookup256(t, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, qabsmax + b)));
      const __m512 v = _mm512_add_round_ps(_mm512_mul_round_ps(c, a2, kRound), off, kRound);
      _mm512_mask_storeu_ps(out + (b - b0), m, v);
    }
  }
}

// Unpacked output k (16 floats), lane L, slot j (0-3) takes input byte 16L + 4k + j; it
// must hold block 16k + 4L + j, so the indices go in through this byte permutation.
constexpr std::array<uint8_t, 64> unpack_order() {
  std::array<uint8_t, 64> o{};
  for (int k = 0; k < 4; ++k)
    for (int L = 0; L < 4; ++L)
      for (int j = 0; j < 4; ++j) o[16 * L + 4 * k + j] = static_cast<uint8_t>(16 * k + 4 * L + j);
  return o;
}
alignas(64) constexpr std::array<uint8_t, 64> kUnpackOrder = unpack_order();

PEFTCORE_AVX512VBMI_FN void nested_scales_vbmi(const uint8_t* qabsmax, const uint8_t* planes, const float* nabsmax,
                                               float offset, int64_t nbs, int64_t b0, int64_t b1, float* out) {
  const __m512 off = _mm512_set1_ps(offset);
  __m512i t[4][4];  // plane p: entries 0-63, 64-127, 128-191, 192-255
  for (int p = 0; p < 4; ++p)
    for (int q = 0; q < 4; ++q) t[p][q] = _mm512_loadu_si512(planes + p * 256 + q * 64);
  const __m512i perm = _mm512_load_si512(kUnpackOrder.data());
  int64_t b = b0;
  while (b < b1) {
    const int64_t g = b / nbs, e = std::min(b1, (g + 1) * nbs);
    const __m512 a2 = _mm512_set1_ps(nabsmax[g]);
    for (int64_t n; b < e; b += n) {
      n = std::min<int64_t>(64, e - b);
      const __mmask64 m = n == 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
      const __m512i idx = _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi8(m, qabsmax + b));
      const __mmask64 top = _mm512_movepi8_mask(idx);  // bit 7: entries 128-255
      __m512i by[4];
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        by[p] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t[p][0], idx, t[p][1]),
                                       _mm512_permutex2var_epi8(t[p][2], idx, t[p][3]));
      }
      const __m512i w01l = _mm512_unpacklo_epi8(by[0], by[1]), w01h = _mm512_unpackhi_epi8(by[0], by[1]);
      const __m512i w23l = _mm512_unpacklo_epi8(by[2], by[3]), w23h = _mm512_unpackhi_epi8(by[2], by[3]);
      const __m512i f[4] = {_mm512_unpacklo_epi16(w01l, w23l), _mm512_unpackhi_epi16(w01l, w23l),
                            _mm512_unpacklo_epi16(w01h, w23h), _mm512_unpackhi_epi16(w01h, w23h)};
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const int64_t c = std::min<int64_t>(16, n - 16 * k);
        if (c <= 0) break;
        const __mmask16 mk = c == 16 ? __mmask16(0xFFFF) : __mmask16((1u << c) - 1);
        const __m512 v = _mm512_add_round_ps(_mm512_mul_round_ps(_mm512_castsi512_ps(f[k]), a2, kRound), off, kRound);
        _mm512_mask_storeu_ps(out + (b - b0) + 16 * k, mk, v);
      }
    }
  }
}
}  // namespace

PEFTCORE_AVX512_FN void nested_scales(const uint8_t* qabsmax, const NestedCode& ncode, const float* nabsmax,
                                      float offset, int64_t nbs, int64_t b0, int64_t b1, float* out) {
  // PEFTCORE_CPU_ISA=avx512-novbmi takes the other lookup on a CPU with VBMI (how the tests
  // cover both: tests/ops/test_quantized_ops.py, test_lower_isa_kernels_...).
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi") && [] {
    const char* isa = std::getenv("PEFTCORE_CPU_ISA");
    return isa == nullptr || std::strcmp(isa, "avx512-novbmi") != 0;
  }();
  if (vbmi) return nested_scales_vbmi(qabsmax, ncode.planes, nabsmax, offset, nbs, b0, b1, out);
  nested_scales_f32(qabsmax, ncode.values, nabsmax, offset, nbs, b0, b1, out);
}

// ---- int8 weights × int16 x (AVX512_VNNI vpdpwssd: 32 exact products per instruction).
// A lane gains at most 2·127·32767 < 2^23.1 per step: int32 is safe for 128 steps (4096
// values of k); each such segment is then added to the float32 result.
constexpr int64_t kInt16Segment = 4096;

PEFTCORE_AVX512VNNI_FN void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, int16_t* buf,
                                        int64_t Kp) {
  for (int64_t j = 0; j < nr; ++j) {
    const int8_t* src = cb + (n0 + j) * K;
    int16_t* row = buf + j * Kp;
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t n = std::min<int64_t>(32, K - k);
      const __mmask32 m = n == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(src) + k + 4 * K, _MM_HINT_T0);  // next panel
      _mm512_storeu_si512(row + k, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, src + k)));
    }
    std::memset(static_cast<void*>(row + (K + 31) / 32 * 32), 0, sizeof(int16_t) * (Kp - (K + 31) / 32 * 32));
  }
  zero_rows(buf, nr, Kp);
}

namespace {

template <int MR>
PEFTCORE_AVX512VNNI_FN inline __attribute__((always_inline)) void dot_i16(const int16_t* buf, const int16_t* x,
                                                                          int64_t Kp, float* out) {
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) out[m * 4 + j] = 0.f;
  for (int64_t k0 = 0; k0 < Kp; k0 += kInt16Segment) {
    __m512i acc[MR][4];
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
    for (int64_t k = k0; k < std::min(Kp, k0 + kInt16Segment); k += 32) {
      const __m512i w0 = _mm512_loadu_si512(buf + k), w1 = _mm512_loadu_si512(buf + Kp + k);
      const __m512i w2 = _mm512_loadu_si512(buf + 2 * Kp + k), w3 = _mm512_loadu_si512(buf + 3 * Kp + k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512i v = _mm512_loadu_si512(x + m * Kp + k);
        acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], w0, v);
        acc[m][1] = _mm512_dpwssd_epi32(acc[m][1], w1, v);
        acc[m][2] = _mm512_dpwssd_epi32(acc[m][2], w2, v);
        acc[m][3] = _mm512_dpwssd_epi32(acc[m][3], w3, v);
      }
    }
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) out[m * 4 + j] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[m][j]));
  }
}

template <int M>
PEFTCORE_AVX512VNNI_FN inline __attribute__((always_inline)) void gemv_int8_i16(const int8_t* cb, int64_t K,
                                                                                int64_t n0, const int16_t* xp,
                                                                                int64_t Kp, float* out) {
  const int8_t* q[4];
  for (int r = 0; r < 4; ++r) q[r] = cb + (n0 + r) * K;
  __m512 facc[M][4];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) facc[m][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += kInt16Segment) {
    __m512i acc[M][4];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_si512();
    for (int64_t k = k0; k < std::min(K, k0 + kInt16Segment); k += 32) {
      const int64_t n = std::min<int64_t>(32, K - k);
      const __mmask32 mask = n == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
      _mm_prefetch(reinterpret_cast<const char*>(q[0]) + 4 * K + 4 * k, _MM_HINT_T0);  // next panel
      _mm_prefetch(reinterpret_cast<const char*>(q[0]) + 4 * K + 4 * k + 64, _MM_HINT_T0);
      __m512i v[M];
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) v[m] = _mm512_loadu_si512(xp + m * Kp + k);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, q[r] + k));
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], wv, v[m]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) facc[m][r] = _mm512_add_ps(facc[m][r], _mm512_cvtepi32_ps(acc[m][r]));
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) out[m * 4 + r] = _mm512_reduce_add_ps(facc[m][r]);
}

}  // namespace

PEFTCORE_AVX512VNNI_FN void gemv_int8(const int8_t* cb, int64_t K, int64_t n0, const int16_t* xp, int64_t M,
                                      int64_t Kp, float* out) {
  if (M == 1) return gemv_int8_i16<1>(cb, K, n0, xp, Kp, out);
  gemv_int8_i16<2>(cb, K, n0, xp, Kp, out);
}

PEFTCORE_AVX512VNNI_FN void panel_dot(const int16_t* buf, const int16_t* xp, int64_t M, int64_t Kp, float* out) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) dot_i16<6>(buf, xp + m * Kp, Kp, out + m * 4);
  switch (M - m) {
    case 5: dot_i16<5>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 4: dot_i16<4>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 3: dot_i16<3>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 2: dot_i16<2>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 1: dot_i16<1>(buf, xp + m * Kp, Kp, out + m * 4); break;
    default: break;
  }
}

// Kp is a multiple of kChunk (64): whole vectors, and an even number of them.
PEFTCORE_AVX512_FN void panel_dot(const float* buf, const float* xp, int64_t M, int64_t Kp, float* out) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) dot_f32<6, 1>(buf, xp + m * Kp, Kp, out + m * 4);
  switch (M - m) {
    case 5: dot_f32<5, 1>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 4: dot_f32<4, 1>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 3: dot_f32<3, 2>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 2: dot_f32<2, 2>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 1: dot_f32<1, 4>(buf, xp + m * Kp, Kp, out + m * 4); break;
    default: break;
  }
}

PEFTCORE_AVX512BF16_FN void panel_dot(const c10::BFloat16* buf_, const c10::BFloat16* xp_, int64_t M, int64_t Kp,
                                      float* out) {
  const auto* buf = reinterpret_cast<const uint16_t*>(buf_);
  const auto* xp = reinterpret_cast<const uint16_t*>(xp_);
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) dot_bf16<6, 1>(buf, xp + m * Kp, Kp, out + m * 4);
  switch (M - m) {
    case 5: dot_bf16<5, 1>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 4: dot_bf16<4, 1>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 3: dot_bf16<3, 2>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 2: dot_bf16<2, 2>(buf, xp + m * Kp, Kp, out + m * 4); break;
    case 1: dot_bf16<1, 2>(buf, xp + m * Kp, Kp, out + m * 4); break;
    default: break;
  }
}

}  // namespace peftcore::cpu::quant::avx512

#endif  // PEFTCORE_HAVE_AVX512
