// Portable kernels of quant.h (natural-order buffers, chunk 1) and the run-time
// choice between them and the AVX-512 ones of quant_avx512.cpp. The plain C++ here is
// compiled three times (x86-64-v4, v3 = AVX2+FMA, baseline) and the loader picks one
// per CPU, as in lowrank_kernels.cpp; float64 (gradcheck) always runs here.
// Covered by tests/ops/ (quantized samples of tests/op_db.py, also with
// PEFTCORE_CPU_ISA=generic in tests/test_isa_generic.py); timed by
// benchmarks/bench_quant.py.
#include "quant.h"

#include <c10/util/Exception.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "clones.h"
#include "lowrank.h"
#include "quant_avx2.h"
#include "quant_avx512.h"


namespace peftcore::cpu::quant {
namespace generic {

// W = code·absmax computed in float32 (float64 for double buffers), then rounded
// once into the buffer's type (bf16: as the SIMD decoder's table).
template <typename T, typename F = std::conditional_t<std::is_same_v<T, double>, double, float>>
PEFTCORE_INLINE void decode_4bit_impl(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0,
                                      T* buf, int64_t Kp) {
  F code[16];
  for (int i = 0; i < 16; ++i) code[i] = static_cast<F>(w.code[i]);
  for (int64_t j = 0; j < kPanelRows; ++j) {
    T* row = buf + j * Kp;
    if (j >= nr) {
      std::fill(row, row + Kp, T(0));
      continue;
    }
    const int64_t start = (n0 + j) * w.K;
    // Walk the row block by block, so the scale is looked up once per block.
    for (int64_t k = 0; k < w.K;) {
      const int64_t i = start + k;
      const int64_t b = i / w.blocksize;
      const int64_t seg = std::min(w.K - k, (b + 1) * w.blocksize - i);
      const F s = static_cast<F>(bscale[b - b0]);
      for (int64_t t = 0; t < seg; ++t) {
        const int64_t e = i + t;
        const uint8_t byte = w.q[e >> 1];
        row[k + t] = static_cast<T>(code[(e & 1) ? (byte & 0xF) : (byte >> 4)] * s);
      }
      k += seg;
    }
    std::fill(row + w.K, row + Kp, T(0));
  }
}

template <typename T>
PEFTCORE_INLINE void decode_int8_impl(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, T* buf, int64_t Kp) {
  for (int64_t j = 0; j < kPanelRows; ++j) {
    T* row = buf + j * Kp;
    if (j >= nr) {
      std::fill(row, row + Kp, T(0));
      continue;
    }
    const int8_t* src = cb + (n0 + j) * K;
    for (int64_t k = 0; k < K; ++k) row[k] = static_cast<T>(src[k]);
    std::fill(row + K, row + Kp, T(0));
  }
}

// Without -ffast-math the compiler may not reorder a sum: `omp simd reduction`
// grants it for these accumulators only (see lowrank_kernels.cpp).
template <typename T>
PEFTCORE_INLINE void panel_dot_impl(const T* buf, const T* xp, int64_t M, int64_t Kp, T* out) {
  static_assert(kPanelRows == 4, "the accumulators below are written out for 4 rows");
  const T *w0 = buf, *w1 = buf + Kp, *w2 = buf + 2 * Kp, *w3 = buf + 3 * Kp;
  for (int64_t m = 0; m < M; ++m) {
    const T* x = xp + m * Kp;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < Kp; ++k) {
      const T v = x[k];
      s0 += w0[k] * v; s1 += w1[k] * v; s2 += w2[k] * v; s3 += w3[k] * v;
    }
    out[m * 4 + 0] = s0; out[m * 4 + 1] = s1; out[m * 4 + 2] = s2; out[m * 4 + 3] = s3;
  }
}

PEFTCORE_CLONES void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, float* buf,
                                 int64_t Kp) {
  decode_4bit_impl(w, n0, nr, bscale, b0, buf, Kp);
}
PEFTCORE_CLONES void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0,
                                 c10::BFloat16* buf, int64_t Kp) {
  decode_4bit_impl(w, n0, nr, bscale, b0, buf, Kp);
}
PEFTCORE_CLONES void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0,
                                 double* buf, int64_t Kp) {
  decode_4bit_impl(w, n0, nr, bscale, b0, buf, Kp);
}
PEFTCORE_CLONES void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, float* buf, int64_t Kp) {
  decode_int8_impl(cb, K, n0, nr, buf, Kp);
}
PEFTCORE_CLONES void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, int16_t* buf, int64_t Kp) {
#if PEFTCORE_HAVE_AVX512
  if (int16_dot_available()) return avx512::decode_int8(cb, K, n0, nr, buf, Kp);
#endif
  TORCH_CHECK(false, "peftcore: internal error: int16 decode without AVX512_VNNI");
}
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, double* buf, int64_t Kp) {
  decode_int8_impl(cb, K, n0, nr, buf, Kp);
}
PEFTCORE_CLONES void panel_dot(const float* buf, const float* xp, int64_t M, int64_t Kp, float* out) {
  panel_dot_impl(buf, xp, M, Kp, out);
}
PEFTCORE_CLONES void panel_dot(const int16_t* buf, const int16_t* xp, int64_t M, int64_t Kp, float* out) {
#if PEFTCORE_HAVE_AVX512
  if (int16_dot_available()) return avx512::panel_dot(buf, xp, M, Kp, out);
#endif
  TORCH_CHECK(false, "peftcore: internal error: int16 dot without AVX512_VNNI");
}
void panel_dot(const double* buf, const double* xp, int64_t M, int64_t Kp, double* out) {
  panel_dot_impl(buf, xp, M, Kp, out);
}

