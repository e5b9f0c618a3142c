// peftcore::lora_linear_4bit / lora_linear_int8 and ia3_linear_4bit / ia3_linear_int8 on
// CPU, and the dequantize_4bit / dequantize_int8 utilities (backward, merge).
//   y = x·Wᵀ + b + Σ_a s_a·((x_a·A_aᵀ) ⊙ E_a)·B_aᵀ (E_a: AdaLoRA's lora_E, else 1), with W stored as bitsandbytes stores it:
//   4-bit: packed nf4/fp4 codes + per-block absmax (optionally double-quantized);
//   int8: CB [out, in] int8 + SCB [out] (W = CB·SCB/127).
// The base is one pass over the stored bytes (quant.h: panels of 4 output rows
// decoded into a per-thread buffer, multiplied by every token row), threaded over
// panels; from kGemmRows* token rows on (prefill, training), W decoded tile by tile into
// x's dtype and ATen GEMMs (tiled_gemm_linear), 4-bit and int8 alike. The adapters are then
// added by the same low-rank update as lora_linear.
// (IA)³ (ia3.h) rides on the same pass: feedforward, x is scaled once where it is
// copied for the kernels (before prepare_x / quantize_x_int16); otherwise each output
// is scaled where the panel loop writes it (after the bias), no extra pass over y.
// Compute: float32 products for float32 / float16 x; bfloat16 products (x as given,
// W rounded to bf16 once, float32 accumulation) for bfloat16 x on CPUs with
// AVX512_BF16; float64 for float64 x. The base is rounded to x's dtype once.
// The *_mixed variants (mixed batches: one adapter per row group, mixed.h) run the same
// base pass once for every row, then add each group's LoRA terms / scale its rows.
// Layout: x [..., in] (any strides); y [..., out] contiguous in x's dtype, written by the
// base pass directly (the .out overload writes it into the caller's `out`: common/output.h).
// Tests: tests/ops/ (quantized samples in tests/op_db.py), tests/test_quantized.py,
// tests/ops/test_mixed_ops.py, tests/test_mixed_batch.py.
// Benchmark: benchmarks/bench_quant.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "../ops.h"
#include "ia3.h"
#include "linear_common.h"
#include "mixed.h"
#include "quant.h"

namespace peftcore {
namespace {

using cpu::quant::kChunk;
using cpu::quant::kPanelRows;

// Stored 4-bit weight, checked once at the boundary.
struct Weight4 {
  cpu::quant::Packed4 packed;
  int64_t n_blocks;
  const float* absmax = nullptr;  // plain absmax, or:
  const uint8_t* qabsmax = nullptr;
  std::optional<cpu::quant::NestedCode> ncode;
  const float* nabsmax = nullptr;
  float noffset = 0.f;
  int64_t nbs = 0;
  std::vector<at::Tensor> keep;  // contiguous / float32 copies the pointers refer to

  // Scales of blocks [b0, b1) into out.
  void block_scales(int64_t b0, int64_t b1, float* out) const {
    if (absmax != nullptr)
      std::copy(absmax + b0, absmax + b1, out);
    else
      cpu::quant::nested_scales(qabsmax, *ncode, nabsmax, noffset, nbs, b0, b1, out);
  }
};

const float* as_float32(const at::Tensor& t, std::vector<at::Tensor>& keep) {
  keep.push_back(t.to(at::kFloat).contiguous());
  return keep.back().const_data_ptr<float>();
}

Weight4 check_weight4(const char* op, const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& code,
                      int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                      const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& nested_offset,
                      int64_t nested_blocksize, int64_t N, int64_t K) {
  check_weight4_state(op, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                      nested_blocksize, N, K, device_rule(op, at::kCPU));
  Weight4 w;
  w.n_blocks = (N * K + blocksize - 1) / blocksize;
  w.packed = {static_cast<const uint8_t*>(qweight.const_data_ptr()), as_float32(code, w.keep), blocksize, N, K};
  if (!(nested_absmax.has_value() && nested_absmax->defined())) {
    w.absmax = as_float32(absmax, w.keep);
    return w;
  }
  w.keep.push_back(absmax.contiguous());
  w.qabsmax = w.keep.back().const_data_ptr<uint8_t>();
  w.ncode.emplace(as_float32(*nested_code, w.keep));
  w.nabsmax = as_float32(*nested_absmax, w.keep);
  w.noffset = as_float32(*nested_offset, w.keep)[0];
  w.nbs = nested_blocksize;
  return w;
}

void check_int8(const char* op, PEFTCORE_WEIGHT_INT8_ARGS) {
  check_int8_state(op, weight, row_scale, device_rule(op, at::kCPU));
}

// The base product y = x·Wᵀ (+ b) of a block of token rows, threaded over panels of output rows.
// For each panel, `panel(n0, nr, bscale, x, M, Kp, out)` may compute it directly (the
// fused GEMV of 1-2 tokens; returns false otherwise), else `decode(n0, nr, bscale, buf)`
// fills the panel buffer for panel_dot. `row_mult(n)` is the per-output-row factor
// (int8's SCB/127, else 1), `tok_mult[m]` the per-token-row one (int16 x) or null,
// `col_scale[n]` IA3's output scale (feedforward = False) or null: the finished base is
// rounded to out_t, then scaled in acc_t and rounded again, as PEFT's (base(x)·l).to(dtype).
template <typename ct, typename acc_t, typename out_t, typename Panel, typename Decode, typename RowMult>
void base_product_rows(const ct* x, int64_t M, int64_t N, int64_t Kp, const acc_t* bias, int64_t scale_span,
                       const Panel& panel, const Decode& decode, const RowMult& row_mult, const float* tok_mult,
                       const acc_t* col_scale, out_t* y) {
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  // Below ~256K multiply-adds a thread hand-off costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, M * Kp * kPanelRows));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    std::vector<ct> buf(kPanelRows * Kp);
    std::vector<acc_t> out(M * kPanelRows);
    std::vector<float> bscale(scale_span);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelRows, nr = std::min(kPanelRows, N - n0);
      if (!panel(n0, nr, bscale.data(), x, M, Kp, out.data())) {
        decode(n0, nr, bscale.data(), buf.data());
        cpu::quant::panel_dot(buf.data(), x, M, Kp, out.data());
      }
      for (int64_t j = 0; j < nr; ++j) {
        const acc_t f = static_cast<acc_t>(row_mult(n0 + j));
        const acc_t b = bias != nullptr ? acc_t(bias[n0 + j]) : acc_t(0);
        if (col_scale != nullptr) {  // IA3 output scale
          const acc_t c = col_scale[n0 + j];
          for (int64_t m = 0; m < M; ++m) {
            const acc_t t = tok_mult != nullptr ? acc_t(tok_mult[m]) : acc_t(1);  // x·1 is exact
            const out_t base = static_cast<out_t>(out[m * kPanelRows + j] * t * f + b);
            y[m * N + n0 + j] = static_cast<out_t>(static_cast<acc_t>(base) * c);
          }
        } else if (tok_mult != nullptr) {  // int16 x: each token row's scale
          for (int64_t m = 0; m < M; ++m)
            y[m * N + n0 + j] = static_cast<out_t>(out[m * kPanelRows + j] * acc_t(tok_mult[m]) * f + b);
        } else {
          for (int64_t m = 0; m < M; ++m) y[m * N + n0 + j] = static_cast<out_t>(out[m * kPanelRows + j] * f + b);
        }
      }
    }
  });
}

