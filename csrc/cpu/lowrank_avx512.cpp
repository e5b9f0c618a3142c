// AVX-512 versions of the shrink / expand / pack_bt kernels of lowrank.h (fp32
// accumulation; x and y may be fp32, bf16 or fp16; A, Bt and T are fp32), written
// with intrinsics because GCC's auto-vectorisation of the generic code keeps the
// register tiles in memory and prefers 256-bit vectors. Only reached through the
// run-time dispatch in lowrank_kernels.cpp (CPUs with AVX-512 F/BW/VL). Covered by
// tests/ops/test_lora_linear.py, tests/ops/test_lora_embedding.py; timed by
// benchmarks/bench_lora_linear.py.
#include "lowrank_avx512.h"

#if PEFTCORE_HAVE_AVX512

// GCC 12's intrinsics (_mm512_undefined_* behind the masked / reduce forms) trip a
// false -Wmaybe-uninitialized once inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>

// Per-function target (not a file-wide flag or pragma), so that nothing but these
// functions, all internal, is ever compiled for AVX-512: inline functions of the
// included headers stay baseline code that any CPU may run.
#define PEFTCORE_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PEFTCORE_AVX512_INLINE PEFTCORE_AVX512_FN inline __attribute__((always_inline))

namespace peftcore::cpu::avx512 {
namespace {

// 16-element loads widened to fp32 and stores rounded from fp32; masked lanes are
// neither read nor written (AVX-512 masked memory ops suppress faults).
PEFTCORE_AVX512_INLINE __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
PEFTCORE_AVX512_INLINE __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  // bf16 is the upper half of an fp32: widening is exact.
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
PEFTCORE_AVX512_INLINE __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

PEFTCORE_AVX512_INLINE void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
PEFTCORE_AVX512_INLINE void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // Bit-identical to c10::BFloat16(float): round to nearest even, every NaN -> 0x7FC0.
  // (vcvtneps2bf16 would flush denormals, and needs AVX512_BF16.)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(h));
}
PEFTCORE_AVX512_INLINE void store16(c10::Half* p, __m512 v, __mmask16 m) {
  // IEEE round to nearest even, as c10::Half(float).
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

PEFTCORE_AVX512_INLINE __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// ---- shrink: T[i, q] = Σ_p x[i, p] · A[q, p] -------------------------------------
// An RB-row × QB-rank tile of dot products, each a zmm of 16 partial sums. RB = 3,
// QB = 8: 24 accumulators + 3 x vectors fit the 32 registers, and every widened x
// vector feeds 8 FMAs. The p range is cut into blocks; a block of 8 rows of A is
// first copied, interleaved (ap[p / 16][q][16]), into a 16 KB L1-resident buffer that
// every tile of a chunk of rows then reads as one sequential stream. (Read in place,
// A's rows sit in_features apart - for a power-of-two width, in the same L1 sets as
// each other and as x's rows - and the loop thrashes L1 / is L2-bound.) The partial
// sums live in a small array between blocks and are reduced once at the end.
constexpr int64_t kShrinkRows = 96;    // rows sharing one packed block of A
constexpr int64_t kShrinkBlock = 512;  // p-block: 8 rows × 512 fp32 = 16 KB

template <int RB, int QB, typename xt>
PEFTCORE_AVX512_INLINE void shrink_tile(const xt* x, int64_t ldx, const float* ap, int64_t width,
                                        __m512* partial /*[RB][8]*/) {
  __m512 acc[RB][QB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) acc[r][q] = partial[r * 8 + q];
  for (int64_t p = 0; p < width; p += 16, ap += 8 * 16) {
    const __mmask16 m = tail_mask(width - p);  // all ones but in the very last step
    __m512 xv[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) xv[r] = load16(x + r * ldx + p, m);
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) {
      const __m512 av = _mm512_load_ps(ap + q * 16);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[r][q] = _mm512_fmadd_ps(xv[r], av, acc[r][q]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) partial[r * 8 + q] = acc[r][q];
}

template <int QB, typename xt>
PEFTCORE_AVX512_INLINE void shrink_block(const xt* x, int64_t ldx, const float* ap, int64_t width, int64_t rows,
                                         __m512* partial) {
  int64_t i = 0;
  for (; i + 3 <= rows; i += 3) shrink_tile<3, QB>(x + i * ldx, ldx, ap, width, partial + i * 8);
  if (rows - i == 2) shrink_tile<2, QB>(x + i * ldx, ldx, ap, width, partial + i * 8);
  if (rows - i == 1) shrink_tile<1, QB>(x + i * ldx, ldx, ap, width, partial + i * 8);
}

template <typename xt, typename at>
PEFTCORE_AVX512_FN void shrink_impl(const xt* x, int64_t ldx, const at* A, int64_t lda, float* T, int64_t ldt,
                                    int64_t rows, int64_t ranks, int64_t in) {
  __m512 partial[kShrinkRows * 8];      // 48 KB
  __m512 ap[kShrinkBlock / 16 * 8];     // 16 KB
  for (int64_t q = 0; q < ranks; q += 8) {
    const int kq = static_cast<int>(std::min<int64_t>(8, ranks - q));
    // A rank tail repeats the last row of A; those results are dropped.
    const at* a[8];
    for (int k = 0; k < 8; ++k) a[k] = A + (q + std::min(k, kq - 1)) * lda;
    for (int64_t i0 = 0; i0 < rows; i0 += kShrinkRows) {
      const int64_t nr = std::min(kShrinkRows, rows - i0);
      std::fill(partial, partial + nr * 8, _mm512_setzero_ps());
      for (int64_t p0 = 0; p0 < in; p0 += kShrinkBlock) {
        const int64_t width = std::min(kShrinkBlock, in - p0);
        for (int64_t p = 0; p < width; p += 16)  // zero-filled past in, so x's masked tail meets zeros
          for (int k = 0; k < 8; ++k) ap[p / 16 * 8 + k] = load16(a[k] + p0 + p, tail_mask(width - p));  // widened
        const float* apf = reinterpret_cast<const float*>(ap);
        if (kq <= 4)
          shrink_block<4>(x + i0 * ldx + p0, ldx, apf, width, nr, partial);
        else
          shrink_block<8>(x + i0 * ldx + p0, ldx, apf, width, nr, partial);
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int k = 0; k < kq; ++k) T[(i0 + r) * ldt + q + k] = _mm512_reduce_add_ps(partial[r * 8 + k]);
    }
  }
}

// ---- expand: y[i, j] = cast(base[row(i), j] + Σ_k T[i, k] · Bt[k, j]) -------------
// An RB-row × 16·NV-column tile held in zmm registers while the R rank-1 updates
// stream through: per k, NV loads of Bt and RB broadcasts of T feed RB·NV FMAs.
// RB = 6, NV = 4: 24 accumulators + 4 Bt vectors. The base is loaded (widened) into
// the accumulators and the result rounded and stored in the same pass. Bt rows are
// readable up to a multiple of 16 columns (padded scratch), so only y is masked.
template <int RB, int NV, typename ot>
PEFTCORE_AVX512_INLINE void expand_tile(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R,
                                        const ot* const* base, ot* const* y, __mmask16 last) {
  __m512 acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = load16(base[r] + 16 * v, v == NV - 1 ? last : __mmask16(0xFFFF));
  for (int64_t k = 0; k < R; ++k) {
    const float* b = Bt + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512 t = _mm512_set1_ps(T[r * ldt + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(t, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store16(y[r] + 16 * v, acc[r][v], v == NV - 1 ? last : __mmask16(0xFFFF));
}

template <int RB, typename ot>
PEFTCORE_AVX512_INLINE void expand_rows(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R,
                                        const ot* const* base, ot* const* y, int64_t cols) {
  const ot* b[RB];
  ot* o[RB];
  int64_t j = 0;
  for (; j + 64 <= cols; j += 64) {
    for (int r = 0; r < RB; ++r) b[r] = base[r] + j, o[r] = y[r] + j;
    expand_tile<RB, 4>(T, ldt, Bt + j, ldb, R, b, o, 0xFFFF);
  }
  if (j == cols) return;
  for (int r = 0; r < RB; ++r) b[r] = base[r] + j, o[r] = y[r] + j;
  const int64_t w = cols - j;
  const __mmask16 last = tail_mask(w - 16 * ((w - 1) / 16));
  switch ((w + 15) / 16) {
    case 1: expand_tile<RB, 1>(T, ldt, Bt + j, ldb, R, b, o, last); break;
    case 2: expand_tile<RB, 2>(T, ldt, Bt + j, ldb, R, b, o, last); break;
    case 3: expand_tile<RB, 3>(T, ldt, Bt + j, ldb, R, b, o, last); break;
    default: expand_tile<RB, 4>(T, ldt, Bt + j, ldb, R, b, o, last); break;
  }
}

template <typename ot>
PEFTCORE_AVX512_FN void expand_impl(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R,
                                    const ot* base, int64_t ld_base, const int64_t* base_rows, ot* y, int64_t ldy,
                                    int64_t rows, int64_t cols) {
  constexpr int kRB = 6;
  for (int64_t i = 0; i < rows; i += kRB) {
    const int rb = static_cast<int>(std::min<int64_t>(kRB, rows - i));
    const ot* b[kRB];
    ot* o[kRB];
    for (int r = 0; r < rb; ++r) {
      b[r] = base + (base_rows ? base_rows[i + r] : i + r) * ld_base;
      o[r] = y + (i + r) * ldy;
    }
    const float* t = T + i * ldt;
    switch (rb) {
      case 6: expand_rows<6>(t, ldt, Bt, ldb, R, b, o, cols); break;
      case 5: expand_rows<5>(t, ldt, Bt, ldb, R, b, o, cols); break;
      case 4: expand_rows<4>(t, ldt, Bt, ldb, R, b, o, cols); break;
      case 3: expand_rows<3>(t, ldt, Bt, ldb, R, b, o, cols); break;
      case 2: expand_rows<2>(t, ldt, Bt, ldb, R, b, o, cols); break;
      default: expand_rows<1>(t, ldt, Bt, ldb, R, b, o, cols); break;
    }
  }
}

// ---- pack_bt: Bt[k, j] = scale · B[j, k] for B with unit column stride --------------
// 16 × 16 blocks transposed in registers (unpack 32-bit, unpack 64-bit, two 128-bit
// lane shuffles): B is read row by row and Bt written in full 64-byte rows.
PEFTCORE_AVX512_INLINE void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + e], 128-bit lane L: rows 4g..4g+3 of column 4L + e.
  __m512 u[16];
  for (int g = 0; g < 16; g += 4) {
    const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int e = 0; e < 4; ++e) {
    const __m512 lo01 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44), hi01 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
    const __m512 lo23 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44),
                 hi23 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
    r[4 + e] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    r[8 + e] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
}

}  // namespace

PEFTCORE_AVX512_FN void shrink(const float* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt,
                               int64_t rows, int64_t ranks, int64_t in) {
  shrink_impl(x, ldx, A, lda, T, ldt, rows, ranks, in);
}
PEFTCORE_AVX512_FN void shrink(const c10::BFloat16* x, int64_t ldx, const float* A, int64_t lda, float* T,
                               int64_t ldt, int64_t rows, int64_t ranks, int64_t in) {
  shrink_impl(x, ldx, A, lda, T, ldt, rows, ranks, in);
}
PEFTCORE_AVX512_FN void shrink(const c10::Half* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt,
                               int64_t rows, int64_t ranks, int64_t in) {
  shrink_impl(x, ldx, A, lda, T, ldt, rows, ranks, in);
}
PEFTCORE_AVX512_FN void shrink(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* A, int64_t lda, float* T,
                               int64_t ldt, int64_t rows, int64_t ranks, int64_t in) {
  shrink_impl(x, ldx, A, lda, T, ldt, rows, ranks, in);
}
PEFTCORE_AVX512_FN void shrink(const c10::Half* x, int64_t ldx, const c10::Half* A, int64_t lda, float* T,
                               int64_t ldt, int64_t rows, int64_t ranks, int64_t in) {
  shrink_impl(x, ldx, A, lda, T, ldt, rows, ranks, in);
}

PEFTCORE_AVX512_FN void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const float* base,
                               int64_t ld_base, const int64_t* base_rows, float* y, int64_t ldy, int64_t rows,
                               int64_t cols) {
  expand_impl(T, ldt, Bt, ldb, R, base, ld_base, base_rows, y, ldy, rows, cols);
}
PEFTCORE_AVX512_FN void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R,
                               const c10::BFloat16* base, int64_t ld_base, const int64_t* base_rows, c10::BFloat16* y,
                               int64_t ldy, int64_t rows, int64_t cols) {
  expand_impl(T, ldt, Bt, ldb, R, base, ld_base, base_rows, y, ldy, rows, cols);
}
PEFTCORE_AVX512_FN void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R,
                               const c10::Half* base, int64_t ld_base, const int64_t* base_rows, c10::Half* y,
                               int64_t ldy, int64_t rows, int64_t cols) {
  expand_impl(T, ldt, Bt, ldb, R, base, ld_base, base_rows, y, ldy, rows, cols);
}

