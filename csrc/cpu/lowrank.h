// The two hot loops behind every LoRA forward on CPU, shared by lora_linear and
// lora_embedding (implemented in lowrank_kernels.cpp, compiled per x86-64 ISA level).
//
//   shrink: T[i, q] = Σ_p x[i, p] · A[q, p]          (x rows · A rows, the "x·Aᵀ" GEMM)
//   expand: y[i, j] = cast(acc(base[row(i), j]) + Σ_k T[i, k] · Bt[k, j])
//
// Every pointer is to row-major data with the given leading dimension (elements).
// Both functions do one rectangular sub-problem on the calling thread; the callers
// split the work across threads. Accumulation is float32 (float64 for float64 data).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace peftcore::cpu {

// rows × ranks dot products of length `in`. A and T are in the accumulation type.
void shrink(const float* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);
void shrink(const c10::BFloat16* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);
void shrink(const c10::Half* x, int64_t ldx, const float* A, int64_t lda, float* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);
void shrink(const double* x, int64_t ldx, const double* A, int64_t lda, double* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);

// rows × cols outputs, each the base value plus a rank-R update, rounded once.
// Row i of the base is base + (base_rows ? base_rows[i] : i) * ld_base: the linear
// op passes y itself (in place), the embedding op the table W and the token ids.
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const float* base,
            int64_t ld_base, const int64_t* base_rows, float* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const c10::BFloat16* base,
            int64_t ld_base, const int64_t* base_rows, c10::BFloat16* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const c10::Half* base,
            int64_t ld_base, const int64_t* base_rows, c10::Half* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const double* T, int64_t ldt, const double* Bt, int64_t ldb, int64_t R, const double* base,
            int64_t ld_base, const int64_t* base_rows, double* y, int64_t ldy, int64_t rows, int64_t cols);

// The last pass of the few-row (decode) path, where the low-rank product P = T·Bᵀ
// comes from a BLAS GEMV on B as stored: y[i, :] = cast(acc(base[row(i), :]) + P[i, :]).
void add_cast(const float* P, int64_t ldp, const float* base, int64_t ld_base, const int64_t* base_rows, float* y,
              int64_t ldy, int64_t rows, int64_t cols);
void add_cast(const float* P, int64_t ldp, const c10::BFloat16* base, int64_t ld_base, const int64_t* base_rows,
              c10::BFloat16* y, int64_t ldy, int64_t rows, int64_t cols);
void add_cast(const float* P, int64_t ldp, const c10::Half* base, int64_t ld_base, const int64_t* base_rows,
              c10::Half* y, int64_t ldy, int64_t rows, int64_t cols);
void add_cast(const double* P, int64_t ldp, const double* base, int64_t ld_base, const int64_t* base_rows, double* y,
              int64_t ldy, int64_t rows, int64_t cols);

}  // namespace peftcore::cpu