// The base product over all token rows: base_product_rows block by block.
template <typename ct, typename acc_t, typename out_t, typename Panel, typename Decode, typename RowMult>
void base_product(const at::Tensor& xp, int64_t M, int64_t N, int64_t Kp, const acc_t* bias, int64_t scale_span,
                  const Panel& panel, const Decode& decode, const RowMult& row_mult, const float* tok_mult,
                  const acc_t* col_scale, out_t* y) {
  // Token rows in blocks whose x fits in half an L2 (panel_dot streams the whole x block
  // past each decoded panel); each panel is decoded once per block, a small cost next to
  // the block's dot products.
  const int64_t mblock = std::max<int64_t>(6, (int64_t(512) * 1024 / (Kp * int64_t(sizeof(ct)))) / 6 * 6);
  for (int64_t m0 = 0; m0 < M; m0 += mblock)
    base_product_rows<ct, acc_t>(xp.const_data_ptr<ct>() + m0 * Kp, std::min(mblock, M - m0), N, Kp, bias,
                                 scale_span, panel, decode, row_mult, tok_mult == nullptr ? nullptr : tok_mult + m0,
                                 col_scale, y + m0 * N);
}


// x as the kernels read it: [M, Kp] in the compute type, zero-padded, and within each
// chunk the even positions before the odd ones (quant.h, "Buffer layout").
at::Tensor prepare_x(const at::Tensor& x, int64_t M, int64_t K, int64_t Kp, int64_t chunk, at::ScalarType ct) {
  at::Tensor xp = x.reshape({M, K}).to(ct);
  if (Kp != K) xp = at::constant_pad_nd(xp, {0, Kp - K}, 0);
  if (chunk > 1) xp = xp.view({M, Kp / chunk, chunk / 2, 2}).transpose(-1, -2);
  return xp.contiguous().view({M, Kp});
}

// x for the int8 × int16 kernels: each token row scaled by a power of two s_m (the
// smallest with max|x_m| / s_m <= 32767) and rounded to int16. Division by a power of
// two is exact, so every value within 2^7 of the row's max (all of a bf16 row's
// significant bits) is kept exactly; the rest are off by at most s_m / 2 = max|x_m|·2^-16.
std::pair<at::Tensor, at::Tensor> quantize_x_int16(const at::Tensor& x, int64_t M, int64_t K, int64_t Kp) {
  const at::Tensor xs = x.reshape({M, K}).to(at::kFloat);
  const at::Tensor amax = xs.abs().amax({1}, true);
  at::Tensor s = at::exp2(at::ceil(at::log2(amax / 32767.0)));
  s = at::where(amax > 0, s, at::ones_like(s));
  at::Tensor xq = xs.div(s).round_().clamp_(-32767, 32767).to(at::kShort);
  if (Kp != K) xq = at::constant_pad_nd(xq, {0, Kp - K}, 0);
  return {xq.contiguous(), s.reshape({M}).contiguous()};
}

// PEFTCORE_QUANT_FP32=exact (read per call, so a process or a test may switch it): float32
// x keeps exact float32 products on the quantized bases instead of the default below.
bool exact_fp32() {
  const char* v = std::getenv("PEFTCORE_QUANT_FP32");
  return v != nullptr && std::string(v) == "exact";
}

