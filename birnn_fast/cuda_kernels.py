"""The host side of the CUDA cluster kernels (csrc/cuda): ``why_not``, ``forward_op`` and
``backward_op`` with the ops' contract (birnn_fast/library.py), as kernels/ops.py.

The cubins (csrc/cuda/build.py, ``make cubins``) are loaded with NVIDIA's cuda-bindings (driver API)
into torch's current context and launched with cuLaunchKernelEx (grid, cluster dimension, dynamic
shared memory) on torch's current stream, on the tensors' data pointers; the launch's plan is
``cuda_schedule.plan``. Importing this module needs neither a GPU nor cuda-bindings: without them
``why_not`` says why the kernels cannot run. Why cuda-bindings and not a torch CUDAExtension:
csrc/cuda/README.md.

So far: the forward and the backward of every cell in bfloat16 / float16 and float32 (where one
cluster a direction holds W_hh: cuda_schedule.plan and backward_plan), without projections, on
sm_90 / sm_100; where one cluster cannot hold it, and on sm_80 (no clusters), the forward with the
l2 exchange (cuda_schedule.l2_plan: a cooperative launch of plain CTAs exchanging step-tagged words
through L2, whose status word is read after the launch) and the Triton backward on its workspace. float32 follows cuDNN's RNN precision rule (kernels/config.py's fp32_precision), read
at each launch: TF32 MMAs where it says "tf32", else 3xTF32 (as exact as IEEE fp32), and the
launcher's GEMMs (the input projection, grad_input, the weight gradients) under the same rule. Where
the CUDA backward cannot run a layer (``why_not(..., backward=True)``: e.g. the fp32 LSTM at B <= 16
past H = 384) the backward is the Triton kernels' (birnn_fast.kernels), which read this forward's
workspace (same layout).
"""
import ctypes
import os
import pathlib
import threading

import torch

from . import cuda_schedule as schedule
from .cells import cell_of
from .library import masked

try:
    from cuda.bindings import driver
except ImportError as error:  # the kernels cannot run; why_not says so
    driver = None
    _IMPORT_ERROR = f"NVIDIA's cuda-bindings is not installed (pip install cuda-bindings): {error}"
else:
    _IMPORT_ERROR = None

# The backward falls back to the Triton kernels where the CUDA one cannot run; imported here, with the
# package, as backends.py imports them (never inside a call). float32 needs the precision rule that
# lives beside them (kernels/config.py), the one every engine follows.
_triton_ops = None
_fp32_rule = None
if torch.backends.cuda.is_built():
    try:
        from .kernels import ops as _triton_ops
    except ImportError:
        pass
try:
    from .kernels import config as _fp32_rule
except ImportError:
    pass

CUBIN_DIR = pathlib.Path(os.environ.get("BIRNN_FAST_CUBIN_DIR") or pathlib.Path(__file__).resolve().parent / "cubins")
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Compute capability -> the cubin's architecture (build.py's names).
ARCHS = {(8, 0): "80", (9, 0): "90a", (10, 0): "100a"}
CLUSTER_ARCHS = ("90a", "100a")  # the others run only the l2 exchange's forward


class ForwardParams(ctypes.Structure):
    """csrc/cuda/schedule.cuh's ForwardParams, field by field."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("xg", "w_hh", "b_hh", "h0", "c0", "lengths", "output", "h_n", "c_n", "workspace")] + \
               [(name, ctypes.c_int32) for name in
                ("T", "B", "H", "units", "cluster", "slices", "unit_warps", "k_tiles", "warp_k_tiles", "smem_k_tiles",
                 "n_tiles", "relu")]


class L2Params(ctypes.Structure):
    """csrc/cuda/schedule.cuh's L2Params, field by field: the l2 exchange's kernels' argument."""
    _fields_ = [("p", ForwardParams), ("words", ctypes.c_void_p), ("status", ctypes.c_void_p)] + \
               [(name, ctypes.c_int32) for name in ("chunks", "word_rows", "partial_slices", "max_polls")]


