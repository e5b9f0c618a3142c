// Per-layer adapter state (LoRA `scales`, IA3 `active`) as the kernels read it.
// On the GPU (the layers' buffers move with the model) the values are never brought to
// the host: CUDA kernels read them from device memory and the ATen paths mask with them
// as 0-d tensors, so a call does not sync and can be captured in a CUDA graph. On the CPU
// they are read once on the host, and adapters known to be off are skipped outright.
// Device independent (ATen only): the CUDA ops and the shared backward bodies
// (lora_backward.h) of both backends use it.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace peftcore {

struct State {
  at::Tensor dev;           // float32, contiguous, on the GPU; undefined for host state
  std::vector<float> host;  // the values, for host state

  bool on_device() const { return dev.defined(); }
  // False only when the adapter is known to be off (host value 0).
  bool maybe_on(size_t a) const { return on_device() || host[a] != 0.0f; }
  // The host value (device state: unused, 0).
  float host_value(size_t a) const { return on_device() ? 0.0f : host[a]; }
  const float* dev_ptr() const { return on_device() ? dev.const_data_ptr<float>() : nullptr; }
  // t · s_a, in t's dtype (s_a widened exactly from float32).
  at::Tensor scaled(const at::Tensor& t, size_t a) const {
    return on_device() ? t * dev.select(0, static_cast<int64_t>(a)).to(t.scalar_type())
                       : t * static_cast<double>(host[a]);
  }
  // t where s_a != 0, else zeros (host state: t; the caller skipped adapters that are off).
  // A select, not a product, so NaN in a disabled adapter never leaks through 0·NaN.
  at::Tensor masked(const at::Tensor& t, size_t a) const {
    if (!on_device()) return t;
    return at::where(dev.select(0, static_cast<int64_t>(a)) != 0, t, at::zeros({}, t.options()));
  }
};

inline State read_state(const at::Tensor& t) {
  State s;
  if (t.is_cuda()) {
    s.dev = t.to(at::kFloat).contiguous();  // no copy for the usual float32 vector
  } else {
    const at::Tensor c = t.to(at::kFloat).contiguous();
    s.host.assign(c.const_data_ptr<float>(), c.const_data_ptr<float>() + c.numel());
  }
  return s;
}

}  // namespace peftcore
