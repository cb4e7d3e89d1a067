"""The Triton kernels of birnn_fast, shipped as birnn_fast.kernels: persistent kernels that run a
bidirectional layer's whole time loop in one launch (forward.py, backward.py), the configuration
they launch with (config.py), and the ops' CUDA implementations (ops.py), registered here, once, as
the CUDA kernels of ``birnn_fast::forward`` / ``birnn_fast::backward``.

Modules: common.py (jit helpers both kernels share), pointwise.py (the cells' element-wise math),
forward.py, backward.py (kernel and launcher each), config.py (what a launch picks), ops.py.
"""
import torch

from birnn_fast import library as _library  # noqa: F401  (the schemas the kernels register under)

from .ops import backward_op, forward_op


def _register():
    # Importing twice (e.g. the package under two names) must not register twice: torch raises then.
    for name, kernel in (("forward", forward_op), ("backward", backward_op)):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"birnn_fast::{name}", "CUDA"):
            torch.library.impl(f"birnn_fast::{name}", "CUDA")(kernel)


_register()

__all__ = ["forward_op", "backward_op"]