// The products' type. bfloat16 x: bf16 products where the CPU has AVX512_BF16. float32 x:
// the same by default (x rounded to bf16 once, as bitsandbytes' CPU kernel rounds it in
// inference, with W rounded as for bf16 x and float32 accumulation and output), in
// training too (a rule on requires_grad, as bitsandbytes' exact autograd path, would make
// eager and torch.compile'd calls differ: the traced kernel sees no requires_grad):
// vdpbf16ps does 32 multiply-adds per instruction where float32 FMAs do 16, and at 16+
// tokens the products are the limit (benchmarks/bench_quant.py, x float32). Exact float32
// products with exact_fp32(), and for float16 x (11 significant bits, which bf16 would cut
// to 8). float64 for float64 x.
at::ScalarType compute_type(const at::Tensor& x) {
  const auto dt = x.scalar_type();
  if (dt == at::kDouble) return at::kDouble;
  const bool bf16 = dt == at::kBFloat16 || (dt == at::kFloat && !exact_fp32());
  return bf16 && cpu::quant::bf16_dot_available() ? at::kBFloat16 : at::kFloat;
}

// Runs base_product for compute type ct and x's dtype into y (contiguous [..., N], x's
// dtype; every element written); Panel and Decode are generic lambdas over the compute
// type (see base_product). IA3 (ia3.h: l in float32, float64 for float64 x): in_scale
// scales x's features, out_scale the outputs; undefined = none.
template <typename Panel, typename Decode, typename RowMult>
void quantized_linear(at::Tensor& y, const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
                      at::ScalarType ct, int64_t chunk, int64_t scale_span, const Panel& panel,
                      const Decode& decode, const RowMult& row_mult, const at::Tensor& in_scale = {},
                      const at::Tensor& out_scale = {}) {
  const int64_t K = x_in.size(-1), M = cpu::leading_rows(x_in), N = y.size(-1);
  if (M == 0 || N == 0) return;
  const int64_t Kp = cpu::round_up(std::max<int64_t>(K, 1), kChunk);
  // IA3 feedforward: x' = round_x(x ⊙ l), made once in x's dtype (the rounding PEFT does)
  // and prepared for the kernels in its place, like any x.
  const at::Tensor x = in_scale.defined() ? cpu::ia3_scaled_rows(x_in, in_scale) : x_in;
  at::Tensor xp, tok_scale;
  if (ct == at::kShort)
    std::tie(xp, tok_scale) = quantize_x_int16(x, M, K, Kp);
  else
    xp = prepare_x(x, M, K, Kp, ct == at::kDouble ? 1 : chunk, ct);
  // The bias joins the float32 (float64) accumulator before the one rounding.
  const auto acc = ct == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor bias_acc = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_quantized_linear", [&] {
    using out_t = scalar_t;
    out_t* yp = y.data_ptr<out_t>();
    if (ct == at::kDouble) {
      const double* bp = bias_acc.defined() ? bias_acc.const_data_ptr<double>() : nullptr;
      const double* cs = out_scale.defined() ? out_scale.const_data_ptr<double>() : nullptr;
      base_product<double, double>(xp, M, N, Kp, bp, scale_span, panel, decode, row_mult, nullptr, cs, yp);
      return;
    }
    const float* bp = bias_acc.defined() ? bias_acc.const_data_ptr<float>() : nullptr;
    const float* cs = out_scale.defined() ? out_scale.const_data_ptr<float>() : nullptr;
    if (ct == at::kShort) {
      base_product<int16_t, float>(xp, M, N, Kp, bp, scale_span, panel, decode, row_mult,
                                   tok_scale.const_data_ptr<float>(), cs, yp);
    } else if (ct == at::kBFloat16) {
      base_product<c10::BFloat16, float>(xp, M, N, Kp, bp, scale_span, panel, decode, row_mult, nullptr, cs, yp);
    } else {
      base_product<float, float>(xp, M, N, Kp, bp, scale_span, panel, decode, row_mult, nullptr, cs, yp);
    }
  });
}

void check_x_and_bias(const char* op, const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias) {
  check_defined(op, x, "x");
  check_device(op, x, "x", at::kCPU);
  check_float_dtype(op, x, "x");
  TORCH_CHECK(x.dim() >= 1, "peftcore::", op, ": x must have at least 1 dim (features last) but has shape ", x.sizes());
  if (bias.has_value() && bias->defined()) {
    check_device(op, *bias, "bias", at::kCPU);
    check_float_dtype(op, *bias, "bias");
    check_dim(op, *bias, "bias", 1);
    check_size(op, *bias, "bias", 0, N, "out_features");
  }
}

// The checks every 4-bit op makes at entry (x, bias, stored weight).
Weight4 check_linear_4bit(const char* op, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS)) {
  check_x_and_bias(op, x, out_features, bias);
  return check_weight4(op, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                       nested_blocksize, out_features, x.size(-1));
}

// The checks every int8 op makes at entry (weight, row scales, x, bias); returns out_features.
int64_t check_linear_int8(const char* op, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS)) {
  check_int8(op, weight, row_scale);
  const int64_t N = weight.size(0);
  check_x_and_bias(op, x, N, bias);
  check_size(op, weight, "weight", 1, x.size(-1), "x.shape[-1] (in_features)");
  return N;
}

// y (the base output) += the active adapters' terms, as lora_linear adds them.
void add_adapters(const at::Tensor& x, at::Tensor& y, at::TensorList lora_A, at::TensorList lora_B,
                  at::TensorList lora_E, const at::Tensor& scales, const std::optional<at::TensorList>& lora_x) {
  int64_t R = 0;
  const auto active = cpu::active_adapters(scales, lora_A, R);
  if (active.empty() || y.numel() == 0) return;
  const cpu::LinearDims d{cpu::leading_rows(x), x.size(-1), y.size(-1)};
  cpu::add_lowrank(x, lora_A, lora_B, lora_x, active, R, d, y, lora_E);
}

