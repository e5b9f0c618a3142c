// CPU kernels of every peftcore op (the lists in ../ops.h). The schemas are defined in
// Python (peftcore/_ops.py); C++ only registers implementations, so importing
// peftcore._C alone adds kernels to ops that _ops.py then declares.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  PEFTCORE_REGISTER(cpu)
}
