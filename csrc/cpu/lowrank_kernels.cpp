// shrink / expand / pack_bt: the inner loops of the fused LoRA forward (declared
// and specified in lowrank.h). Layout: row-major raw pointers, fp32 accumulation
// (fp64 for fp64 data). On CPUs with AVX-512 F/BW/VL the fp32-accumulating entry
// points forward to the intrinsics of lowrank_avx512.cpp (checked once, at run
// time); everywhere else, and for fp64, the plain C++ below, which GCC vectorises
// and which is compiled three times (x86-64-v4, v3 = AVX2+FMA, baseline) with the
// loader picking one per CPU. Covered by tests/ops/test_lora_linear.py,
// tests/ops/test_lora_embedding.py; timed by benchmarks/bench_lora_linear.py.
#include "clones.h"
#include "lowrank.h"
#include "lowrank_avx512.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>


namespace peftcore::cpu {
namespace {

// Without -ffast-math a compiler may not reorder a floating-point sum, so a plain
// dot-product loop stays scalar. `omp simd reduction` (-fopenmp-simd, no OpenMP
// runtime) grants that permission for these accumulators only: each becomes a
// vector of partial sums, reduced once at the end of the loop.

// 4 rows of x against 4 rows of A: 16 accumulators + 8 loads fit the 32 zmm
// registers, and each loaded x / A vector is used 4 times.
template <typename xt, typename at, typename acc_t>
PEFTCORE_INLINE void dot_4x4(const xt* x0, const xt* x1, const xt* x2, const xt* x3, const at* a0,
                             const at* a1, const at* a2, const at* a3, int64_t in, acc_t* out /*[4][4]*/) {
  acc_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  acc_t s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t p = 0; p < in; ++p) {
    // bf16 / fp16 activations are widened here, on load, instead of in a copy of x.
    const acc_t v0 = static_cast<acc_t>(x0[p]), v1 = static_cast<acc_t>(x1[p]);
    const acc_t v2 = static_cast<acc_t>(x2[p]), v3 = static_cast<acc_t>(x3[p]);
    const acc_t b0 = static_cast<acc_t>(a0[p]), b1 = static_cast<acc_t>(a1[p]);
    const acc_t b2 = static_cast<acc_t>(a2[p]), b3 = static_cast<acc_t>(a3[p]);
    s00 += v0 * b0; s01 += v0 * b1; s02 += v0 * b2; s03 += v0 * b3;
    s10 += v1 * b0; s11 += v1 * b1; s12 += v1 * b2; s13 += v1 * b3;
    s20 += v2 * b0; s21 += v2 * b1; s22 += v2 * b2; s23 += v2 * b3;
    s30 += v3 * b0; s31 += v3 * b1; s32 += v3 * b2; s33 += v3 * b3;
  }
  out[0] = s00; out[1] = s01; out[2] = s02; out[3] = s03;
  out[4] = s10; out[5] = s11; out[6] = s12; out[7] = s13;
  out[8] = s20; out[9] = s21; out[10] = s22; out[11] = s23;
  out[12] = s30; out[13] = s31; out[14] = s32; out[15] = s33;
}

// One row against 4 rows of A: the decode case (n = 1) and the row tail.
template <typename xt, typename at, typename acc_t>
PEFTCORE_INLINE void dot_1x4(const xt* x0, const at* a0, const at* a1, const at* a2, const at* a3,
                             int64_t in, acc_t* out /*[4]*/) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t p = 0; p < in; ++p) {
    const acc_t v = static_cast<acc_t>(x0[p]);
    s0 += v * static_cast<acc_t>(a0[p]); s1 += v * static_cast<acc_t>(a1[p]);
    s2 += v * static_cast<acc_t>(a2[p]); s3 += v * static_cast<acc_t>(a3[p]);
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

template <typename xt, typename at, typename acc_t>
PEFTCORE_INLINE void shrink_impl(const xt* x, int64_t ldx, const at* A, int64_t lda, acc_t* T, int64_t ldt,
                                 int64_t rows, int64_t ranks, int64_t in) {
  acc_t res[16];
  for (int64_t q = 0; q < ranks; q += 4) {
    const int64_t kq = std::min<int64_t>(4, ranks - q);
    // A rank tail (r not a multiple of 4) re-reads the last row; its results are dropped.
    const at* a[4];
    for (int k = 0; k < 4; ++k) a[k] = A + (q + std::min<int64_t>(k, kq - 1)) * lda;
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
      const xt* xi = x + i * ldx;
      dot_4x4(xi, xi + ldx, xi + 2 * ldx, xi + 3 * ldx, a[0], a[1], a[2], a[3], in, res);
      for (int r = 0; r < 4; ++r)
        for (int k = 0; k < kq; ++k) T[(i + r) * ldt + q + k] = res[r * 4 + k];
    }
    for (; i < rows; ++i) {
      dot_1x4(x + i * ldx, a[0], a[1], a[2], a[3], in, res);
      for (int k = 0; k < kq; ++k) T[i * ldt + q + k] = res[k];
    }
  }
}

