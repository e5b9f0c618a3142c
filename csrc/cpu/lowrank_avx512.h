// Private to lowrank_kernels.cpp / lowrank_avx512.cpp: the AVX-512 (F/BW/VL)
// implementations of the fp32-accumulating kernels of lowrank.h, same contracts.
// Callable only after lowrank_kernels.cpp's run-time CPU check.
#pragma once

#include "lowrank.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PEFTCORE_NO_AVX512)
#define PEFTCORE_HAVE_AVX512 1
#else
#define PEFTCORE_HAVE_AVX512 0
#endif

#if PEFTCORE_HAVE_AVX512
namespace peftcore::cpu::avx512 {

void shrink(const float* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);
void shrink(const c10::BFloat16* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);
void shrink(const c10::Half* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);
void shrink(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* A, int64_t lda, float* T, int64_t ldt,
            int64_t rows, int64_t ranks, int64_t in);
void shrink(const c10::Half* x, int64_t ldx, const c10::Half* A, int64_t lda, float* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);

void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const float* base,
            int64_t ld_base, const int64_t* base_rows, float* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const c10::BFloat16* base,
            int64_t ld_base, const int64_t* base_rows, c10::BFloat16* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const c10::Half* base,
            int64_t ld_base, const int64_t* base_rows, c10::Half* y, int64_t ldy, int64_t rows, int64_t cols);

// pack_bt for B with unit column stride (ldb = B's row stride).
void pack_bt(const float* B, int64_t ldb, int64_t r, float scale, float* Bt, int64_t ldbt, int64_t cols);
void pack_bt(const c10::BFloat16* B, int64_t ldb, int64_t r, float scale, float* Bt, int64_t ldbt, int64_t cols);
void pack_bt(const c10::Half* B, int64_t ldb, int64_t r, float scale, float* Bt, int64_t ldbt, int64_t cols);

}  // namespace peftcore::cpu::avx512
#endif
