"""Which implementation runs a layer.

- ``cpu``: the C++ kernels of ``birnn_fast._C`` (csrc/), default for CPU tensors (fp32, fp64).
- ``triton``: the Triton kernels of ``birnn_fast.kernels``, default for CUDA tensors (fp32, fp16,
  bf16); on CPU tensors only under ``TRITON_INTERPRET=1``, which the tests use.
- ``reference``: ``birnn_fast.reference``, pure PyTorch, any device and dtype.

``BIRNN_FAST_BACKEND=cpu|triton|reference`` forces one: a forced backend that cannot run raises
with the reason. Without it, a tensor no compiled backend can take falls back to ``reference``
with a warning, once per reason.
"""
import os
import warnings

import torch

from . import library  # noqa: F401  (the schemas, before any backend registers kernels under them)

BACKENDS = ("cpu", "triton", "reference")
_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
_load_errors = {}
_warned = set()
_selected = {}  # (BIRNN_FAST_BACKEND, interpreting, device type, dtype) -> backend


def _load_cpu():
    """Import the C++ library once (its kernels register on import); return None or the reason it cannot be used."""
    if "cpu" not in _load_errors:
        try:
            from . import _C  # noqa: F401
        except ImportError as error:
            _load_errors["cpu"] = (f"the C++ library birnn_fast._C is not built or failed to load "
                                   f"(pip install --no-build-isolation -e .): {error}")
        else:
            _load_errors["cpu"] = None
    return _load_errors["cpu"]


def _load_triton():
    """Import the Triton kernels once and register them as the CUDA implementation of the ops."""
    if "triton" not in _load_errors:
        try:
            from .kernels import birnn
        except ImportError as error:
            _load_errors["triton"] = f"Triton kernels are unavailable: {error}"
        else:
            torch.library.impl("birnn_fast::forward", "CUDA")(birnn.forward_op)
            torch.library.impl("birnn_fast::backward", "CUDA")(birnn.backward_op)
            _load_errors["triton"] = None
    return _load_errors["triton"]


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_not(backend, device, dtype):
    """The reason ``backend`` cannot run tensors of this device and dtype, or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend runs CPU tensors, got a {device.type} tensor"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got a {device.type} tensor"
    if dtype not in _DTYPES[backend]:
        names = ", ".join(str(d) for d in _DTYPES[backend])
        return f"the {backend} backend supports {names}, got {dtype}"
    return _load_cpu() if backend == "cpu" else _load_triton()


def select(device, dtype):
    """The backend that runs a layer on tensors of this device and dtype."""
    # Every layer of every call asks: the answer is cached, keyed by all it depends on.
    key = (os.environ.get("BIRNN_FAST_BACKEND"), _interpreting(), device.type, dtype)
    backend = _selected.get(key)
    if backend is None:
        backend = _selected[key] = _select(key[0], device.type, dtype)
    return backend


def _select(forced, device_type, dtype):
    device = torch.device(device_type)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BIRNN_FAST_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
        reason = why_not(forced, device, dtype)
        if reason is not None:
            raise RuntimeError(f"BIRNN_FAST_BACKEND={forced} cannot run: {reason}")
        return forced
    preferred = "triton" if device.type == "cuda" else "cpu"
    reason = why_not(preferred, device, dtype)
    if reason is None:
        return preferred
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"birnn_fast falls back to the slow reference implementation: {reason}", stacklevel=4)
    return "reference"


def implementation(backend, device):
    """(forward, backward) callables with the signatures of the birnn_fast ops."""
    if backend == "triton" and device.type == "cpu":
        from .kernels import birnn

        return birnn.forward_op, birnn.backward_op
    return torch.ops.birnn_fast.forward, torch.ops.birnn_fast.backward