// Output tile: RB rows × kCols columns held in registers while the R rank-1
// updates stream through (4 × 64 fp32 = 16 zmm registers).
constexpr int64_t kCols = 64;

template <int RB, typename acc_t, typename ot>
PEFTCORE_INLINE void expand_tile(const acc_t* T, int64_t ldt, const acc_t* Bt, int64_t ldb, int64_t R,
                                 const ot* const* base, ot* const* y) {
  acc_t acc[RB][kCols];
  for (int r = 0; r < RB; ++r)
    for (int64_t c = 0; c < kCols; ++c) acc[r][c] = static_cast<acc_t>(base[r][c]);
  for (int64_t k = 0; k < R; ++k) {
    const acc_t* b = Bt + k * ldb;
    for (int r = 0; r < RB; ++r) {
      const acc_t t = T[r * ldt + k];
      for (int64_t c = 0; c < kCols; ++c) acc[r][c] += t * b[c];
    }
  }
  // The single rounding to the output dtype (c10's round-to-nearest-even, as .to()).
  for (int r = 0; r < RB; ++r)
    for (int64_t c = 0; c < kCols; ++c) y[r][c] = static_cast<ot>(acc[r][c]);
}

// Column tail (< kCols wide), one row at a time.
template <typename acc_t, typename ot>
PEFTCORE_INLINE void expand_narrow(const acc_t* T, const acc_t* Bt, int64_t ldb, int64_t R, const ot* base, ot* y,
                                   int64_t width) {
  acc_t acc[kCols];
  for (int64_t c = 0; c < width; ++c) acc[c] = static_cast<acc_t>(base[c]);
  for (int64_t k = 0; k < R; ++k) {
    const acc_t t = T[k];
    const acc_t* b = Bt + k * ldb;
    for (int64_t c = 0; c < width; ++c) acc[c] += t * b[c];
  }
  for (int64_t c = 0; c < width; ++c) y[c] = static_cast<ot>(acc[c]);
}

template <typename acc_t, typename ot>
PEFTCORE_INLINE void expand_impl(const acc_t* T, int64_t ldt, const acc_t* Bt, int64_t ldb, int64_t R, const ot* base,
                                 int64_t ld_base, const int64_t* base_rows, ot* y, int64_t ldy, int64_t rows,
                                 int64_t cols) {
  auto base_row = [&](int64_t i) { return base + (base_rows ? base_rows[i] : i) * ld_base; };
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const ot* b[4] = {base_row(i), base_row(i + 1), base_row(i + 2), base_row(i + 3)};
    ot* o[4] = {y + i * ldy, y + (i + 1) * ldy, y + (i + 2) * ldy, y + (i + 3) * ldy};
    int64_t j = 0;
    for (; j + kCols <= cols; j += kCols) {
      const ot* bj[4] = {b[0] + j, b[1] + j, b[2] + j, b[3] + j};
      ot* oj[4] = {o[0] + j, o[1] + j, o[2] + j, o[3] + j};
      expand_tile<4>(T + i * ldt, ldt, Bt + j, ldb, R, bj, oj);
    }
    if (j < cols)
      for (int r = 0; r < 4; ++r) expand_narrow(T + (i + r) * ldt, Bt + j, ldb, R, b[r] + j, o[r] + j, cols - j);
  }
  for (; i < rows; ++i) {
    const ot* b = base_row(i);
    ot* o = y + i * ldy;
    int64_t j = 0;
    for (; j + kCols <= cols; j += kCols) {
      const ot* bj[1] = {b + j};
      ot* oj[1] = {o + j};
      expand_tile<1>(T + i * ldt, ldt, Bt + j, ldb, R, bj, oj);
    }
    if (j < cols) expand_narrow(T + i * ldt, Bt + j, ldb, R, b + j, o + j, cols - j);
  }
}

