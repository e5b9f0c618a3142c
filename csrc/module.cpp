// The Python module peftcore._C. It exposes nothing itself: importing it loads
// this shared library, whose static initialisers (csrc/cpu/register.cpp) register
// the C++ kernels with the dispatcher. No pybind11, so it builds against the
// stable (abi3) Python API.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "peftcore native kernels (registered with torch.ops.peftcore)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
