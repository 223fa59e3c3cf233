// Loading this library (``import torchrec_tt._C``) runs the static
// TORCH_LIBRARY_IMPL registrations of the CPU (and, when built, CUDA) kernels.
// Schemas are defined in Python (torchrec_tt/ops/_library.py), so there is no
// TORCH_LIBRARY block here and no pybind11: the module is an empty shell.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "torchrec_tt compiled kernels (registered with the PyTorch dispatcher)",
      -1,  // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
