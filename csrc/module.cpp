// `import birnn_fast._C` loads this library, whose static initialisers register the C++ kernels
// (TORCH_LIBRARY_IMPL) under the schemas defined in birnn_fast/library.py. The module itself is
// empty: everything it offers is reached through torch.ops.birnn_fast.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
