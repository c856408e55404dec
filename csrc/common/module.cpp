// The Python module fastpeft._C. It holds no functions: importing it runs the
// TORCH_LIBRARY registrations of every *_binding.cpp, and the ops are then
// reached as torch.ops.fastpeft.<name> (pattern of pytorch/extension-cpp).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastpeft compiled kernels", -1, nullptr};
  return PyModule_Create(&def);
}