// First block of a panel, after filling bscale with the scales of all its blocks.
int64_t panel_scales(const Weight4& w, int64_t n0, int64_t nr, float* bscale) {
  const int64_t K = w.packed.K, bs = w.packed.blocksize;
  const int64_t b0 = n0 * K / bs, b1 = std::min(w.n_blocks, ((n0 + nr) * K + bs - 1) / bs);
  w.block_scales(b0, b1, bscale);
  return b0;
}

// The panel decoder of a 4-bit weight for any buffer type (float64: natural order).
auto decoder_4bit(const Weight4& w, int64_t chunk) {
  return [&w, chunk](int64_t n0, int64_t nr, float* bscale, auto* buf) {
    using T = std::remove_pointer_t<decltype(buf)>;
    if constexpr (std::is_same_v<T, int16_t>) {
      TORCH_CHECK(false, "peftcore: internal error: int16 compute for a 4-bit weight");
    } else {
      const int64_t b0 = panel_scales(w, n0, nr, bscale);
      const int64_t Kp = cpu::round_up(std::max<int64_t>(w.packed.K, 1), kChunk);
      cpu::quant::decode_4bit(w.packed, n0, nr, bscale, b0, std::is_same_v<T, double> ? 1 : chunk, buf, Kp);
    }
  };
}

// The fused GEMV of a 4-bit panel, where it applies.
auto gemv_panel_4bit(const Weight4& w, int64_t chunk) {
  return [&w, chunk](int64_t n0, int64_t nr, float* bscale, const auto* x, int64_t M, int64_t Kp, auto* out) {
    if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(x)>>, int16_t>) {
      return false;  // never chosen for 4-bit weights
    } else {
      if (nr != kPanelRows) return false;
      panel_scales(w, n0, nr, bscale);
      return cpu::quant::gemv_4bit(w.packed, n0, nr, bscale, chunk, x, M, Kp, out);
    }
  };
}

int64_t scale_span_4bit(int64_t K, int64_t blocksize) { return (kPanelRows * K) / blocksize + 2; }

// Whether W decodes straight into a [N, K] tensor of dtype (float32 / bfloat16, the
// natural-order AVX-512 decoder), and that decode, threaded over rows.
bool flat_4bit(const Weight4& w, at::ScalarType dtype) {
  const bool bf16 = dtype == at::kBFloat16;
  return (dtype == at::kFloat || bf16) && w.packed.N > 0 &&
         cpu::quant::flat_4bit_available(w.packed.K, w.packed.blocksize, bf16);
}

// Rows [n0, n1) of W into out ([n1 - n0, K], contiguous, float32 or bfloat16).
void decode_flat(const Weight4& w, int64_t n0, int64_t n1, at::Tensor& out) {
  const int64_t K = w.packed.K, bs = w.packed.blocksize;
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(n0, n1, std::max<int64_t>(1, 65536 / K), [&](int64_t r0, int64_t r1) {
    const int64_t e0 = r0 * K, e1 = r1 * K, b0 = e0 / bs, b1 = (e1 + bs - 1) / bs, at_ = (r0 - n0) * K;
    std::vector<float> bscale(b1 - b0);
    w.block_scales(b0, b1, bscale.data());
    if (bf16)
      cpu::quant::decode_4bit_flat(w.packed, e0, e1, bscale.data(), b0, out.data_ptr<c10::BFloat16>() + at_);
    else
      cpu::quant::decode_4bit_flat(w.packed, e0, e1, bscale.data(), b0, out.data_ptr<float>() + at_);
  });
}

// The SIMD decoder of the bf16 GEMM path's tiles, where it applies (else the loop below).
bool dequant_int8_simd(const int8_t* cb, const float* scb, int64_t K, int64_t n0, int64_t n1, c10::BFloat16* out) {
  return cpu::quant::dequant_int8_rows(cb, scb, K, n0, n1, out);
}
template <typename T>
bool dequant_int8_simd(const int8_t*, const float*, int64_t, int64_t, int64_t, T*) {
  return false;
}

// Rows [n0, n1) of W = CB·SCB/127 into out ([n1 - n0, K], contiguous, any float dtype), as
// bitsandbytes (and reference.dequantize_int8) computes it: (CB·SCB)·(1/127) in float32
// (float64), two roundings, then one to out's dtype. cb / scb: the contiguous CB and the
// float32 SCB.
void dequant_int8_rows(const int8_t* cb, const float* scb, int64_t n0, int64_t n1, at::Tensor& out) {
  const int64_t K = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "peftcore_dequantize_int8", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* dst = out.data_ptr<scalar_t>() - n0 * K;
    const acc_t inv127 = static_cast<acc_t>(7.874015718698502e-3f);
    at::parallel_for(n0, n1, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
      if (dequant_int8_simd(cb, scb, K, r0, r1, dst + r0 * K)) return;
      for (int64_t n = r0; n < r1; ++n) {
        const acc_t sc = static_cast<acc_t>(scb[n]);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t t = static_cast<acc_t>(cb[n * K + k]) * sc;
          dst[n * K + k] = static_cast<scalar_t>(t * inv127);
        }
      }
    });
  });
}