class BackwardParams(ctypes.Structure):
    """csrc/cuda/schedule.cuh's BackwardParams, field by field."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("grad_output", "grad_h_n", "grad_c_n", "w_hh", "h0", "c0", "lengths", "output", "workspace",
                 "dgates", "grad_h0", "grad_c0")] + \
               [(name, ctypes.c_int32) for name in
                ("T", "B", "H", "gates", "units", "cluster", "chunk_rows", "n_tiles", "m_tiles", "warp_m_tiles",
                 "k_tiles", "fragment_stride", "reg_fragments", "smem_fragments", "relu")]


def cubin_path(arch, name="forward_lstm"):
    return CUBIN_DIR / f"{name}.sm_{arch}.cubin"


def forward_plan(cell, hidden, batch, dtype, arch="90a", sms=None):
    """The forward's plan on an architecture (build.py's name) with ``sms`` SMs (default
    cuda_schedule.L2_ARCHS'): the cluster kernel's where the architecture has clusters and one a
    direction holds W_hh, else the l2 exchange's; a ValueError naming both reasons otherwise."""
    default_sms, smem_limit = schedule.L2_ARCHS.get(arch, schedule.L2_ARCHS["90a"])
    cluster_reason = "sm_80 has no thread-block clusters"
    if arch in CLUSTER_ARCHS:
        try:
            return schedule.plan(cell, hidden, batch, dtype)
        except ValueError as error:
            cluster_reason = str(error)
    try:
        return schedule.l2_plan(cell, hidden, batch, dtype, sms or default_sms, smem_limit)
    except ValueError as error:
        raise ValueError(f"{cluster_reason}; and the l2 exchange: {error}") from None


def why_not(device, dtype, cell, hidden=None, batch=1, projections=False, backward=False):
    """The reason the CUDA kernels cannot run one layer (tensors of this device and dtype, cell,
    hidden size, batch and, with ``projections``, an LSTM with proj_size), or None if they can;
    without ``hidden``, whether they can run that device, dtype and cell at all. With ``backward``,
    the same for the backward kernel. The forward: the cluster kernel or, where it cannot take the
    layer or the device has no clusters (sm_80), the l2 exchange's (forward_plan)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got a {device.type} tensor"
    if dtype not in DTYPES:
        return f"the cuda backend's kernels take {', '.join(str(d) for d in DTYPES)} so far, got {dtype}"
    if projections:
        return "the cuda backend's kernels do not take proj_size > 0 (LSTM projections) yet"
    try:
        if hidden is not None:
            if backward:
                schedule.backward_plan(cell, hidden, batch, DTYPES[dtype])
            else:
                forward_plan(cell, hidden, batch, DTYPES[dtype])
        elif backward:
            schedule.backward_plan(cell, 8, batch, DTYPES[dtype])
    except ValueError as error:
        return f"the cuda backend cannot run this layer: {error}"
    if dtype == torch.float32 and _fp32_rule is None:
        return "float32 needs birnn_fast.kernels.config (cuDNN's RNN precision rule), which did not import"
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    capability = torch.cuda.get_device_capability(device)
    arch = ARCHS.get(capability)
    if arch is None:
        return (f"the cuda backend's kernels are built for sm_80, sm_90a and sm_100a; this device is "
                f"sm_{capability[0]}{capability[1]}")
    if backward and arch not in CLUSTER_ARCHS:
        return f"the cuda backend's backward needs thread-block clusters (sm_90 or later); this device is sm_{arch}"
    exchange = "cluster"
    if not backward and hidden is not None:
        try:
            exchange = forward_plan(cell, hidden, batch, DTYPES[dtype], arch, _sm_count(device)).exchange
        except ValueError as error:
            return f"the cuda backend cannot run this layer on this device: {error}"
    elif arch not in CLUSTER_ARCHS:
        exchange = "l2"
    path = cubin_path(arch, schedule.backward_cubin_name(cell, DTYPES[dtype]) if backward else
                      schedule.cubin_name(cell, DTYPES[dtype], exchange))
    if not path.exists():
        return f"{path} is missing (make cubins, or set BIRNN_FAST_CUBIN_DIR)"
    return None


def _sm_count(device):
    """The device's SMs (the l2 plan fills them one CTA each)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _arch(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ARCHS[torch.cuda.get_device_capability(index)]


def _check(result):
    """A driver call's (error, *values) -> values; a RuntimeError naming the error otherwise."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(error)
        _, text = driver.cuGetErrorString(error)
        name = name.decode() if name else str(error)
        raise RuntimeError(f"birnn_fast cuda backend: {name}: {text.decode() if text else ''}")
    return values[0] if len(values) == 1 else values


_modules = {}  # (device index, pass) -> (module, {kernel name: function})
_lock = threading.Lock()


def module(device, name):
    """The cubin ``name`` (build.py's UNITS) for the device, loaded into torch's context on
    first use: (module, its functions loaded so far)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if (index, name) not in _modules:
            torch.cuda.init()
            with torch.cuda.device(index):
                torch.cuda.current_stream(index)  # makes torch's (primary) context current in this thread
                context = _check(driver.cuCtxGetCurrent())
                if int(context) == 0:
                    _check(driver.cuInit(0))
                    context = _check(driver.cuDevicePrimaryCtxRetain(_check(driver.cuDeviceGet(index))))
                    _check(driver.cuCtxSetCurrent(context))
                arch = ARCHS[torch.cuda.get_device_capability(index)]
                data = cubin_path(arch, name).read_bytes()
                image = ctypes.create_string_buffer(data, len(data))  # passed by address; the driver copies it
                _modules[index, name] = (_check(driver.cuModuleLoadData(ctypes.addressof(image))), {})
        return _modules[index, name]


def _function(device, plan):
    """The plan's forward kernel, its shared-memory limit raised and (cluster kernels) clusters of 16
    allowed."""
    name = plan.kernel
    loaded, functions = module(device, plan.cubin)
    with _lock:
        if name not in functions:
            function = _check(driver.cuModuleGetFunction(loaded, name.encode()))
            attribute = driver.CUfunction_attribute
            limit = schedule.SMEM_LIMIT
            l2 = getattr(plan, "exchange", "cluster") == "l2"  # (a backward plan: clusters)
            if l2:
                limit = schedule.L2_ARCHS.get(_arch(device), schedule.L2_ARCHS["90a"])[1]
            _check(driver.cuFuncSetAttribute(function, attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                             limit))
            if not l2:
                _check(driver.cuFuncSetAttribute(
                    function, attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1))
            functions[name] = function
        return functions[name]


def launch_config(plan, stream=0):
    """The cuLaunchKernelEx configuration of a plan: grid (C, 2, chunks), C x 1 x 1 clusters; the l2
    exchange's: the same grid, cooperative (the driver refuses a grid that cannot be resident at
    once, whose polls would wait for CTAs that never run)."""
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = plan.grid
    config.blockDimX, config.blockDimY, config.blockDimZ = plan.threads, 1, 1
    config.sharedMemBytes = plan.smem_bytes
    config.hStream = driver.CUstream(stream)
    attribute = driver.CUlaunchAttribute()
    if getattr(plan, "exchange", "cluster") == "l2":  # (a backward plan: clusters)
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
        attribute.value.cooperative = 1
    else:
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attribute.value.clusterDim.x, attribute.value.clusterDim.y, attribute.value.clusterDim.z = plan.cluster, 1, 1
    config.attrs = [attribute]
    config.numAttrs = 1
    return config


def forward_params(plan, T, pointers):
    """The kernel's argument for a plan and the tensors' addresses (a dict of ForwardParams' pointer
    fields; workspace 0 when none is saved)."""
    return ForwardParams(**pointers, T=T, B=plan.batch, H=plan.hidden, units=plan.units, cluster=plan.cluster,
                         slices=plan.slices, unit_warps=plan.unit_warps, k_tiles=plan.k_tiles,
                         warp_k_tiles=plan.warp_k_tiles, smem_k_tiles=plan.smem_k_tiles, n_tiles=plan.n_tiles,
                         relu=int(plan.cell == "RNN_RELU"))


def l2_params(plan, T, pointers, words, status, max_polls):
    """The l2 kernels' argument: forward_params and the exchange's buffer, status word and bound."""
    return L2Params(p=forward_params(plan, T, pointers), words=words, status=status, chunks=plan.chunks,
                    word_rows=plan.word_rows, partial_slices=plan.partial_slices, max_polls=max_polls)


def max_polls():
    """The l2 kernels' bound on a poll (kernels/config.py's MAX_POLLS on a GPU, as the Triton kernels')."""
    return _fp32_rule.MAX_POLLS["cuda"] if _fp32_rule is not None else 1 << 22


def max_active_clusters(plan, device=None):
    """cuOccupancyMaxActiveClusters of the plan's kernel: how many of its clusters fit at once."""
    device = torch.device("cuda") if device is None else torch.device(device)
    return _check(driver.cuOccupancyMaxActiveClusters(_function(device, plan), launch_config(plan)))


def unit_major(weight, gates, hidden):
    """(G*H, ...) rows in torch's gate-major order -> (H*X, ...) with a unit's gates adjacent and
    X = xg_gates(G) slots a unit (zeros past G): the layout of the kernels' input projection
    (cuda_schedule.xg_offset)."""
    slots = schedule.xg_gates(gates)
    rows = weight.reshape(gates, hidden, *weight.shape[1:]).transpose(0, 1)  # [H, G, ...]
    if slots > gates:
        rows = torch.cat([rows, rows.new_zeros(hidden, slots - gates, *weight.shape[1:])], dim=1)
    return rows.reshape(hidden * slots, *weight.shape[1:])


def check_inputs(cell, input, weights, h0, c0, lengths):
    """(T, B, I, G, H) of the op's arguments, or the error naming the first that is wrong."""
    gates = cell_of(cell).gates
    if input.dim() != 3:
        raise ValueError(f"Expected input of 3 dimensions (T, B, I), got {list(input.shape)}")
    if len(weights) != 8:
        raise ValueError(f"the cuda backend takes the 8 parameters of a bidirectional layer without projections, "
                         f"got {len(weights)}")
    T, B, I = input.shape
    H = weights[1].shape[0] // gates
    expected = {"h0": (h0, (2, B, H)), "c0": (c0, (2, B, H) if cell == "LSTM" else (0,)), "lengths": (lengths, (B,))}
    for d in range(2):
        for kind, shape in enumerate(((gates * H, I), (gates * H, H), (gates * H,), (gates * H,))):
            expected[f"weights[{4 * d + kind}]"] = (weights[4 * d + kind], shape)
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"Expected {name} size {shape}, got {list(tensor.shape)}")
        if name != "lengths" and tensor.dtype != input.dtype:
            raise TypeError(f"Expected {name} of dtype {input.dtype}, got {tensor.dtype}")
        if tensor.device != input.device:
            raise RuntimeError(f"birnn_fast: expected {name} on {input.device} (input's device), got {tensor.device}")
    if lengths.dtype != torch.int64:
        raise TypeError(f"Expected lengths int64, got {lengths.dtype}")
    return T, B, I, gates, H


def kernel_dtype(dtype):
    """The kernels' name of a layer's dtype: float32 by cuDNN's RNN rule now, "tf32" or "fp32"
    (3xTF32); bf16 / fp16 as they are."""
    if dtype == torch.float32:
        return "tf32" if _fp32_rule.fp32_precision() == "tf32" else "fp32"
    return DTYPES[dtype]


def input_projection(input, weights, gates, hidden):
    """x @ W_ih^T + b_ih + b_hh of both directions (the GRU's n gate without b_hn, which r scales),
    (T, B, 2, H, xg_gates(G)) in input's dtype: one cuBLAS GEMM at the precision cuDNN's RNN uses
    for the layer's dtype (fp32 accumulation; float32 in TF32 or IEEE by its rule)."""
    T, B, I = input.shape
    weight = torch.cat([unit_major(weights[4 * d], gates, hidden) for d in range(2)])  # [2*H*X, I]
    biases = []
    for d in range(2):
        bias = weights[4 * d + 2] + weights[4 * d + 3]
        if gates == 3:
            bias[2 * hidden:] = weights[4 * d + 2][2 * hidden:]
        biases.append(unit_major(bias, gates, hidden))
    if input.dtype == torch.float32 and _fp32_rule is not None:
        with _fp32_rule.rnn_gemm_precision():
            projection = torch.addmm(torch.cat(biases), input.reshape(T * B, I), weight.t())
    else:
        projection = torch.addmm(torch.cat(biases), input.reshape(T * B, I), weight.t())
    return projection.view(T, B, 2, hidden, schedule.xg_gates(gates))


def forward_op(cell, input, weights, h0, c0, lengths, save_workspace):
    """``birnn_fast::forward`` (library.py) by the cluster kernel.

    input: (T, B, I); weights: per direction weight_ih (G*H, I), weight_hh (G*H, H), bias_ih,
    bias_hh (G*H); h0: (2, B, H); c0: (2, B, H) for LSTM, else (0,); lengths: (B,) int64 on
    input's device. Returns output
    (T, B, 2H), h_n (2, B, H), c_n (2, B, H) or (0,), workspace (T, B, 2, W*H) fp32 or (0,)."""
    T, B, _, gates, H = check_inputs(cell, input, weights, h0, c0, lengths)
    reason = why_not(input.device, input.dtype, cell, H, B)
    if reason is not None:
        raise RuntimeError(f"birnn_fast cuda backend: {reason}")
    saved = cell_of(cell).saved
    workspace = input.new_empty((T, B, 2, saved * H) if save_workspace else (0,), dtype=torch.float32)
    output = input.new_empty(T, B, 2 * H)
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    if B == 0:
        return output, h_n, c_n, workspace
    forward_into(cell, input, weights, h0, c0, lengths, output, h_n, c_n, workspace if save_workspace else None)
    return output, h_n, c_n, workspace


def forward_into(cell, input, weights, h0, c0, lengths, output, h_n, c_n, workspace=None, exchange=None):
    """The forward's launch into given results (output (T, B, 2H), h_n (2, B, H), c_n (2, B, H) or
    (0,), workspace (T, B, 2, W*H) fp32 or None), all contiguous: the device check poisons them first.
    ``exchange="l2"`` takes the l2 exchange's plan even where a cluster holds the layer (the device
    check's odd sizes)."""
    T, B, _, gates, H = check_inputs(cell, input, weights, h0, c0, lengths)
    xg = input_projection(input, weights, gates, H)
    w_hh = torch.stack([weights[1], weights[5]]).contiguous()
    b_hh = torch.stack([weights[3], weights[7]]).contiguous()
    h0, c0, lengths = h0.contiguous(), c0.contiguous(), lengths.contiguous()
    arch, sms = _arch(input.device), _sm_count(input.device)
    if exchange == "l2":
        plan = schedule.l2_plan(cell, H, B, kernel_dtype(input.dtype), sms, schedule.L2_ARCHS[arch][1])
    else:
        plan = forward_plan(cell, H, B, kernel_dtype(input.dtype), arch, sms)
    pointers = dict(
        xg=xg.data_ptr(), w_hh=w_hh.data_ptr(), b_hh=b_hh.data_ptr(), h0=h0.data_ptr(), c0=c0.data_ptr(),
        lengths=lengths.data_ptr(),
        output=output.data_ptr(), h_n=h_n.data_ptr(), c_n=c_n.data_ptr(),
        workspace=workspace.data_ptr() if workspace is not None else 0)
    if plan.exchange == "l2":
        # Every word tag -1 (no step's: an earlier launch's words are never taken for this one's),
        # queued before the kernel on its stream.
        words = torch.full((plan.exchange_words,), -1, dtype=torch.int64, device=input.device)
        status = torch.zeros(1, dtype=torch.int32, device=input.device)
        polls = max_polls()
        params = l2_params(plan, T, pointers, words.data_ptr(), status.data_ptr(), polls)
    else:
        params = forward_params(plan, T, pointers)
    arguments = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    function = _function(input.device, plan)
    stream = torch.cuda.current_stream(input.device).cuda_stream
    # xg, w_hh, the words and the contiguous copies live until the kernel has read them: the caching
    # allocator reuses their memory only for work queued after this launch on the same stream.
    _check(driver.cuLaunchKernelEx(launch_config(plan, stream), function, ctypes.addressof(arguments), 0))
    if plan.exchange == "l2":
        check_status(status, plan, polls)


def check_status(status, plan, polls):
    """After an l2 launch: a RuntimeError naming the kernel and plan if a poll gave up (the grid was
    not resident at once; the results are garbage). A host sync; skipped inside a CUDA graph capture,
    where none is allowed (the bounded polls still end the launch)."""
    if torch.cuda.is_current_stream_capturing():
        return
    if int(status.item()):
        raise RuntimeError(
            f"birnn_fast cuda backend: {plan.kernel} with {plan}: a CTA waited for the step-tagged words of the "
            f"others for more than {polls} polls, so its grid of {plan.ctas} CTAs was not resident at once (a GPU "
            "with fewer free SMs than the plan assumed); its results are garbage")


def backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace,
                output_mask=(True, True, True, True)):
    """``birnn_fast::backward`` (library.py) on this forward's workspace: the cluster kernel for the
    recurrence (the gate gradients, grad_h0, grad_c0), then cuBLAS for grad_input and the weight
    gradients; the Triton kernels' backward (same workspace layout) where the CUDA one cannot run
    the layer (``why_not(..., backward=True)``)."""
    reason = _backward_reason(cell, input, weights, workspace, (grad_output, grad_h_n, grad_c_n))
    if reason is not None:
        if _triton_ops is None:
            raise RuntimeError(f"birnn_fast cuda backend: {reason}, and the Triton kernels it would fall back to "
                               "are unavailable")
        return _triton_ops.backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths,
                                      output, workspace, output_mask)
    T, B, I, gates, H = check_inputs(cell, input, weights, h0, c0, lengths)
    if tuple(grad_output.shape) != (T, B, 2 * H):
        raise ValueError(f"Expected grad_output size {(T, B, 2 * H)}, got {list(grad_output.shape)}")
    if B == 0:
        return masked(output_mask, input.new_zeros(input.shape), [torch.zeros_like(w) for w in weights],
                      torch.empty_like(h0), torch.empty_like(c0))
    dgates = input.new_empty(T, B, 2, gates * H, dtype=torch.float32)
    grad_h0, grad_c0 = torch.empty_like(h0), torch.empty_like(c0)
    backward_into(cell, grad_output, grad_h_n, grad_c_n, weights, h0, c0, lengths, output, workspace, dgates,
                  grad_h0, grad_c0)
    grad_input, grad_weights = gradients_from_dgates(cell, dgates, input, weights, h0, output, workspace, lengths)
    return masked(output_mask, grad_input, grad_weights, grad_h0, grad_c0)


