// What ops.cpp offers the Python module (csrc/module.cpp): the CPU kernels' registration.
#pragma once

#include <torch/library.h>

namespace birnn_fast::cpu {

// Registers the CPU kernels of birnn_fast::forward / birnn_fast::backward on `m` (an IMPL library of
// namespace birnn_fast, dispatch key CPU). Throws c10::Error where the schemas defined in Python
// (birnn_fast/library.py) are not the ones these kernels were built for.
void register_cpu_kernels(torch::Library& m);

}  // namespace birnn_fast::cpu
