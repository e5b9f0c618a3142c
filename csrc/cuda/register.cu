// CUDA kernels of every peftcore op, registered beside the CPU ones (../cpu/register.cpp).
// The schemas are defined in Python (peftcore/_ops.py); this only adds implementations.
#include <torch/library.h>

#include "ops_cuda.h"

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("lora_linear", &peftcore::lora_linear_cuda);
  m.impl("lora_linear_backward", &peftcore::lora_linear_backward_cuda);
  m.impl("adalora_linear", &peftcore::adalora_linear_cuda);
  m.impl("ia3_linear", &peftcore::ia3_linear_cuda);
  m.impl("lora_embedding", &peftcore::lora_embedding_cuda);
  m.impl("lora_embedding_backward", &peftcore::lora_embedding_backward_cuda);
  m.impl("lora_linear_4bit", &peftcore::lora_linear_4bit_cuda);
  m.impl("dequantize_4bit", &peftcore::dequantize_4bit_cuda);
  m.impl("lora_linear_int8", &peftcore::lora_linear_int8_cuda);
  m.impl("dequantize_int8", &peftcore::dequantize_int8_cuda);
  m.impl("ia3_linear_4bit", &peftcore::ia3_linear_4bit_cuda);
  m.impl("ia3_linear_int8", &peftcore::ia3_linear_int8_cuda);
  m.impl("lora_linear_mixed", &peftcore::lora_linear_mixed_cuda);
  m.impl("ia3_linear_mixed", &peftcore::ia3_linear_mixed_cuda);
  m.impl("lora_linear_4bit_mixed", &peftcore::lora_linear_4bit_mixed_cuda);
  m.impl("lora_linear_int8_mixed", &peftcore::lora_linear_int8_mixed_cuda);
  m.impl("ia3_linear_4bit_mixed", &peftcore::ia3_linear_4bit_mixed_cuda);
  m.impl("ia3_linear_int8_mixed", &peftcore::ia3_linear_int8_mixed_cuda);
}
