// The two hot loops behind every LoRA forward on CPU, shared by lora_linear and
// lora_embedding (implemented in lowrank_kernels.cpp, compiled per x86-64 ISA level).
//
//   shrink: T[i, q] = Σ_p x[i, p] · A[q, p]          (x rows · A rows, the "x·Aᵀ" GEMM)
//   expand: y[i, j] = cast(acc(base[row(i), j]) + Σ_k T[i, k] · Bt[k, j])
//
// Every pointer is to row-major data with the given leading dimension (elements).
// Each function does one rectangular sub-problem on the calling thread; the callers
// (lowrank_parallel.h) split the work across threads. Accumulation is float32 (float64 for float64 data).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace peftcore::cpu {

// Whether the AVX-512 (F/BW/VL/DQ) kernels run: checked once at run time;
// PEFTCORE_CPU_ISA=generic forces the portable kernels (tests/test_isa_generic.py).
bool use_avx512();

// rows × ranks dot products of length `in`. T is in the accumulation type; A in it too,
// or (bf16 / fp16 x) in x's dtype, widened as it is read (adapters kept in the base dtype,
// autocast_adapter_dtype=False: no float32 copy per call).
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
void shrink(const double* x, int64_t ldx, const double* A, int64_t lda, double* T, int64_t ldt, int64_t rows,
            int64_t ranks, int64_t in);

// rows × cols outputs, each the base value plus a rank-R update, rounded once.
// Row i of the base is base + (base_rows ? base_rows[i] : i) * ld_base: the linear
// op passes y itself (in place), the embedding op the table W and the token ids.
// Bt's rows are read up to cols rounded up to a multiple of 16 (see pack_bt).
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const float* base,
            int64_t ld_base, const int64_t* base_rows, float* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const c10::BFloat16* base,
            int64_t ld_base, const int64_t* base_rows, c10::BFloat16* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const float* T, int64_t ldt, const float* Bt, int64_t ldb, int64_t R, const c10::Half* base,
            int64_t ld_base, const int64_t* base_rows, c10::Half* y, int64_t ldy, int64_t rows, int64_t cols);
void expand(const double* T, int64_t ldt, const double* Bt, int64_t ldb, int64_t R, const double* base,
            int64_t ld_base, const int64_t* base_rows, double* y, int64_t ldy, int64_t rows, int64_t cols);

// Bt[k, j] = scale · B[j, k] for k < r, j < cols: one adapter's B (out × r, strides
// s0, s1) transposed and scaled into rows of the packed Bt that `expand` reads. Bt's
// leading dimension ldbt must be a multiple of 16 and rows readable/writable up to
// it (the AVX-512 kernels move whole 16-float vectors there).
void pack_bt(const float* B, int64_t s0, int64_t s1, int64_t r, float scale, float* Bt, int64_t ldbt, int64_t cols);
void pack_bt(const double* B, int64_t s0, int64_t s1, int64_t r, double scale, double* Bt, int64_t ldbt,
             int64_t cols);
// The same from a B kept in the base dtype (bf16 / fp16), widened to float32.
void pack_bt(const c10::BFloat16* B, int64_t s0, int64_t s1, int64_t r, float scale, float* Bt, int64_t ldbt,
             int64_t cols);
void pack_bt(const c10::Half* B, int64_t s0, int64_t s1, int64_t r, float scale, float* Bt, int64_t ldbt,
             int64_t cols);

}  // namespace peftcore::cpu