def _backward_reason(cell, input, weights, workspace, grads):
    """Why the CUDA backward cannot run this call (then Triton's does), or None."""
    if len(weights) != 8:
        return "the cuda backend's kernels do not take proj_size > 0 (LSTM projections) yet"
    gates = cell_of(cell).gates
    H = weights[1].shape[0] // gates if weights[1].dim() == 2 else 0
    T, B = (input.shape[0], input.shape[1]) if input.dim() == 3 else (0, 0)
    reason = why_not(input.device, input.dtype, cell, H, B, False, True)
    if reason is not None:
        return reason
    if tuple(workspace.shape) != (T, B, 2, cell_of(cell).saved * H) or workspace.dtype != torch.float32:
        return f"the workspace {list(workspace.shape)} is not this forward's (T, B, 2, {cell_of(cell).saved}*H) fp32"
    if any(grad.dtype != input.dtype for grad in grads):
        return "the kernel reads the incoming gradients in the input's dtype"
    return None


def backward_params(plan, T, pointers):
    """The backward kernel's argument for a plan and the tensors' addresses (a dict of BackwardParams'
    pointer fields)."""
    return BackwardParams(**pointers, T=T, B=plan.batch, H=plan.hidden, gates=plan.gates, units=plan.units,
                          cluster=plan.cluster, chunk_rows=plan.chunk_rows, n_tiles=plan.n_tiles,
                          m_tiles=plan.m_tiles, warp_m_tiles=plan.warp_m_tiles, k_tiles=plan.k_tiles,
                          fragment_stride=plan.fragment_stride, reg_fragments=plan.reg_fragments,
                          smem_fragments=plan.smem_fragments, relu=int(plan.cell == "RNN_RELU"))


