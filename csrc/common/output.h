// The result of a forward op, for both of its overloads: the functional op allocates it,
// the `.out` overload writes into the caller's buffer (static buffers: CUDA graphs,
// serving engines). Each native entry point is written once, as
//   at::Tensor <op>_<device>(const Out* out, <schema arguments>)
// with out == nullptr for the functional op; Forward<> below turns it into the two
// signatures the dispatcher wants. Device independent (ATen only): used by the CPU and
// the CUDA kernels alike. Tests: tests/ops/test_out_variants.py, tests/test_cuda.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>
#include <vector>

namespace peftcore {

// x's leading dims followed by `last`: the shape of every linear op's result.
inline std::vector<int64_t> rows_then(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

// The caller's buffer of a .out call, with every tensor argument of that call (gathered
// by Forward<>::out), none of which the buffer may share memory with.
struct Out {
  at::Tensor& buffer;
  std::vector<at::Tensor> inputs;
};

inline void collect_tensors(std::vector<at::Tensor>& v, const at::Tensor& t) {
  if (t.defined()) v.push_back(t);
}
inline void collect_tensors(std::vector<at::Tensor>& v, const std::optional<at::Tensor>& t) {
  if (t.has_value()) collect_tensors(v, *t);
}
inline void collect_tensors(std::vector<at::Tensor>& v, at::TensorList ts) {
  for (const at::Tensor& t : ts) collect_tensors(v, t);
}
inline void collect_tensors(std::vector<at::Tensor>& v, const std::optional<at::TensorList>& ts) {
  if (ts.has_value()) collect_tensors(v, *ts);
}
template <class T>
void collect_tensors(std::vector<at::Tensor>&, const T&) {}  // ints, bools, dtypes

// Runs write(y) on a contiguous y of `sizes` with like's dtype and device, and returns
// it: a fresh tensor for the functional op; for the .out overload, the caller's buffer
// once checked (shape, dtype and device exactly the result's, no memory shared with any
// input). A non-contiguous buffer is served through a contiguous temporary and one copy:
// the kernels write rows of contiguous outputs.
template <class Write>
at::Tensor write_output(const char* op, const Out* out, at::IntArrayRef sizes, const at::Tensor& like,
                        Write&& write) {
  // The ATen calls inside record no autograd: an op with a formula (_ops.py) runs this
  // below autograd already, and the inference-only ones (mixed batches, every .out) would
  // otherwise trip ATen's refusal of out= arguments that require grad, e.g. in an eval()
  // model run without no_grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto fresh = [&] { return at::empty(sizes, like.options().memory_format(at::MemoryFormat::Contiguous)); };
  if (out == nullptr) {
    at::Tensor y = fresh();
    write(y);
    return y;
  }
  at::Tensor& o = out->buffer;
  TORCH_CHECK(o.defined(), "peftcore::", op, ".out: out is an undefined tensor");
  TORCH_CHECK(o.device() == like.device(), "peftcore::", op, ".out: out is on ", o.device(), " but the result is on ",
              like.device());
  TORCH_CHECK(o.scalar_type() == like.scalar_type(), "peftcore::", op, ".out: out has dtype ", o.scalar_type(),
              " but the result has dtype ", like.scalar_type());
  TORCH_CHECK(o.sizes() == sizes, "peftcore::", op, ".out: out has shape ", o.sizes(), " but the result has shape ",
              sizes, " (out is never resized: it is a static buffer)");
  TORCH_CHECK(at::has_internal_overlap(o) != at::MemOverlap::Yes, "peftcore::", op,
              ".out: out has elements that share memory (e.g. an expanded tensor); it must be writable element by "
              "element");
  // Every input: the kernels read x, the weights, adapters and state while writing out.
  for (const at::Tensor& t : out->inputs) {
    const auto s = at::get_overlap_status(o, t);
    TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, "peftcore::", op,
                ".out: out shares memory with an input of shape ", t.sizes(), " (dtype ", t.scalar_type(),
                "); the op reads its inputs while writing out");
  }
  if (o.is_contiguous()) {
    write(o);
    return o;
  }
  at::Tensor y = fresh();
  write(y);
  o.copy_(y);
  return o;
}

// y = x·Wᵀ + b written into y (contiguous, [..., out]) through the same ATen calls that
// at::linear makes for each layout, so the base is F.linear's bit for bit (the tests
// compare with F.linear exactly): addmm for 2-D x with a bias, and for any contiguous x
// with a 1-D bias (x viewed as [rows, in], 1-D x included); else matmul, then the bias
// added (1-D x through mm on [1, in], as matmul does). Row counts are explicit products: a -1 cannot be inferred from 0 elements.
inline void linear_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias && x.dim() == 2) {
    at::addmm_out(y, *bias, x, weight.t());
  } else if (has_bias && x.is_contiguous() && bias->dim() == 1) {
    int64_t rows = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
    at::Tensor y2 = y.view({rows, weight.size(0)});
    at::addmm_out(y2, *bias, x.view({rows, x.size(-1)}), weight.t());
  } else {
    if (x.dim() == 1) {  // matmul's own route for 1-D x; matmul_out would resize y and back
      at::Tensor y2 = y.unsqueeze(0);
      at::mm_out(y2, x.unsqueeze(0), weight.t());
    } else {
      at::matmul_out(y, x, weight.t());
    }
    if (has_bias) y.add_(*bias);
  }
}

// The dispatcher's two signatures of one forward entry point
// `at::Tensor Entry(const Out* out, A... args)`: functional(args...) and out(args..., out).
template <auto Entry>
struct Forward;

template <class... A, at::Tensor (*Entry)(const Out*, A...)>
struct Forward<Entry> {
  static at::Tensor functional(A... args) { return Entry(nullptr, args...); }
  static void out(A... args, at::Tensor& buffer) {
    Out o{buffer, {}};
    (collect_tensors(o.inputs, args), ...);
    Entry(&o, args...);
  }
};

}  // namespace peftcore
