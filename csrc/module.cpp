// `import birnn_fast._C` registers the C++ kernels (csrc/cpu/ops.cpp) under the schemas defined in
// birnn_fast/library.py. The module itself is empty: everything it offers is reached through
// torch.ops.birnn_fast.
//
// The registration runs here, not in a static initialiser: a library built from other schemas (an
// editable install not rebuilt after a change to library.py) fails the dispatcher's schema check,
// and thrown from a static initialiser that error aborts the interpreter; here it becomes an
// ImportError, which birnn_fast/backends.py turns into the reference fallback and its warning.
#include <Python.h>
#include <torch/library.h>

#include <c10/util/Exception.h>

#include <memory>

#include "cpu/ops.h"

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  // Held for the life of the process: destroying a Library undoes its registrations.
  static std::unique_ptr<torch::Library> library;
  if (!library) {
    try {
      auto registered = std::make_unique<torch::Library>(torch::Library::IMPL, "birnn_fast", c10::DispatchKey::CPU,
                                                         __FILE__, __LINE__);
      // On an error, `registered` goes out of scope and removes what it had registered.
      birnn_fast::cpu::register_cpu_kernels(*registered);
      library = std::move(registered);
    } catch (const c10::Error& error) {
      PyErr_Format(PyExc_ImportError,
                   "birnn_fast._C was built for other op schemas than birnn_fast/library.py's (rebuild it): %s",
                   error.what_without_backtrace());
      return nullptr;
    }
  }
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