// Not cloned, and contraction into an FMA is off (an AVX2 baseline build has FMA):
// the product and the sum are rounded separately, as bitsandbytes computes them.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void nested_scales(const uint8_t* qabsmax, const float* ncode, const float* nabsmax, float offset, int64_t nbs,
                   int64_t b0, int64_t b1, float* out) {
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
  int64_t b = b0;
  for (int64_t g = b0 / nbs; b < b1; ++g) {  // one group of nested blocks at a time
    const float a2 = nabsmax[g];
    for (const int64_t e = std::min(b1, (g + 1) * nbs); b < e; ++b) {
      const float t = ncode[qabsmax[b]] * a2;
      out[b - b0] = t + offset;
    }
  }
}

}  // namespace generic

// ------------------------------------------------------------------ dispatch
bool simd_available() { return PEFTCORE_HAVE_AVX512 && use_avx512(); }

namespace {
// AVX2 + FMA kernels where AVX-512 is off (absent, or PEFTCORE_CPU_ISA=avx2) and the
// CPU has them, unless PEFTCORE_CPU_ISA=generic.
bool use_avx2() {
#if PEFTCORE_HAVE_AVX2
  static const bool yes = [] {
    const char* isa = std::getenv("PEFTCORE_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes && !simd_available();
#else
  return false;
#endif
}
}  // namespace

bool bf16_dot_available() {
#if PEFTCORE_HAVE_AVX512
  static const bool yes = use_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

bool amx_available() {
  static const bool yes = [] {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) != 0;  // CPUID.7.0:EDX[22] AMX-BF16
#else
    return false;
#endif
  }();
  return yes;
}

bool int16_dot_available() {
#if PEFTCORE_HAVE_AVX512
  static const bool yes = use_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
#else
  return false;
#endif
}

NestedCode::NestedCode(const float* v) : values(v) {
  for (int i = 0; i < 256; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, 4);
    for (int p = 0; p < 4; ++p) planes[p * 256 + i] = static_cast<uint8_t>(bits >> (8 * p));
  }
}

void nested_scales(const uint8_t* qabsmax, const NestedCode& ncode, const float* nabsmax, float offset, int64_t nbs,
                   int64_t b0, int64_t b1, float* out) {
#if PEFTCORE_HAVE_AVX512
  if (simd_available()) return avx512::nested_scales(qabsmax, ncode, nabsmax, offset, nbs, b0, b1, out);
#endif
  generic::nested_scales(qabsmax, ncode.values, nabsmax, offset, nbs, b0, b1, out);
}

int64_t chunk_4bit(int64_t K, int64_t blocksize, bool bf16) {
  if (use_avx2() && !bf16) return K % 16 == 0 && blocksize % 16 == 0 ? 16 : 1;
  if (!simd_available()) return 1;
  // A SIMD chunk must lie inside one absmax block and start on a byte: every row
  // start (n·K) and block boundary must fall on a chunk boundary.
  for (int64_t c : {int64_t(64), int64_t(32)}) {
    if (c == 64 && !bf16) continue;  // the float32 decoder works on 32 codes (one zmm per half)
    if (K % c == 0 && blocksize % c == 0) return c;
  }
  return 1;
}

void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk, float* buf,
                 int64_t Kp) {
#if PEFTCORE_HAVE_AVX2
  if (chunk == 16) return avx2::decode_4bit(w, n0, nr, bscale, b0, buf, Kp);
#endif
#if PEFTCORE_HAVE_AVX512
  if (chunk > 1) return avx512::decode_4bit(w, n0, nr, bscale, b0, chunk, buf, Kp);
#endif
  TORCH_CHECK(chunk == 1, "peftcore: internal error: chunk ", chunk, " without AVX-512");
  generic::decode_4bit(w, n0, nr, bscale, b0, buf, Kp);
}
void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk,
                 c10::BFloat16* buf, int64_t Kp) {
#if PEFTCORE_HAVE_AVX512
  if (chunk > 1) return avx512::decode_4bit(w, n0, nr, bscale, b0, chunk, buf, Kp);
#endif
  TORCH_CHECK(chunk == 1, "peftcore: internal error: chunk ", chunk, " without AVX-512");
  generic::decode_4bit(w, n0, nr, bscale, b0, buf, Kp);
}
void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk, double* buf,
                 int64_t Kp) {
  TORCH_CHECK(chunk == 1, "peftcore: internal error: chunk ", chunk, " for float64");
  generic::decode_4bit(w, n0, nr, bscale, b0, buf, Kp);
}