// y = x·Wᵀ + b with W's rows decoded by decode(n0, n1, tile) into tiles of ~2 MB in the
// compute type ct (L2-resident while the GEMM reads them; never a dense copy of W), each
// tile multiplied into its columns of y in place (row-major, leading dimension N: the GEMM
// writes them directly). The prefill / training path of the quantized bases. float32 x
// with bf16 products (compute_type): x rounded to bf16 once, the GEMM's bf16 result
// (ATen has no bf16 GEMM with a float32 output on CPU) widened into y and the bias added
// in float32 (bitsandbytes rounds its output to bf16 too). IA3 as in quantized_linear:
// in_scale scales x's features first (x' rounded to x's dtype), out_scale the outputs
// after the GEMM (one more rounding than the panel loop's fused scale).
template <typename Decode>
void tiled_gemm_linear(at::Tensor& y, const at::Tensor& x_in, int64_t N, const std::optional<at::Tensor>& bias,
                       at::ScalarType ct, const Decode& decode, const at::Tensor& in_scale,
                       const at::Tensor& out_scale) {
  const at::Tensor x = in_scale.defined() ? cpu::ia3_scaled_rows(x_in, in_scale) : x_in;
  const int64_t M = cpu::leading_rows(x), K = x.size(-1);
  const bool widen = ct != x.scalar_type();
  const int64_t tile_rows = (int64_t(1) << 21) / (std::max<int64_t>(K, 1) * at::elementSize(ct));  // ~2 MB
  const int64_t nb = std::min(N, cpu::round_up(std::max<int64_t>(64, tile_rows), 64));
  const at::Tensor x2 = x.reshape({M, K}).to(ct);
  at::Tensor y2 = y.view({M, N}), buf = at::empty({nb, K}, x.options().dtype(ct));
  at::Tensor yc = widen ? at::empty({M, std::min(nb, N)}, x.options().dtype(ct)) : at::Tensor();
  const bool has_bias = bias.has_value() && bias->defined();
  for (int64_t j0 = 0; j0 < N; j0 += nb) {
    const int64_t n = std::min(nb, N - j0);
    at::Tensor wt = buf.narrow(0, 0, n), yt = y2.narrow(1, j0, n);
    decode(j0, j0 + n, wt);
    if (widen) {
      at::Tensor c = yc.narrow(1, 0, n);
      at::mm_out(c, x2, wt.t());
      if (has_bias)
        at::add_out(yt, c.to(y.scalar_type()), bias->narrow(0, j0, n));
      else
        yt.copy_(c);
    } else if (has_bias) {
      at::addmm_out(yt, bias->narrow(0, j0, n), x2, wt.t());
    } else {
      at::mm_out(yt, x2, wt.t());
    }
  }
  if (out_scale.defined()) y2.mul_(out_scale);
}

// From how many token rows on a quantized base is tiled_gemm_linear, for products in bf16
// and in float32. The crossovers are measured by benchmarks/bench_quant_gemm.py (2 threads):
// * with AMX (oneDNN's bf16 GEMM on AMX tiles far outruns any vdpbf16ps loop; Xeon,
//   benchmarks/README.md §0, against the panel kernels of the time): nf4 0.62 / 0.52 ms
//   (panel / GEMM) at 16 rows; int8 1.24 / 1.23 at 32, 1.77 / 1.48 at 48; float32
//   3.8-3.9 / 3.3-3.4 at 128;
// * without (AVX512-BF16 alone, AMD EPYC Zen 5, §4): the fused register kernels run
//   vdpbf16ps as oneDNN's GEMM does, and the GEMM only wins from ~96 (4-bit) / 128 (int8)
//   rows; the float32 sgemm did not win at 8-256 rows (a trial build forcing the GEMM from
//   8 rows: 2x slower than the float32 panel kernels at 256), so it is not used.
struct GemmRows {
  int64_t bf16, f32;
};
const GemmRows& gemm_rows_4bit() {
  static const GemmRows r = cpu::quant::amx_available() ? GemmRows{12, 128} : GemmRows{96, INT64_MAX};
  return r;
}
const GemmRows& gemm_rows_int8() {
  static const GemmRows r = cpu::quant::amx_available() ? GemmRows{48, 128} : GemmRows{128, INT64_MAX};
  return r;
}

// Whether the base takes tiled_gemm_linear: enough rows, a compute type of bf16 (with bf16
// dot products; x bf16 or float32) or float32 (x float32) and a bias in x's dtype or none.
// The IA3 ops take it too (the single and the mixed ones alike, so that a mixed batch's
// rows equal the single op's).
// PEFTCORE_QUANT_GEMM=0 (read once) keeps every row count on the panel kernels: how
// benchmarks/bench_quant_gemm.py measures the crossover above.
bool gemm_path(const at::Tensor& x, at::ScalarType ct, const GemmRows& min_rows,
               const std::optional<at::Tensor>& bias) {
  static const bool enabled = [] {
    const char* v = std::getenv("PEFTCORE_QUANT_GEMM");
    return v == nullptr || std::string(v) != "0";
  }();
  if (!enabled) return false;
  const bool plain_bias = !(bias.has_value() && bias->defined()) || bias->scalar_type() == x.scalar_type();
  const bool types = (ct == at::kBFloat16 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat)) ||
                     (ct == at::kFloat && x.scalar_type() == at::kFloat);
  return types && plain_bias && cpu::leading_rows(x) >= (ct == at::kBFloat16 ? min_rows.bf16 : min_rows.f32);
}

// Whether the int8 base takes int8_x_linear: from kInt8xRows token rows, where the
// products would be bf16 (bf16 x, float32 x by default) and the GEMM path is on.
// Measured at 128 rows only (benchmarks/bench_quant.py, 4096 x 4096, AMD EPYC Zen 5, no
// AMX: 4.0-4.5 ms per layer against 4.8-4.9 ms for bitsandbytes; the bf16 tile GEMM it
// replaced ran 1.47x bitsandbytes there). Fewer rows were not measured (the crossover with
// the panel kernels may lie lower); with AMX it is used from 128 rows too (the bf16 tile
// GEMM from 48), not measured there.
constexpr int64_t kInt8xRows = 128;
bool int8_x_path(const at::Tensor& x, at::ScalarType ct, const std::optional<at::Tensor>& bias) {
  return ct == at::kBFloat16 && gemm_path(x, ct, GemmRows{kInt8xRows, INT64_MAX}, bias);
}

