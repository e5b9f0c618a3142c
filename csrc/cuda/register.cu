// CUDA kernels of every peftcore op (the lists in ../ops.h), registered beside the CPU
// ones (../cpu/register.cpp). The schemas are defined in Python (peftcore/_ops.py); this
// only adds implementations.
#include <torch/library.h>

#include "ops_cuda.h"

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  PEFTCORE_REGISTER(cuda)
}