// Transposed in 16-column strips: the strip's 16 rows of B (r values each) stay in
// L1 while each of the r output rows gets one full cache line. (Column by column
// would either re-read B's lines r times or scatter single writes over r rows
// ldbt apart, which alias in the L1 sets.)
template <typename bt, typename acc_t>
PEFTCORE_INLINE void pack_bt_impl(const bt* B, int64_t s0, int64_t s1, int64_t r, acc_t scale, acc_t* Bt,
                                  int64_t ldbt, int64_t cols) {
  for (int64_t jb = 0; jb < cols; jb += 16) {
    const int64_t je = std::min(cols, jb + 16);
    for (int64_t k = 0; k < r; ++k)
      for (int64_t j = jb; j < je; ++j) Bt[k * ldbt + j] = scale * static_cast<acc_t>(B[j * s0 + k * s1]);
  }
}

}  // namespace

// The portable entry points, one target_clones set each (external linkage: GCC
// builds the ifunc resolvers for those only).
namespace generic {

#define PEFTCORE_DEFINE_SHRINK(xt, at, acc_t)                                                             \
  PEFTCORE_CLONES void shrink(const xt* x, int64_t ldx, const at* A, int64_t lda, acc_t* T, int64_t ldt, \
                              int64_t rows, int64_t ranks, int64_t in) {                                 \
    shrink_impl(x, ldx, A, lda, T, ldt, rows, ranks, in);                                                \
  }
PEFTCORE_DEFINE_SHRINK(float, float, float)
PEFTCORE_DEFINE_SHRINK(c10::BFloat16, float, float)
PEFTCORE_DEFINE_SHRINK(c10::Half, float, float)
PEFTCORE_DEFINE_SHRINK(c10::BFloat16, c10::BFloat16, float)
PEFTCORE_DEFINE_SHRINK(c10::Half, c10::Half, float)
PEFTCORE_DEFINE_SHRINK(double, double, double)
#undef PEFTCORE_DEFINE_SHRINK

#define PEFTCORE_DEFINE_EXPAND(acc_t, ot)                                                                          \
  PEFTCORE_CLONES void expand(const acc_t* T, int64_t ldt, const acc_t* Bt, int64_t ldb, int64_t R, const ot* base, \
                              int64_t ld_base, const int64_t* base_rows, ot* y, int64_t ldy, int64_t rows,          \
                              int64_t cols) {                                                                      \
    expand_impl(T, ldt, Bt, ldb, R, base, ld_base, base_rows, y, ldy, rows, cols);                                 \
  }
PEFTCORE_DEFINE_EXPAND(float, float)
PEFTCORE_DEFINE_EXPAND(float, c10::BFloat16)
PEFTCORE_DEFINE_EXPAND(float, c10::Half)
PEFTCORE_DEFINE_EXPAND(double, double)
#undef PEFTCORE_DEFINE_EXPAND

#define PEFTCORE_DEFINE_PACK_BT(bt, acc_t)                                                                     \
  PEFTCORE_CLONES void pack_bt(const bt* B, int64_t s0, int64_t s1, int64_t r, acc_t scale, acc_t* Bt,         \
                               int64_t ldbt, int64_t cols) {                                                   \
    pack_bt_impl(B, s0, s1, r, scale, Bt, ldbt, cols);                                                         \
  }
PEFTCORE_DEFINE_PACK_BT(float, float)
PEFTCORE_DEFINE_PACK_BT(double, double)
PEFTCORE_DEFINE_PACK_BT(c10::BFloat16, float)
PEFTCORE_DEFINE_PACK_BT(c10::Half, float)
#undef PEFTCORE_DEFINE_PACK_BT

}  // namespace generic

