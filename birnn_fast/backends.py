"""Which implementation runs a layer.

- ``cpu``: the C++ kernels of ``birnn_fast._C`` (csrc/), the ops' CPU kernels; default for CPU tensors.
- ``triton``: the Triton kernels of ``birnn_fast.kernels``, the ops' CUDA kernels; default for CUDA
  tensors.
- ``reference``: ``birnn_fast.reference``, pure PyTorch, any device and dtype, differentiated by
  autograd (the layers call it directly, not through the ops).

Both compiled libraries are imported here, once, when birnn_fast is imported: importing one
registers its kernels under the schemas of ``library.py``. Nothing is loaded inside a call (which
torch.compile could not trace). Where one is missing, the reference is registered in its place,
so the ops always run.

``BIRNN_FAST_BACKEND=cpu|triton|reference`` forces one: a forced backend that cannot run raises
with the reason. Without it, what no compiled backend can take (a dtype, projections) falls back
to ``reference`` with a warning, once per reason.
"""
import os
import warnings

import torch

from . import library, reference

BACKENDS = ("cpu", "triton", "reference")
_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
# The backends whose kernels take the 10 weights of an LSTM layer with projections (proj_size > 0).
_PROJECTIONS = {"cpu": True, "triton": True}
_load_errors = {}
_warned = set()
_selected = {}  # (BIRNN_FAST_BACKEND, device type, dtype, projections) -> backend
# Holds the Python registrations below for as long as the package is loaded.
_LIBRARY = torch.library.Library(library.NAMESPACE, "IMPL")


def _register(forward, backward, dispatch_key):
    _LIBRARY.impl("forward", forward, dispatch_key)
    _LIBRARY.impl("backward", backward, dispatch_key)


try:
    from . import _C  # noqa: F401  (its init registers the CPU kernels; ImportError if built for other schemas)
except ImportError as error:
    _load_errors["cpu"] = (f"the C++ library birnn_fast._C is not built or failed to load "
                           f"(pip install --no-build-isolation -e .): {error}")
    _register(reference.forward_op, reference.backward_op, "CPU")
else:
    _load_errors["cpu"] = None

if torch.backends.cuda.is_built():
    try:
        from . import kernels  # noqa: F401  (importing it registers the Triton kernels for CUDA)
    except ImportError as error:
        _load_errors["triton"] = f"Triton kernels are unavailable: {error}"
        _register(reference.forward_op, reference.backward_op, "CUDA")
    else:
        _load_errors["triton"] = None
else:
    _load_errors["triton"] = "this torch is built without CUDA"


def why_not(backend, device, dtype, projections=False):
    """The reason ``backend`` cannot run tensors of this device and dtype (and, with
    ``projections``, an LSTM with proj_size), or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend runs CPU tensors, got a {device.type} tensor"
    if backend == "triton" and device.type != "cuda":
        return f"the triton backend runs CUDA tensors, got a {device.type} tensor"
    if dtype not in _DTYPES[backend]:
        names = ", ".join(str(d) for d in _DTYPES[backend])
        return f"the {backend} backend supports {names}, got {dtype}"
    if projections and not _PROJECTIONS[backend]:
        return f"the {backend} backend's kernels do not take proj_size > 0 (LSTM projections)"
    return _load_errors[backend]


@torch.compiler.assume_constant_result
def select(device, dtype, projections=False):
    """The backend that runs a layer on tensors of this device and dtype (with ``projections``: an
    LSTM layer with proj_size > 0). torch.compile calls it once, when it traces, and keeps the
    answer: tracing it would guard the graph on this module's cache, and cannot warn."""
    # Every layer of every call asks: the answer is cached, keyed by all it depends on.
    key = (os.environ.get("BIRNN_FAST_BACKEND"), device.type, dtype, projections)
    backend = _selected.get(key)
    if backend is None:
        backend = _selected[key] = _select(*key)
    return backend


def _select(forced, device_type, dtype, projections):
    device = torch.device(device_type)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BIRNN_FAST_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
        reason = why_not(forced, device, dtype, projections)
        if reason is not None:
            raise RuntimeError(f"BIRNN_FAST_BACKEND={forced} cannot run: {reason}")
        return forced
    preferred = "triton" if device.type == "cuda" else "cpu"
    reason = why_not(preferred, device, dtype, projections)
    if reason is None:
        return preferred
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"birnn_fast falls back to the slow reference implementation: {reason}", stacklevel=5)
    return "reference"
