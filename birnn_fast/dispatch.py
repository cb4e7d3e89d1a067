"""Which GPU engine runs a layer of a given shape: never slower than cuDNN.

The ops' CUDA kernels (registered by backends.py) are ``forward_op`` / ``backward_op`` here: each
call picks one engine of ``ENGINES`` and runs that engine's implementation of the op contract
(library.py):

- ``triton``: our Triton kernels (birnn_fast.kernels);
- ``cuda``: our CUDA C++ kernels (birnn_fast.cuda_kernels), where built;
- ``cudnn``: torch's own RNN (cudnn_route.py), with lengths on a PackedSequence as a user would run it.

The choice is data: ``dispatch_table.json`` beside this file holds, per (GPU architecture, dtype,
cell, lengths or not, forward-only or training), the engine measured fastest at each (H, B) point
of a hardware run, and names the run (``benchmarks/gpu/run.py --dispatch-out`` writes it). A shape
the table has not measured takes the nearest measured point of its group (L1 distance in log2 H and
log2 B; a tie goes to the earlier engine of ``ENGINES``, ours); a group the table has no point of
takes the first engine of ``ENGINES`` that can run it. An engine that cannot run a shape (not built,
a dtype it lacks) is skipped for the next one in ``ENGINES``.

``BIRNN_FAST_BACKEND=triton|cuda|cudnn`` forces an engine for every shape (one that cannot run raises
with its reason). ``engine_info`` says which engine a layer takes and why.

The choice is a function of the shapes, the table and the environment only, so the backward takes
the engine its forward took (each reads the other's workspace). Choices are cached per key.
"""
import contextlib
import dataclasses
import importlib
import json
import math
import os

import torch

from . import library
from .cells import cell_of

# The GPU engines in order of preference: a tie or an unmeasured shape goes to the first that runs.
ENGINES = ("triton", "cuda", "cudnn")
_MODULES = {"triton": "birnn_fast.kernels", "cuda": "birnn_fast.cuda_kernels", "cudnn": "birnn_fast.cudnn_route"}
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.json")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}

_engines = {}  # name -> module, imported once when backends.py loads this (never inside a call)
_load_errors = {}
_choices = {}  # Key -> Choice
_override = []  # engines forced by ``forcing`` (innermost last; process-wide), before BIRNN_FAST_BACKEND


@dataclasses.dataclass(frozen=True)
class Key:
    """What the engine of a layer depends on."""
    arch: str          # "sm_90"
    dtype: str         # "float32", "bfloat16", ...
    cell: str          # "LSTM", ...
    H: int
    B: int
    lengths: bool      # rows of different lengths (False: every row runs all T steps)
    training: bool     # a backward will follow (forward with save_workspace, and the backward)
    projections: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    engine: str
    reason: str


def load_engines():
    """Import every engine's module (backends.py calls this once, at import). An engine that fails to
    import keeps its reason."""
    for name in ENGINES:
        try:
            _engines[name] = importlib.import_module(_MODULES[name])
            _load_errors[name] = None
        except (ImportError, OSError, RuntimeError) as error:
            # A module absent, or present and unable to load its library (a cubin, a driver): the
            # package still imports, the other engines run, forcing this one says why.
            _load_errors[name] = f"the {name} engine ({_MODULES[name]}) is unavailable: {error}"