namespace {
template <typename bt>  // float, or bf16 / fp16 (adapters kept in the base dtype), widened on load
PEFTCORE_AVX512_INLINE void pack_bt_impl(const bt* B, int64_t ldb, int64_t r, float scale, float* Bt, int64_t ldbt,
                                         int64_t cols) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < cols; j += 16) {
    const int64_t nj = std::min<int64_t>(16, cols - j);
    for (int64_t k = 0; k < r; k += 16) {
      const __mmask16 km = tail_mask(r - k);
      __m512 v[16];
      for (int c = 0; c < 16; ++c) v[c] = c < nj ? load16(B + (j + c) * ldb + k, km) : _mm512_setzero_ps();
      transpose16x16(v);
      // Full 16-wide rows: Bt's leading dimension is padded to a multiple of 16.
      const int64_t nk = std::min<int64_t>(16, r - k);
      for (int64_t c = 0; c < nk; ++c) _mm512_storeu_ps(Bt + (k + c) * ldbt + j, _mm512_mul_ps(s, v[c]));
    }
  }
}
}  // namespace

PEFTCORE_AVX512_FN void pack_bt(const float* B, int64_t ldb, int64_t r, float scale, float* Bt, int64_t ldbt,
                                int64_t cols) {
  pack_bt_impl(B, ldb, r, scale, Bt, ldbt, cols);
}
PEFTCORE_AVX512_FN void pack_bt(const c10::BFloat16* B, int64_t ldb, int64_t r, float scale, float* Bt, int64_t ldbt,
                                int64_t cols) {
  pack_bt_impl(B, ldb, r, scale, Bt, ldbt, cols);
}
PEFTCORE_AVX512_FN void pack_bt(const c10::Half* B, int64_t ldb, int64_t r, float scale, float* Bt, int64_t ldbt,
                                int64_t cols) {
  pack_bt_impl(B, ldb, r, scale, Bt, ldbt, cols);
}

}  // namespace peftcore::cpu::avx512

#endif  // PEFTCORE_HAVE_AVX512