bool flat_4bit_available(int64_t K, int64_t blocksize, bool bf16) {
  return (bf16 ? bf16_dot_available() : simd_available()) && K % 32 == 0 && blocksize % 32 == 0;
}
void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale, int64_t b0, float* out) {
#if PEFTCORE_HAVE_AVX512
  return avx512::decode_4bit_flat(w, e0, e1, bscale, b0, out);
#endif
  TORCH_CHECK(false, "peftcore: internal error: decode_4bit_flat without AVX-512");
}
void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale, int64_t b0,
                      c10::BFloat16* out) {
#if PEFTCORE_HAVE_AVX512
  return avx512::decode_4bit_flat(w, e0, e1, bscale, b0, out);
#endif
  TORCH_CHECK(false, "peftcore: internal error: decode_4bit_flat without AVX-512");
}

void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, float* buf, int64_t Kp) {
#if PEFTCORE_HAVE_AVX512
  if (simd_available()) return avx512::decode_int8(cb, K, n0, nr, buf, Kp);
#endif
#if PEFTCORE_HAVE_AVX2
  if (use_avx2()) return avx2::decode_int8(cb, K, n0, nr, buf, Kp);
#endif
  generic::decode_int8(cb, K, n0, nr, buf, Kp);
}
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, c10::BFloat16* buf, int64_t Kp) {
#if PEFTCORE_HAVE_AVX512
  if (bf16_dot_available()) return avx512::decode_int8(cb, K, n0, nr, buf, Kp);
#endif
  TORCH_CHECK(false, "peftcore: internal error: bf16 decode without AVX512_BF16");
}
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, int16_t* buf, int64_t Kp) {
#if PEFTCORE_HAVE_AVX512
  if (int16_dot_available()) return avx512::decode_int8(cb, K, n0, nr, buf, Kp);
#endif
  TORCH_CHECK(false, "peftcore: internal error: int16 decode without AVX512_VNNI");
}
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, double* buf, int64_t Kp) {
  generic::decode_int8(cb, K, n0, nr, buf, Kp);
}

