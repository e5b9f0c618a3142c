// Host side of the CUDA (IA)³ scaling (ia3.cu): the checks of the vectors and the flags,
// their preparation, and the scaling pass used by ia3_linear and the quantized ia3 ops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "ia3.cuh"
#include "../common/state.h"

namespace peftcore::cuda {

struct Ia3 {
  std::vector<at::Tensor> vecs;  // vectors that may be active: flattened, contiguous, in acc
  std::vector<size_t> index;     // their positions in ia3_l / active
  State active;
  at::ScalarType acc = at::kFloat;

  // True when the flags are host values and none is on: the op is exactly its base.
  bool none() const { return vecs.empty(); }
  // The launch view (vectors in A = acc's C++ type).
  template <typename A>
  Ia3View<A> view() const {
    Ia3View<A> v{};
    v.n = static_cast<int32_t>(vecs.size());
    v.active = active.dev_ptr();
    for (size_t i = 0; i < vecs.size(); ++i) {
      v.v[i] = vecs[i].const_data_ptr<A>();
      v.index[i] = static_cast<int32_t>(index[i]);
      v.host[i] = active.host_value(index[i]);
    }
    return v;
  }
};

// Checks ia3_l / active (ia3_l[a]: `features` values each, float32 or x's dtype, on `dev`;
// active: [n] on the CPU or `dev`) and prepares them; `what` names `features` in errors.
Ia3 prepare_ia3(const char* op, at::TensorList ia3_l, const at::Tensor& active, at::ScalarType x_dtype,
                int64_t features, const char* what, const at::Device& dev);

// out = round(acc(in) ⊙ l) along the last dim of a [M, F] matrix: in any strides, out
// contiguous (may be `in` itself: in place).
void ia3_scale(const Ia3& v, const at::Tensor& in, at::Tensor& out);

}  // namespace peftcore::cuda