def why_not(engine, device, dtype, cell="LSTM", projections=False, hidden=None, batch=1):
    """The reason ``engine`` cannot run this layer (of ``hidden`` units and ``batch`` rows where
    given: the cuda engine's kernels take some shapes only), or None."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine not in _engines:
        return _load_errors.get(engine) or f"the {engine} engine is not loaded"
    module = _engines[engine]
    if engine == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"the triton engine runs CUDA tensors, got a {device.type} tensor"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the triton engine supports torch.float32, torch.float16, torch.bfloat16, got {dtype}"
        return None
    if engine == "cuda":
        return module.why_not(device, dtype, cell, hidden, batch, projections=projections)
    return module.why_not(device, dtype, cell, projections=projections)


def load_table(path=TABLE_PATH):
    """The measured table: {"run": ..., "rule": ..., "entries": [{arch, dtype, cell, lengths, training,
    H, B, engine, ms: {engine: median ms}}]}; an empty table where the file is missing."""
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return {"run": None, "entries": []}


TABLE = load_table()


def _group(entry, key):
    return (entry["arch"] == key.arch and entry["dtype"] == key.dtype and entry["cell"] == key.cell
            and bool(entry["lengths"]) == key.lengths and bool(entry["training"]) == key.training)


def _distance(entry, key):
    return abs(math.log2(entry["H"] / key.H)) + abs(math.log2(entry["B"] / key.B))


def measured(key, table=None):
    """The entry of ``table`` (default TABLE) that decides ``key``: the nearest measured point of its
    group (ties to the engine earliest in ENGINES), or None."""
    table = TABLE if table is None else table
    group = [entry for entry in table["entries"] if _group(entry, key)]
    if not group:
        return None
    rank = {name: index for index, name in enumerate(ENGINES)}
    return min(group, key=lambda entry: (_distance(entry, key), rank.get(entry["engine"], len(ENGINES))))


def choose(key, forced=None, device=None, table=None):
    """The Choice of engine for ``key`` (``forced``: BIRNN_FAST_BACKEND's engine). Raises a
    RuntimeError where a forced engine cannot run the layer."""
    device = torch.device("cuda") if device is None else device
    dtype = getattr(torch, key.dtype)
    if forced:
        reason = why_not(forced, device, dtype, key.cell, key.projections, key.H, key.B)
        if reason is not None:
            raise RuntimeError(f"BIRNN_FAST_BACKEND={forced} cannot run: {reason}")
        return Choice(forced, f"forced by BIRNN_FAST_BACKEND={forced}")
    table = TABLE if table is None else table
    entry = measured(key, table)
    order = list(ENGINES)
    if entry is not None and entry["engine"] in order:
        order.remove(entry["engine"])
        order.insert(0, entry["engine"])
    skipped = []
    for engine in order:
        reason = why_not(engine, device, dtype, key.cell, key.projections, key.H, key.B)
        if reason is not None:
            skipped.append(f"{engine}: {reason}")
            continue
        if entry is None:
            why = (f"the table ({table.get('run')}) has no {key.arch} {key.dtype} {key.cell} "
                   f"{'lengths' if key.lengths else 'equal-length'} {'training' if key.training else 'forward'} "
                   f"point: the first engine that runs")
        else:
            times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in sorted(entry.get("ms", {}).items()))
            exact = entry["H"] == key.H and entry["B"] == key.B
            why = (f"{'measured' if exact else 'nearest measured point'} H={entry['H']} B={entry['B']}: "
                   f"{entry['engine']} fastest ({times}; run {table.get('run')})")
            if engine != entry["engine"]:
                why = f"{entry['engine']} cannot run it; {why}"
        if skipped:
            why += "; skipped " + "; ".join(skipped)
        return Choice(engine, why)
    raise RuntimeError("no GPU engine of birnn_fast can run this layer: " + "; ".join(skipped))


def _arch(device):
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _key(cell, input, weights, lengths_differ, training):
    _, hidden, _ = library.sizes(cell, weights)
    return Key(_arch(input.device), DTYPE_NAMES.get(input.dtype, str(input.dtype).replace("torch.", "")), cell,
               hidden, input.shape[1], lengths_differ, training, len(weights) == 10)


@contextlib.contextmanager
def forcing(engine):
    """Every call inside runs on ``engine`` (a GPU engine of ENGINES), whatever the table and
    BIRNN_FAST_BACKEND say: how the benchmarks time each engine through the op. Calls only: the
    backward of a forward run inside must run inside too."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    _override.append(engine)
    try:
        yield
    finally:
        _override.pop()


def _cached(key, device):
    forced = _override[-1] if _override else os.environ.get("BIRNN_FAST_BACKEND")
    if forced not in ENGINES:
        forced = None  # cpu / reference / unset: the layer reached the ops' CUDA kernels, the table decides
    cache_key = (key, forced, device.type)
    choice = _choices.get(cache_key)
    if choice is None:
        choice = _choices[cache_key] = choose(key, forced, device)
    return choice


def engine_for(cell, input, weights, lengths, training):
    """The engine name that runs this call. Looks at ``lengths`` on the device (a host sync) only where
    equal-length and varying-length calls of this shape take different engines."""
    equal = _cached(_key(cell, input, weights, False, training), input.device)
    varying = _cached(_key(cell, input, weights, True, training), input.device)
    if equal.engine == varying.engine:
        return equal.engine
    return varying.engine if bool((lengths != input.shape[0]).any()) else equal.engine


def forward_op(cell, input, weights, h0, c0, lengths, save_workspace):
    """``birnn_fast::forward`` on CUDA: the chosen engine's."""
    engine = engine_for(cell, input, weights, lengths, save_workspace)
    return _engines[engine].forward_op(cell, input, weights, h0, c0, lengths, save_workspace)


def backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace,
                output_mask=(True, True, True, True)):
    """``birnn_fast::backward`` on CUDA: the engine whose forward (with save_workspace) made ``workspace``."""
    engine = engine_for(cell, input, weights, lengths, True)
    return _engines[engine].backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths,
                                        output, workspace, output_mask)


def engine_info(cell, B, H, dtype=torch.float32, device="cuda", lengths=False, training=True, proj_size=0):
    """Which engine runs a bidirectional layer of ``cell`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") with
    B rows and H hidden units of ``dtype`` on ``device``, and why: ``(engine, reason)``.
    ``lengths``: rows of different lengths; ``training``: a backward follows. CPU tensors: the C++
    kernels (``cpu``), unless BIRNN_FAST_BACKEND or a missing build says otherwise."""
    from . import backends  # the backends import this module: a call-time import breaks the cycle

    cell_of(cell)
    device = torch.device(device)
    backend = backends.select(device, dtype, proj_size > 0)
    if backend == "reference":
        return "reference", "no compiled engine runs it (see the warning birnn_fast gives)"
    if device.type != "cuda":
        return backend, "CPU tensors run the ops' CPU kernels"
    key = Key(_arch(device), DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")), cell, H, B, bool(lengths),
              bool(training), proj_size > 0)
    choice = _cached(key, device)
    return choice.engine, choice.reason