bool dequant_int8_rows(const int8_t* cb, const float* scb, int64_t K, int64_t n0, int64_t n1, c10::BFloat16* out) {
#if PEFTCORE_HAVE_AVX512
  if (bf16_dot_available()) return avx512::dequant_int8_rows(cb, scb, K, n0, n1, out), true;
#endif
  return false;
}

namespace {
// A full panel, K made of whole blocks, blocks of whole chunks of the wanted layout.
bool gemv_4bit_applies(const Packed4& w, int64_t nr, int64_t chunk, int64_t want_chunk) {
  return simd_available() && nr == kPanelRows && chunk == want_chunk && w.K % w.blocksize == 0 &&
         w.blocksize % chunk == 0;
}
}  // namespace

bool gemv_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t chunk, const float* xp,
               int64_t M, int64_t Kp, float* out) {
#if PEFTCORE_HAVE_AVX512
  if (M <= kGemvRows && gemv_4bit_applies(w, nr, chunk, 32))
    return avx512::gemv_4bit(w, n0, bscale, xp, M, Kp, out), true;
#endif
  return false;
}
bool gemv_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t chunk,
               const c10::BFloat16* xp, int64_t M, int64_t Kp, float* out) {
#if PEFTCORE_HAVE_AVX512
  if (!gemv_4bit_applies(w, nr, chunk, 64)) return false;
  if (M <= kGemvRows) return avx512::gemv_4bit(w, n0, bscale, xp, M, Kp, out), true;
  return avx512::fused_4bit(w, n0, bscale, xp, M, Kp, out), true;
#endif
  return false;
}
bool gemv_4bit(const Packed4&, int64_t, int64_t, const float*, int64_t, const double*, int64_t, int64_t, double*) {
  return false;
}
bool gemv_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, const float* xp, int64_t M, int64_t Kp,
               float* out) {
#if PEFTCORE_HAVE_AVX512
  if (simd_available() && nr == kPanelRows && M <= kGemvRows)
    return avx512::gemv_int8(cb, K, n0, xp, M, Kp, out), true;
#endif
  return false;
}

bool gemv_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, const int16_t* xp, int64_t M, int64_t Kp,
               float* out) {
#if PEFTCORE_HAVE_AVX512
  if (int16_dot_available() && nr == kPanelRows && M <= kGemvRows)
    return avx512::gemv_int8(cb, K, n0, xp, M, Kp, out), true;
#endif
  return false;
}

void panel_dot(const float* buf, const float* xp, int64_t M, int64_t Kp, float* out) {
#if PEFTCORE_HAVE_AVX512
  if (simd_available()) return avx512::panel_dot(buf, xp, M, Kp, out);
#endif
#if PEFTCORE_HAVE_AVX2
  if (use_avx2()) return avx2::panel_dot(buf, xp, M, Kp, out);
#endif
  generic::panel_dot(buf, xp, M, Kp, out);
}
void panel_dot(const c10::BFloat16* buf, const c10::BFloat16* xp, int64_t M, int64_t Kp, float* out) {
#if PEFTCORE_HAVE_AVX512
  if (bf16_dot_available()) return avx512::panel_dot(buf, xp, M, Kp, out);
#endif
  TORCH_CHECK(false, "peftcore: internal error: bf16 dot without AVX512_BF16");
}
void panel_dot(const int16_t* buf, const int16_t* xp, int64_t M, int64_t Kp, float* out) {
#if PEFTCORE_HAVE_AVX512
  if (int16_dot_available()) return avx512::panel_dot(buf, xp, M, Kp, out);
#endif
  TORCH_CHECK(false, "peftcore: internal error: int16 dot without AVX512_VNNI");
}
void panel_dot(const double* buf, const double* xp, int64_t M, int64_t Kp, double* out) {
  generic::panel_dot(buf, xp, M, Kp, out);
}

}  // namespace peftcore::cpu::quant