#if PEFTCORE_HAVE_AVX512
bool use_avx512() {
  static const bool yes = [] {
    // PEFTCORE_CPU_ISA=generic forces the portable kernels (how the tests cover them on
    // AVX-512 machines, see tests/test_isa_generic.py).
    // PEFTCORE_CPU_ISA=avx2 likewise keeps AVX-512 off (the quantized ops then run their
    // AVX2 kernels: how an AVX2-only CPU is emulated, see benchmarks/bench_quant.py).
    const char* isa = std::getenv("PEFTCORE_CPU_ISA");
    if (isa != nullptr && (std::strcmp(isa, "generic") == 0 || std::strcmp(isa, "avx2") == 0)) return false;
    // __builtin_cpu_supports also checks that the OS saves the zmm state (XCR0).
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return yes;
}
#define PEFTCORE_DISPATCH(call) \
  if (use_avx512()) return avx512::call; \
  return generic::call
#else
bool use_avx512() { return false; }
#define PEFTCORE_DISPATCH(call) return generic::call
#endif

#define PEFTCORE_DEFINE_DISPATCH(xt)                                                                              \
  void shrink(const xt* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt, int64_t rows,       \
              int64_t ranks, int64_t in) {                                                                      \
    PEFTCORE_DISPATCH(shrink(x, ldx, A, lda, T, ldt, rows, ranks, in));                                         \
  }                                                                                                             \
  void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const xt* base,              \
              int64_t ld_base, const int64_t* base_rows, xt* y, int64_t ldy, int64_t rows, int64_t cols) {      \
    PEFTCORE_DISPATCH(expand(T, ldt, Bt, ldb, R, base, ld_base, base_rows, y, ldy, rows, cols));                \
  }
PEFTCORE_DEFINE_DISPATCH(float)
PEFTCORE_DEFINE_DISPATCH(c10::BFloat16)
PEFTCORE_DEFINE_DISPATCH(c10::Half)
#undef PEFTCORE_DEFINE_DISPATCH

#if PEFTCORE_HAVE_AVX512
#define PEFTCORE_PACK_BT_AVX512(B, s0, s1, r, scale, Bt, ldbt, cols) \
  if ((s1) == 1 && use_avx512()) return avx512::pack_bt(B, s0, r, scale, Bt, ldbt, cols)
#else
#define PEFTCORE_PACK_BT_AVX512(B, s0, s1, r, scale, Bt, ldbt, cols) (void)0
#endif

// Adapters in the base dtype (bf16 / fp16 x and A): widened as they are read.
#define PEFTCORE_DEFINE_DISPATCH_LOW(xt)                                                                          \
  void shrink(const xt* x, int64_t ldx, const xt* A, int64_t lda, float* T, int64_t ldt, int64_t rows,          \
              int64_t ranks, int64_t in) {                                                                      \
    PEFTCORE_DISPATCH(shrink(x, ldx, A, lda, T, ldt, rows, ranks, in));                                         \
  }                                                                                                             \
  void pack_bt(const xt* B, int64_t s0, int64_t s1, int64_t r, float scale, float* Bt, int64_t ldbt,             \
               int64_t cols) {                                                                                  \
    PEFTCORE_PACK_BT_AVX512(B, s0, s1, r, scale, Bt, ldbt, cols);                                               \
    generic::pack_bt(B, s0, s1, r, scale, Bt, ldbt, cols);                                                      \
  }
PEFTCORE_DEFINE_DISPATCH_LOW(c10::BFloat16)
PEFTCORE_DEFINE_DISPATCH_LOW(c10::Half)
#undef PEFTCORE_DEFINE_DISPATCH_LOW

void shrink(const double* x, int64_t ldx, const double* A, int64_t lda, double* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in) {
  generic::shrink(x, ldx, A, lda, T, ldt, rows, ranks, in);
}
void expand(const double* T, int64_t ldt, const double* Bt, int64_t ldb, int64_t R, const double* base,
            int64_t ld_base, const int64_t* base_rows, double* y, int64_t ldy, int64_t rows, int64_t cols) {
  generic::expand(T, ldt, Bt, ldb, R, base, ld_base, base_rows, y, ldy, rows, cols);
}

void pack_bt(const float* B, int64_t s0, int64_t s1, int64_t r, float scale, float* Bt, int64_t ldbt, int64_t cols) {
  PEFTCORE_PACK_BT_AVX512(B, s0, s1, r, scale, Bt, ldbt, cols);
  generic::pack_bt(B, s0, s1, r, scale, Bt, ldbt, cols);
}
void pack_bt(const double* B, int64_t s0, int64_t s1, int64_t r, double scale, double* Bt, int64_t ldbt,
             int64_t cols) {
  generic::pack_bt(B, s0, s1, r, scale, Bt, ldbt, cols);
}

}  // namespace peftcore::cpu