// The 4-bit base y = x·Wᵀ + b (checked arguments), with IA3's scales where given.
void linear_4bit(at::Tensor& y, const at::Tensor& x, const Weight4& w, const std::optional<at::Tensor>& bias,
                 const at::Tensor& in_scale, const at::Tensor& out_scale) {
  const int64_t K = x.size(-1), bs = w.packed.blocksize;
  const at::ScalarType ct = compute_type(x);
  if (gemm_path(x, ct, gemm_rows_4bit(), bias) && flat_4bit(w, ct)) {
    tiled_gemm_linear(
        y, x, w.packed.N, bias, ct, [&](int64_t n0, int64_t n1, at::Tensor& t) { decode_flat(w, n0, n1, t); },
        in_scale, out_scale);
    return;
  }
  const int64_t chunk = cpu::quant::chunk_4bit(K, bs, ct == at::kBFloat16);
  quantized_linear(y, x, bias, ct, chunk, scale_span_4bit(K, bs), gemv_panel_4bit(w, chunk), decoder_4bit(w, chunk),
                   [](int64_t) { return 1.0; }, in_scale, out_scale);
}

// LLM.int8's own scheme, for many token rows: x quantized to int8 per token row (absmax /
// 127, round to nearest) and multiplied by CB with int8 dot products (at::_int_mm: oneDNN,
// VNNI's 64 multiply-adds per instruction, twice vdpbf16ps' 32; CB read as stored, no
// decode), the int32 sums scaled by sx_m·SCB_n/127 in float32. Feature columns where |x|
// reaches kInt8Outlier in any row (bitsandbytes' default threshold, 6.0) are left out of
// the int8 product and multiplied in float32 against their dequantized columns of W, as
// bitsandbytes' outlier decomposition does. Its error is bitsandbytes' own (x's 8-bit
// quantization dominates; tests/ops/test_quantized_ops.py,
// test_int8_no_less_accurate_than_bitsandbytes, holds it to that), not the bf16 path's.
constexpr double kInt8Outlier = 6.0;

// cb: CB [N, K] int8, contiguous; scb_t: SCB as float32 [N], contiguous.
void int8_x_linear(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& cb, const at::Tensor& scb_t,
                   const std::optional<at::Tensor>& bias, const at::Tensor& in_scale, const at::Tensor& out_scale) {
  const at::Tensor x = in_scale.defined() ? cpu::ia3_scaled_rows(x_in, in_scale) : x_in;
  const int64_t M = cpu::leading_rows(x), K = x.size(-1), N = cb.size(0);
  const float inv127 = 7.874015718698502e-3f;
  at::Tensor xs = x.reshape({M, K}).to(at::kFloat);
  const at::Tensor cols = xs.abs().amax(0).ge(kInt8Outlier).nonzero().view({-1});  // outlier features
  at::Tensor extra;  // float32 [M, N]: the outlier columns' products, or undefined
  if (cols.numel() > 0) {
    // W's columns as bitsandbytes dequantizes them: (CB·SCB)·(1/127) in float32
    const at::Tensor w_cols = cb.index_select(1, cols).to(at::kFloat).mul_(scb_t.view({N, 1})).mul_(inv127);
    extra = at::mm(xs.index_select(1, cols), w_cols.t());
    xs = xs.index_fill(1, cols, 0.0);
  }
  const at::Tensor amax = xs.abs().amax(1);  // [M]
  const at::Tensor sx = at::where(amax > 0, amax / 127.0, at::ones_like(amax)).contiguous();
  const at::Tensor xq = xs.div(sx.unsqueeze(1)).round_().clamp_(-127, 127).to(at::kChar);
  const at::Tensor acc = at::_int_mm(xq, cb.t());  // [M, N] int32
  const at::Tensor b32 = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor l32 = out_scale.defined() ? out_scale.to(at::kFloat).contiguous() : at::Tensor();
  const int32_t* ap = acc.const_data_ptr<int32_t>();
  const float* sxp = sx.const_data_ptr<float>();
  const float* ep = extra.defined() ? extra.const_data_ptr<float>() : nullptr;
  const float* bp = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  const float* lp = l32.defined() ? l32.const_data_ptr<float>() : nullptr;
  const float* scb = scb_t.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "peftcore_int8_x_linear", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t n = 0; n < N; ++n) {
          float v = static_cast<float>(ap[m * N + n]) * sxp[m] * (scb[n] * inv127);
          if (ep != nullptr) v += ep[m * N + n];
          if (bp != nullptr) v += bp[n];
          // IA3's output scale as the panel loop applies it: the base rounded first.
          yp[m * N + n] = lp != nullptr ? static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(v)) * lp[n])
                                        : static_cast<scalar_t>(v);
        }
      }
    });
  });
}