def backward_into(cell, grad_output, grad_h_n, grad_c_n, weights, h0, c0, lengths, output, workspace, dgates,
                  grad_h0, grad_c0):
    """The backward kernel's launch into given results (dgates (T, B, 2, G*H) fp32, grad_h0 (2, B, H),
    grad_c0 (2, B, H) or (0,), contiguous): the device check poisons them first."""
    T, B, _ = output.shape
    H = h0.shape[-1]
    grad_output, grad_h_n, grad_c_n, h0, c0, lengths, output, workspace = (
        x.contiguous() for x in (grad_output, grad_h_n, grad_c_n, h0, c0, lengths, output, workspace))
    w_hh = torch.stack([weights[1], weights[5]]).contiguous()
    plan = schedule.backward_plan(cell, H, B, kernel_dtype(output.dtype))
    params = backward_params(plan, T, dict(
        grad_output=grad_output.data_ptr(), grad_h_n=grad_h_n.data_ptr(), grad_c_n=grad_c_n.data_ptr(),
        w_hh=w_hh.data_ptr(), h0=h0.data_ptr(), c0=c0.data_ptr(), lengths=lengths.data_ptr(),
        output=output.data_ptr(), workspace=workspace.data_ptr(), dgates=dgates.data_ptr(),
        grad_h0=grad_h0.data_ptr(), grad_c0=grad_c0.data_ptr()))
    arguments = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    function = _function(output.device, plan)
    stream = torch.cuda.current_stream(output.device).cuda_stream
    # w_hh and the contiguous copies live until the kernel has read them (the caching allocator reuses
    # their memory only for work queued after this launch on the same stream).
    _check(driver.cuLaunchKernelEx(launch_config(plan, stream), function, ctypes.addressof(arguments), 0))


