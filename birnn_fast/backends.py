"""Which implementation runs a layer.

- ``cpu``: the C++ kernels of ``birnn_fast._C`` (csrc/), the ops' CPU kernels; default for CPU tensors.
- the GPU engines, the ops' CUDA kernels: ``triton`` (birnn_fast.kernels), ``cuda`` (our CUDA C++
  kernels, birnn_fast.cuda_kernels, where built) and ``cudnn`` (torch's own RNN, cudnn_route.py).
  Which one runs a CUDA layer is decided per shape inside the op by the measured table of
  dispatch.py (``birnn_fast.engine_info`` says which and why): never slower than cuDNN.
- ``reference``: ``birnn_fast.reference``, pure PyTorch, any device and dtype, differentiated by
  autograd (the layers call it directly, not through the ops).

The compiled libraries and engines are imported here, once, when birnn_fast is imported: the C++
library registers its CPU kernels under the schemas of ``library.py``, and this module registers the
dispatch's kernels for CUDA. Nothing is loaded inside a call (which torch.compile could not trace).
Where nothing can run, the reference is registered in its place, so the ops always run.

``BIRNN_FAST_BACKEND=cpu|triton|cuda|cudnn|reference`` forces one: a forced backend that cannot run
raises with the reason (a GPU engine's per-cell reason at the call). Without it, what no compiled
backend can take (a dtype) falls back to ``reference`` with a warning, once per reason.
"""
import os
import warnings

import torch

from . import dispatch, library, reference

BACKENDS = ("cpu",) + dispatch.ENGINES + ("reference",)
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
    dispatch.load_engines()
    _load_errors.update({name: dispatch._load_errors[name] for name in dispatch.ENGINES})
    if _load_errors["triton"] is not None:
        _load_errors["triton"] = f"Triton kernels are unavailable: {_load_errors['triton']}"
    if all(_load_errors[name] is not None for name in dispatch.ENGINES):
        _register(reference.forward_op, reference.backward_op, "CUDA")
    elif not torch._C._dispatch_has_kernel_for_dispatch_key(library.FORWARD, "CUDA"):
        # Once per process, should the package be imported under two names.
        _register(dispatch.forward_op, dispatch.backward_op, "CUDA")
else:
    for _name in dispatch.ENGINES:
        _load_errors[_name] = "this torch is built without CUDA"


def why_not(backend, device, dtype, projections=False):
    """The reason ``backend`` cannot run tensors of this device and dtype (and, with
    ``projections``, an LSTM with proj_size), or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend runs CPU tensors, got a {device.type} tensor"
    if backend in dispatch.ENGINES and device.type != "cuda":
        return f"the {backend} backend runs CUDA tensors, got a {device.type} tensor"
    if backend in dispatch.ENGINES and backend != "triton":
        # Checked for an LSTM here; the engine checks the call's own cell when it runs.
        return _load_errors[backend] or dispatch.why_not(backend, device, dtype, "LSTM", projections)
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
    # On CUDA the name stands for the ops' CUDA kernels: the first engine that runs (the table picks
    # per shape inside the op).
    candidates = dispatch.ENGINES if device.type == "cuda" else ("cpu",)
    reasons = [why_not(candidate, device, dtype, projections) for candidate in candidates]
    for candidate, reason in zip(candidates, reasons):
        if reason is None:
            return candidate
    reason = reasons[0]
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"birnn_fast falls back to the slow reference implementation: {reason}", stacklevel=5)
    return "reference"
