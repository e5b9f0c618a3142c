// Private to quant_generic.cpp / quant_avx512.cpp: the AVX-512 kernels of quant.h,
// same contracts, callable only after the run-time checks there (the bf16 ones
// also need AVX512_BF16). chunk is 32 or 64 (quant.h, "Buffer layout").
#pragma once

#include "lowrank_avx512.h"  // PEFTCORE_HAVE_AVX512
#include "quant.h"

#if PEFTCORE_HAVE_AVX512
namespace peftcore::cpu::quant::avx512 {

void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk, float* buf,
                 int64_t Kp);
void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk,
                 c10::BFloat16* buf, int64_t Kp);
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, float* buf, int64_t Kp);
// Rows [n0, n1) of W = CB·SCB/127 into out ([n1 - n0, K], contiguous; AVX512_BF16).
void dequant_int8_rows(const int8_t* cb, const float* scb, int64_t K, int64_t n0, int64_t n1, c10::BFloat16* out);
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, c10::BFloat16* buf, int64_t Kp);
void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale, int64_t b0, float* out);
void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale, int64_t b0,
                      c10::BFloat16* out);
// Fused GEMV for M <= kGemvRows token rows and a full panel (4 rows), without the
// panel buffer. 4-bit: K % blocksize == 0 and blocksize % chunk == 0 (chunk 64 for
// bf16, 32 for float32; x prepared in that chunk's order); bs_row0 holds the
// float32 block scales of the panel's rows, row after row (K / blocksize each).
void gemv_4bit(const Packed4& w, int64_t n0, const float* bs_row0, const c10::BFloat16* xp, int64_t M, int64_t Kp,
               float* out);
void gemv_4bit(const Packed4& w, int64_t n0, const float* bs_row0, const float* xp, int64_t M, int64_t Kp, float* out);
// The same for any number M of bf16 token rows (above kGemvRows; quant.h), in groups of at
// most 4, per-block scaled tables (the panel decoder's rounding).
void fused_4bit(const Packed4& w, int64_t n0, const float* bs_row0, const c10::BFloat16* xp, int64_t M, int64_t Kp,
                float* out);
// int8 against float32 x in natural order, any K.
void gemv_int8(const int8_t* cb, int64_t K, int64_t n0, const float* xp, int64_t M, int64_t Kp, float* out);
// AVX512_VNNI: int8 weights × int16 x (quant.h, panel_dot for int16).
void gemv_int8(const int8_t* cb, int64_t K, int64_t n0, const int16_t* xp, int64_t M, int64_t Kp, float* out);
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, int16_t* buf, int64_t Kp);
void nested_scales(const uint8_t* qabsmax, const NestedCode& ncode, const float* nabsmax, float offset, int64_t nbs,
                   int64_t b0, int64_t b1, float* out);
void panel_dot(const int16_t* buf, const int16_t* xp, int64_t M, int64_t Kp, float* out);
void panel_dot(const float* buf, const float* xp, int64_t M, int64_t Kp, float* out);
void panel_dot(const c10::BFloat16* buf, const c10::BFloat16* xp, int64_t M, int64_t Kp, float* out);

}  // namespace peftcore::cpu::quant::avx512
#endif
