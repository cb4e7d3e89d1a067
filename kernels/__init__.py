"""The Triton kernels of birnn_fast, shipped as birnn_fast.kernels: persistent kernels that run a
bidirectional layer's whole time loop in one launch (forward.py, backward.py), the configuration
they launch with (config.py), and the Triton engine's implementations of ``birnn_fast::forward`` /
``birnn_fast::backward`` (ops.py), which birnn_fast.dispatch runs for the shapes it gives this engine.

Modules: common.py (jit helpers both kernels share), pointwise.py (the cells' element-wise math),
forward.py, backward.py (kernel and launcher each), config.py (what a launch picks), ops.py.
"""
from .ops import backward_op, forward_op

__all__ = ["forward_op", "backward_op"]