// The LLM.int8 base y = x·Wᵀ + b (checked arguments), with IA3's scales where given.
void linear_int8(at::Tensor& y, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS), const at::Tensor& in_scale,
                 const at::Tensor& out_scale) {
  const int64_t K = x.size(-1);
  const at::Tensor cb = weight.contiguous();
  const at::Tensor scb = row_scale.to(at::kFloat).contiguous();
  const int8_t* cbp = cb.const_data_ptr<int8_t>();
  const float* sp = scb.const_data_ptr<float>();
  const int64_t Kp = cpu::round_up(std::max<int64_t>(K, 1), kChunk);
  // bitsandbytes' dequantization: CB·SCB, then ·(1/127) in float32.
  const float inv127 = 7.874015718698502e-3f;
  // Compute. 1-2 tokens (the fused GEMV, bound by the weight's bytes, so exact products
  // cost nothing): bf16 / fp16 x as int16 against the int8 weights (exact integer
  // products, AVX512_VNNI), float32 x in float32. More tokens (bound by dot-product
  // throughput, where vdpbf16ps outruns vpdpwssd here): compute_type's choice (bf16
  // products for bf16 and, by default, float32 x). float64 for float64 x.
  const int64_t M = cpu::leading_rows(x);
  const bool half = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  at::ScalarType ct = compute_type(x);
  if (int8_x_path(x, ct, bias)) {
    int8_x_linear(y, x, cb, scb, bias, in_scale, out_scale);
    return;
  }
  if (gemm_path(x, ct, gemm_rows_int8(), bias)) {
    tiled_gemm_linear(
        y, x, cb.size(0), bias, ct,
        [&](int64_t n0, int64_t n1, at::Tensor& t) { dequant_int8_rows(cbp, sp, n0, n1, t); }, in_scale, out_scale);
    return;
  }
  if (M <= cpu::quant::kGemvRows && x.scalar_type() != at::kDouble && cpu::quant::simd_available())
    ct = half && cpu::quant::int16_dot_available() ? at::kShort : at::kFloat;
  quantized_linear(
      y, x, bias, ct, 1, 1,
      [&](int64_t n0, int64_t nr, float*, const auto* xp, int64_t Mr, int64_t Kp_, auto* out) {
        return cpu::quant::gemv_int8(cbp, K, n0, nr, xp, Mr, Kp_, out);
      },
      [&](int64_t n0, int64_t nr, float*, auto* buf) { cpu::quant::decode_int8(cbp, K, n0, nr, buf, Kp); },
      [&](int64_t n) { return double(sp[n]) * double(inv127); }, in_scale, out_scale);
}

}  // namespace

at::Tensor lora_linear_4bit_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_LORA_ARGS,
                                std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear_4bit";
  const int64_t K = x.size(-1), N = out_features;
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                                      nested_blocksize, N, bias);
  check_adapters(op, lora_A, lora_B, scales, at::kCPU, x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "out_features");
  cpu::check_lora_x(op, lora_x, x, lora_A.size());
  const at::TensorList E = cpu::checked_lora_E(op, lora_E, lora_A, x.scalar_type());
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_4bit(y, x, w, bias, {}, {});
    add_adapters(x, y, lora_A, lora_B, E, scales, lora_x);
  });
}

at::Tensor ia3_linear_4bit_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS),
                               PEFTCORE_IA3_ARGS(const at::Tensor& active)) {
  const char* op = "ia3_linear_4bit";
  const int64_t K = x.size(-1), N = out_features;
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                                      nested_blocksize, N, bias);
  const at::Tensor l = cpu::ia3_vector(op, ia3_l, active, x.scalar_type(), feedforward ? K : N,
                                       feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                                   : "output feature (feedforward=False: out_features)");
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    if (feedforward)
      linear_4bit(y, x, w, bias, l, {});
    else
      linear_4bit(y, x, w, bias, {}, l);
  });
}

at::Tensor lora_linear_int8_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS), PEFTCORE_LORA_ARGS,
                                std::optional<at::TensorList> lora_x) {
  const char* op = "lora_linear_int8";
  const int64_t N = check_linear_int8(op, x, weight, row_scale, bias), K = x.size(-1);
  check_adapters(op, lora_A, lora_B, scales, at::kCPU, x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "weight.shape[0] (out_features)");
  cpu::check_lora_x(op, lora_x, x, lora_A.size());
  const at::TensorList E = cpu::checked_lora_E(op, lora_E, lora_A, x.scalar_type());
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_int8(y, x, weight, row_scale, bias, {}, {});
    add_adapters(x, y, lora_A, lora_B, E, scales, lora_x);
  });
}

at::Tensor ia3_linear_int8_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS),
                               PEFTCORE_IA3_ARGS(const at::Tensor& active)) {
  const char* op = "ia3_linear_int8";
  const int64_t N = check_linear_int8(op, x, weight, row_scale, bias), K = x.size(-1);
  const at::Tensor l = cpu::ia3_vector(op, ia3_l, active, x.scalar_type(), feedforward ? K : N,
                                       feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                                   : "output feature (feedforward=False: weight.shape[0])");
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    if (feedforward)
      linear_int8(y, x, weight, row_scale, bias, l, {});
    else
      linear_int8(y, x, weight, row_scale, bias, {}, l);
  });
}

// ---- mixed batches (mixed.h): the base pass once for every row, then per row group.
at::Tensor lora_linear_4bit_mixed_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS), PEFTCORE_LORA_ARGS,
                                      const at::Tensor& rows, const std::optional<at::Tensor>& lora_x) {
  const char* op = "lora_linear_4bit_mixed";
  const int64_t K = x.size(-1), N = out_features;
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                                      nested_blocksize, N, bias);
  check_adapters(op, lora_A, lora_B, scales, at::kCPU, x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "out_features");
  const bool has_lx = lora_x.has_value() && lora_x->defined();
  if (has_lx) cpu::check_lora_x(op, at::TensorList(*lora_x), x, 1);
  const at::TensorList E = cpu::checked_lora_E(op, lora_E, lora_A, x.scalar_type());
  const auto segs = cpu::row_segments(op, rows, cpu::leading_rows(x), int64_t(lora_A.size()));
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_4bit(y, x, w, bias, {}, {});
    cpu::add_lowrank_rows(has_lx ? *lora_x : x, segs, lora_A, lora_B, E, scales, N, y);
  });
}