def previous_hidden(output, h0, lengths):
    """(2, T, B, H): the h each (direction, time, row) step started from; h0 at a row's first step."""
    T, B, H2 = output.shape
    H = H2 // 2
    forward_prev = torch.cat([h0[0, None].to(output.dtype), output[:-1, :, :H]])
    reverse_prev = torch.cat([output[1:, :, H:], output.new_zeros(1, B, H)])
    first = torch.arange(T, device=output.device)[:, None, None] == (lengths - 1)[None, :, None]  # [T, B, 1]
    reverse_prev = torch.where(first, h0[1, None].to(output.dtype), reverse_prev)
    return torch.stack([forward_prev, reverse_prev])


def gradients_from_dgates(cell, dgates, input, weights, h0, output, workspace, lengths):
    """grad_input and the weight gradients (per direction, the order of ``weights``) from the gate
    gradients (T, B, 2, G*H) fp32 (0 at padding): GEMMs over all T*B steps at once in the input's
    dtype, fp32 accumulation (cuDNN's rule: float32 in TF32 or IEEE as the forward's projection), as
    the Triton launcher's."""
    if input.dtype == torch.float32 and _fp32_rule is not None:
        with _fp32_rule.rnn_gemm_precision():
            return _gradients_from_dgates(cell, dgates, input, weights, h0, output, workspace, lengths)
    return _gradients_from_dgates(cell, dgates, input, weights, h0, output, workspace, lengths)


