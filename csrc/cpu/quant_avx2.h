// Private to quant_generic.cpp / quant_avx2.cpp: the AVX2 + FMA kernels of quant.h
// (float32 compute, chunk 16), same contracts; callable only after the run-time
// check in quant_generic.cpp.
#pragma once

#include "quant.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PEFTCORE_HAVE_AVX2 1
#else
#define PEFTCORE_HAVE_AVX2 0
#endif

#if PEFTCORE_HAVE_AVX2
namespace peftcore::cpu::quant::avx2 {

void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, float* buf, int64_t Kp);
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, float* buf, int64_t Kp);
void panel_dot(const float* buf, const float* xp, int64_t M, int64_t Kp, float* out);

}  // namespace peftcore::cpu::quant::avx2
#endif
