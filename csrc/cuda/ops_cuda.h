// The CUDA entry points of peftcore: the lists of ../ops.h (the same signatures as the
// CPU ones and the schemas in peftcore/_ops.py), each declared as <op>_cuda. How each is
// computed on the GPU opens its .cu file. Registered in register.cu.
#pragma once

#include "../ops.h"

namespace peftcore {
PEFTCORE_DECLARE(cuda)
}  // namespace peftcore