at::Tensor ia3_linear_4bit_mixed_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT4_ARGS),
                                     PEFTCORE_IA3_ARGS(const at::Tensor& rows)) {
  const char* op = "ia3_linear_4bit_mixed";
  const int64_t K = x.size(-1), N = out_features;
  const Weight4 w = check_linear_4bit(op, x, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                                      nested_blocksize, N, bias);
  const auto segs = cpu::row_segments(op, rows, cpu::leading_rows(x), int64_t(ia3_l.size()));
  const auto vecs = cpu::ia3_slot_vectors(op, ia3_l, segs, x.scalar_type(), feedforward ? K : N,
                                          feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                                      : "output feature (feedforward=False: out_features)");
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    if (feedforward) {
      linear_4bit(y, segs.empty() ? x : cpu::ia3_scaled_input_rows(x, segs, vecs), w, bias, {}, {});
      return;
    }
    linear_4bit(y, x, w, bias, {}, {});
    cpu::ia3_scale_output_rows(y, segs, vecs);
  });
}

at::Tensor lora_linear_int8_mixed_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS),
                                      PEFTCORE_LORA_ARGS, const at::Tensor& rows) {
  const char* op = "lora_linear_int8_mixed";
  const int64_t N = check_linear_int8(op, x, weight, row_scale, bias), K = x.size(-1);
  check_adapters(op, lora_A, lora_B, scales, at::kCPU, x.scalar_type(), K, "x.shape[-1] (in_features)", N,
                 "weight.shape[0] (out_features)");
  const at::TensorList E = cpu::checked_lora_E(op, lora_E, lora_A, x.scalar_type());
  const auto segs = cpu::row_segments(op, rows, cpu::leading_rows(x), int64_t(lora_A.size()));
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    linear_int8(y, x, weight, row_scale, bias, {}, {});
    cpu::add_lowrank_rows(x, segs, lora_A, lora_B, E, scales, N, y);
  });
}

at::Tensor ia3_linear_int8_mixed_cpu(const Out* out, PEFTCORE_LINEAR_ARGS(PEFTCORE_WEIGHT_INT8_ARGS),
                                     PEFTCORE_IA3_ARGS(const at::Tensor& rows)) {
  const char* op = "ia3_linear_int8_mixed";
  const int64_t N = check_linear_int8(op, x, weight, row_scale, bias), K = x.size(-1);
  const auto segs = cpu::row_segments(op, rows, cpu::leading_rows(x), int64_t(ia3_l.size()));
  const auto vecs = cpu::ia3_slot_vectors(op, ia3_l, segs, x.scalar_type(), feedforward ? K : N,
                                          feedforward ? "input feature (feedforward=True: x.shape[-1])"
                                                      : "output feature (feedforward=False: weight.shape[0])");
  return write_output(op, out, rows_then(x, N), x, [&](at::Tensor& y) {
    if (feedforward) {
      linear_int8(y, segs.empty() ? x : cpu::ia3_scaled_input_rows(x, segs, vecs), weight, row_scale, bias, {}, {});
      return;
    }
    linear_int8(y, x, weight, row_scale, bias, {}, {});
    cpu::ia3_scale_output_rows(y, segs, vecs);
  });
}

at::Tensor dequantize_4bit_cpu(PEFTCORE_WEIGHT4_ARGS, int64_t in_features, at::ScalarType dtype) {
  const char* op = "dequantize_4bit";
  const int64_t N = out_features, K = in_features;
  const Weight4 w = check_weight4(op, qweight, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                                  nested_blocksize, N, K);
  TORCH_CHECK(at::isFloatingType(dtype), "peftcore::", op, ": dtype must be a floating type but is ", dtype);
  // Rows decoded straight into the result (the QLoRA backward's W, once per call).
  if (flat_4bit(w, dtype)) {
    at::Tensor out = at::empty({N, K}, qweight.options().dtype(dtype));
    decode_flat(w, 0, N, out);
    return out;
  }
  const bool f64 = dtype == at::kDouble;
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (N == 0 || K == 0) return out.to(dtype);
  const auto decode = decoder_4bit(w, 1);  // natural order
  const int64_t Kp = cpu::round_up(K, kChunk);
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "peftcore_dequantize_4bit", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, panels, std::max<int64_t>(1, 65536 / (kPanelRows * K)), [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> buf(kPanelRows * Kp);
      std::vector<float> bscale(scale_span_4bit(K, blocksize));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanelRows, nr = std::min(kPanelRows, N - n0);
        decode(n0, nr, bscale.data(), buf.data());
        for (int64_t j = 0; j < nr; ++j) std::copy(buf.data() + j * Kp, buf.data() + j * Kp + K, op_ + (n0 + j) * K);
      }
    });
  });
  return out.to(dtype);
}

at::Tensor dequantize_int8_cpu(PEFTCORE_WEIGHT_INT8_ARGS, at::ScalarType dtype) {
  const char* op = "dequantize_int8";
  check_int8(op, weight, row_scale);
  TORCH_CHECK(at::isFloatingType(dtype), "peftcore::", op, ": dtype must be a floating type but is ", dtype);
  const at::Tensor cb = weight.contiguous();
  const at::Tensor scb = row_scale.to(at::kFloat).contiguous();
  const int64_t N = cb.size(0), K = cb.size(1);
  // Straight into the result's dtype (the QLoRA-style backward's bf16 W: no float32 copy).
  at::Tensor out = at::empty({N, K}, weight.options().dtype(dtype));
  dequant_int8_rows(cb.const_data_ptr<int8_t>(), scb.const_data_ptr<float>(), 0, N, out);
  return out;
}

}  // namespace peftcore