def _gradients_from_dgates(cell, dgates, input, weights, h0, output, workspace, lengths):
    T, B, I = input.shape
    GH = dgates.shape[-1]
    H = GH // cell_of(cell).gates
    dtype = input.dtype
    dgates_hh = dgates
    if cell == "GRU":
        # The hidden projection of n enters scaled by r (0 at padding, as the gate gradients).
        dgates_hh = dgates.clone()
        dgates_hh[..., 2 * H:] *= workspace[..., :H]
    flat, flat_hh = dgates.view(T * B, 2, GH), dgates_hh.view(T * B, 2, GH)
    weight_ih = torch.stack([weights[0], weights[4]])
    grad_input = (flat.reshape(T * B, 2 * GH).to(dtype) @ weight_ih.view(2 * GH, I)).view(T, B, I)
    grad_weight_ih = flat.permute(1, 2, 0).to(dtype) @ input.reshape(T * B, I)
    h_prev = previous_hidden(output, h0, lengths).reshape(2, T * B, H)
    grad_weight_hh = flat_hh.permute(1, 2, 0).to(dtype) @ h_prev.to(dtype)
    grad_bias_ih, grad_bias_hh = flat.sum(0).to(dtype), flat_hh.sum(0).to(dtype)
    return grad_input, [grad[d] for d in range(2) for grad in (grad_weight_ih, grad_weight_hh, grad_bias_ih,
                                                               grad_bias_hh)]
