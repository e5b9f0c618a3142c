// CPU kernels of every peftcore op. The schemas are defined in Python
// (peftcore/_ops.py); C++ only registers implementations, so importing
// peftcore._C alone adds kernels to ops that _ops.py then declares.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("lora_linear", &peftcore::lora_linear_cpu);
  m.impl("lora_linear_backward", &peftcore::lora_linear_backward_cpu);
  m.impl("adalora_linear", &peftcore::adalora_linear_cpu);
  m.impl("ia3_linear", &peftcore::ia3_linear_cpu);
  m.impl("lora_embedding", &peftcore::lora_embedding_cpu);
  m.impl("lora_embedding_backward", &peftcore::lora_embedding_backward_cpu);
  m.impl("lora_linear_4bit", &peftcore::lora_linear_4bit_cpu);
  m.impl("dequantize_4bit", &peftcore::dequantize_4bit_cpu);
  m.impl("lora_linear_int8", &peftcore::lora_linear_int8_cpu);
  m.impl("dequantize_int8", &peftcore::dequantize_int8_cpu);
  m.impl("ia3_linear_4bit", &peftcore::ia3_linear_4bit_cpu);
  m.impl("ia3_linear_int8", &peftcore::ia3_linear_int8_cpu);
  m.impl("lora_linear_mixed", &peftcore::lora_linear_mixed_cpu);
  m.impl("ia3_linear_mixed", &peftcore::ia3_linear_mixed_cpu);
  m.impl("lora_linear_4bit_mixed", &peftcore::lora_linear_4bit_mixed_cpu);
  m.impl("lora_linear_int8_mixed", &peftcore::lora_linear_int8_mixed_cpu);
  m.impl("ia3_linear_4bit_mixed", &peftcore::ia3_linear_4bit_mixed_cpu);
  m.impl("ia3_linear_int8_mixed", &peftcore::ia3_linear_int8_mixed_cpu);
}
