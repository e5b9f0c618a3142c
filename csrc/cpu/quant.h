// The inner loops behind lora_linear_4bit / lora_linear_int8 on CPU (host side in
// quant_linear.cpp; per-ISA bodies in quant_generic.cpp and quant_avx512.cpp).
//
// The base product y = x·Wᵀ never materialises W: the host walks W in panels of
// kPanelRows output rows; for each panel, `decode_*` expands those rows (and only
// those) from the stored bytes into a small per-thread buffer, which stays in L1/L2,
// and `panel_dot_*` multiplies it by every row of x. So each weight byte is read from
// memory once and decoded once per call, whatever the number of tokens.
//
// Buffer layout. A decoded row is Kp = round_up(K, kChunk) values of the compute type
// (zero-padded). The SIMD decoders de-interleave the nibble pairs of 4-bit data:
// within each chunk of `chunk` values, the even positions come first, then the odd
// ones (chunk = 1: natural order). x is prepared in the same order (prepare_x), so
// the dot products are unchanged.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace peftcore::cpu::quant {

constexpr int64_t kPanelRows = 4;  // output rows decoded together (the micro-kernel's N tile)
constexpr int64_t kChunk = 64;     // decoded rows are padded to a multiple of this

// A bitsandbytes 4-bit weight, standard layout (reference.dequantize_4bit): row-major
// W [N, K] flattened, two 4-bit codes per byte (high nibble first), element i scaled
// by the absmax of block i / blocksize. Blocks may straddle rows.
struct Packed4 {
  const uint8_t* q;
  const float* code;  // [16]
  int64_t blocksize;
  int64_t N, K;
};

// Double quantization's 256-entry code: its float32 values, and the same split into their
// 4 bytes (planes[p * 256 + i] = byte p of value i) for the AVX512_VBMI byte-shuffle
// lookup of nested_scales. Made once per call.
struct NestedCode {
  const float* values;  // [256]
  alignas(64) uint8_t planes[1024];
  explicit NestedCode(const float* v);
};

// Double quantization: out[b - b0] = ncode[qabsmax[b]] · nabsmax[b / nbs] + offset for
// b in [b0, b1), rounded after the product and after the sum (no FMA), as bitsandbytes.
void nested_scales(const uint8_t* qabsmax, const NestedCode& ncode, const float* nabsmax, float offset, int64_t nbs,
                   int64_t b0, int64_t b1, float* out);

// Which decoder layout a panel gets: chunk 64 or 32 (AVX-512) or 16 (AVX2), all
// de-interleaved, or 1
// (natural order, any shape). Decided once per call from K and the blocksize.
int64_t chunk_4bit(int64_t K, int64_t blocksize, bool bf16);

// rows [n0, n0 + nr) (nr <= kPanelRows) into buf (kPanelRows rows × Kp; rows past nr
// zero). bscale[b - b0] is the float32 absmax of block b, for every block the panel
// touches (b0 = first of them), resolved from double quantization by the host.
void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk, float* buf,
                 int64_t Kp);
void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk,
                 c10::BFloat16* buf, int64_t Kp);
void decode_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t b0, int64_t chunk,
                 double* buf, int64_t Kp);

// int8 rows [n0, n0 + nr) of CB [N, K] into buf, unscaled (integers are exact in
// every compute type; the row scale is applied to the dot products).
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, float* buf, int64_t Kp);
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, c10::BFloat16* buf, int64_t Kp);
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, double* buf, int64_t Kp);

// dequantize_4bit's fast path (AVX-512): whole rows of W decoded straight into the result,
// in natural order and in its dtype (float32; bfloat16 with AVX512_BF16, rounded once from
// the float32 code · absmax). Applies when K and the blocksize are multiples of 32 (every
// run of 32 codes lies in one block and starts on a byte).
bool flat_4bit_available(int64_t K, int64_t blocksize, bool bf16);
// Flat elements [e0, e1) of W into out[0, e1 - e0) (e0, e1 multiples of 32); bscale[b - b0]
// the float32 absmax of every block b they touch, as for decode_4bit.
void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale, int64_t b0, float* out);
void decode_4bit_flat(const Packed4& w, int64_t e0, int64_t e1, const float* bscale, int64_t b0,
                      c10::BFloat16* out);
void decode_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, int16_t* buf, int64_t Kp);
// Rows [n0, n1) of W = CB·SCB/127 (bitsandbytes' roundings: (CB·SCB)·(1/127) in float32,
// then one rounding to out's type) into out ([n1 - n0, K], contiguous); the tiled GEMM
// path's decoder. Returns false where no SIMD kernel applies (the caller loops).
bool dequant_int8_rows(const int8_t* cb, const float* scb, int64_t K, int64_t n0, int64_t n1, c10::BFloat16* out);

// out[m * kPanelRows + j] = Σ_k buf[j, k] · xp[m, k] for m < M, j < kPanelRows, with
// float32 accumulation (float64 for double). xp: M rows of Kp values.
void panel_dot(const float* buf, const float* xp, int64_t M, int64_t Kp, float* out);
void panel_dot(const c10::BFloat16* buf, const c10::BFloat16* xp, int64_t M, int64_t Kp, float* out);
void panel_dot(const double* buf, const double* xp, int64_t M, int64_t Kp, double* out);
// int8 weights × int16 tokens (x quantized per token row, see quant_linear.cpp):
// exact integer products summed in int32 over segments short enough not to overflow,
// each segment's sum added to out in float32.
void panel_dot(const int16_t* buf, const int16_t* xp, int64_t M, int64_t Kp, float* out);

// Up to this many token rows, a full panel skips the buffer: gemv_* decode in
// registers (AVX-512 only). They return false where they do not apply (then the
// caller decodes and runs panel_dot). 4-bit with bf16 products: any number of token
// rows (above kGemvRows, the per-block scaled tables of decode_4bit, in groups of 4).
constexpr int64_t kGemvRows = 2;
bool gemv_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t chunk, const float* xp,
               int64_t M, int64_t Kp, float* out);
bool gemv_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t chunk,
               const c10::BFloat16* xp, int64_t M, int64_t Kp, float* out);
bool gemv_4bit(const Packed4& w, int64_t n0, int64_t nr, const float* bscale, int64_t chunk, const double* xp,
               int64_t M, int64_t Kp, double* out);
bool gemv_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, const float* xp, int64_t M, int64_t Kp,
               float* out);
bool gemv_int8(const int8_t* cb, int64_t K, int64_t n0, int64_t nr, const int16_t* xp, int64_t M, int64_t Kp,
               float* out);
template <typename T, typename A>
bool gemv_int8(const int8_t*, int64_t, int64_t, int64_t, const T*, int64_t, int64_t, A*) {
  return false;  // bf16 / double x: decode + panel_dot
}

// Whether the AVX-512 kernels run (else the portable ones); bf16 products need
// AVX512_BF16 on top. Both honour PEFTCORE_CPU_ISA=generic.
bool simd_available();
bool bf16_dot_available();
// int8 × int16 dot products (vpdpwssd) need AVX512_VNNI.
bool int16_dot_available();
// Whether the CPU has AMX-BF16 (oneDNN's bf16 GEMM then runs on AMX tiles): moves the
// crossover to the tiled GEMM path (quant_linear.cpp, gemm_rows_*).
bool amx_available();

}  // namespace peftcore::cpu::quant
