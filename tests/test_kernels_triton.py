"""The Triton kernels (kernels/) against the reference and torch's own layers.

Without a GPU the kernels run on CPU tensors through the Triton interpreter, which must be chosen
before triton is imported. The compile tests build the kernels for sm_80 and sm_90 without a GPU
and check shared memory and spills from the cubin.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from birnn_fast.kernels import backward as kernels_backward  # noqa: E402
from birnn_fast.kernels import config as kernels  # noqa: E402
from birnn_fast.kernels import forward as kernels_forward  # noqa: E402
from birnn_fast.reference import birnn_layer  # noqa: E402
from concurrent_interpreter import concurrent_programs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type != "cuda"
if not INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 with a GPU present: the interpreter would get CUDA tensors",
                allow_module_level=True)

CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
MODULES = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN, "RNN_RELU": torch.nn.RNN}


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_inputs(cell, T, B, I, H, lengths, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    G = kernels.GATES[cell]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)

    scale = H ** -0.5 if H > 1 else 0.7
    return dict(
        input=randn(T, B, I), weight_ih=randn(2, G * H, I, scale=scale), weight_hh=randn(2, G * H, H, scale=scale),
        bias_ih=randn(2, G * H, scale=scale), bias_hh=randn(2, G * H, scale=scale), h0=randn(2, B, H),
        c0=randn(2, B, H) if cell == "LSTM" else torch.empty(0, device=DEVICE, dtype=dtype),
        lengths=torch.tensor(lengths, dtype=torch.int64, device=DEVICE),
    )


def primal_names(cell):
    names = ["input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0"]
    return names + (["c0"] if cell == "LSTM" else [])


def reference_with_grads(cell, args, grads):
    """Reference outputs and the gradients of every primal, by autograd through birnn_layer."""
    args = {name: value.detach().clone().requires_grad_(name in primal_names(cell)) for name, value in args.items()}
    outputs = birnn_layer(cell, *args.values())
    used = [(out, g) for out, g in zip(outputs, grads) if out.numel()]
    primals = [args[name] for name in primal_names(cell)]
    vjp = torch.autograd.grad([o for o, _ in used], primals, [g for _, g in used])
    return [o.detach() for o in outputs], dict(zip(primal_names(cell), vjp))


def run_kernels(cell, args, grads, pick=None):
    """Forward and backward launchers on args; pick(cell, input, H, backward) gives their configs
    (default: the launchers' own)."""
    H = args["weight_hh"].shape[-1]
    configs = [pick(cell, args["input"], H, backward) if pick else None for backward in (False, True)]
    output, h_n, c_n, workspace = kernels_forward.forward(cell, *args.values(), config=configs[0])
    grad_output, grad_h_n, grad_c_n = grads
    result = kernels_backward.backward(cell, grad_output, grad_h_n, grad_c_n, args["input"], args["weight_ih"],
                                       args["weight_hh"], args["bias_hh"], args["h0"], args["c0"], args["lengths"],
                                       output, workspace, config=configs[1])
    names = ["input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0"]
    return (output, h_n, c_n, workspace), dict(zip(names, result))


def make_grads(cell, T, B, H, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    grad_c_n = torch.randn(2, B, H, generator=generator) if cell == "LSTM" else torch.empty(0)
    return [torch.randn(T, B, 2 * H, generator=generator).to(DEVICE, dtype),
            torch.randn(2, B, H, generator=generator).to(DEVICE, dtype), grad_c_n.to(DEVICE, dtype)]


def check_padding(output, lengths):
    T = output.shape[0]
    padded = torch.arange(T, device=output.device)[:, None] >= lengths[None, :]  # [T, B]
    assert (output[padded] == 0).all(), "padded outputs must be exactly 0"
    assert torch.isfinite(output[~padded]).all(), "non-finite valid outputs"


@pytest.fixture(autouse=True)
def ieee_fp32():
    """Compare fp32 at fp32 precision: no TF32 in the kernels' dots nor in the reference's matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def launcher_pick(cell, input, H, backward):
    return kernels.launch_config(cell, input.shape[1], H, input.dtype, input.device, backward)


def streamed_pick(cell, input, H, backward):
    config = launcher_pick(cell, input, H, backward)._replace(NK=1, BK=16, RESIDENT=False)
    return config._replace(FUSED=kernels.fused_gates(cell, input.dtype, "ieee", config.BB, config.BH, config.BK,
                                                     False, backward))


@pytest.fixture(params=["resident", "streaming"])
def weights(request):
    """W_hh loaded once (what the launcher picks here) or streamed each step, in K chunks of 16: the
    configs' pick (see run_kernels)."""
    return request.param, launcher_pick if request.param == "resident" else streamed_pick


# (T, B, H, lengths): T = 1, 5, 13; B = 1, 3, 17 (two batch blocks); H = 1, 7, 20, 40 (K split in
# 1, 1, 2, 4 chunks when resident; forward 1, 1, 2, 3 passes of 16 when streaming); lengths with 1 and T, unsorted.
SHAPES = [
    (1, 1, 1, [1]),
    (5, 3, 7, [2, 5, 1]),
    (13, 17, 20, [13, 1, 7, 13, 2, 9, 12, 1, 5, 3, 13, 6, 11, 4, 8, 10, 2]),
    (4, 2, 40, [3, 4]),
]


def check_against_reference(cell, T, B, H, lengths, pick=None):
    """Output, h_n, c_n and every gradient of the kernels against reference.birnn_layer + autograd."""
    args = make_inputs(cell, T, B, 3, H, lengths)
    grads = make_grads(cell, T, B, H)
    expected, expected_grads = reference_with_grads(cell, args, grads)
    (output, h_n, c_n, workspace), actual_grads = run_kernels(cell, args, grads, pick)

    check_padding(output, args["lengths"])
    assert workspace.shape == (T, B, 2, kernels.WORKSPACE[cell] * H) and workspace.dtype == torch.float32
    for name, actual, reference in zip(("output", "h_n", "c_n"), (output, h_n, c_n), expected):
        assert actual.shape == reference.shape, name
        if reference.numel():
            assert relative_error(actual, reference) <= 1e-4, name
    assert actual_grads["c0"].shape == args["c0"].shape
    for name in primal_names(cell):
        assert actual_grads[name].shape == args[name].shape, name
        error = relative_error(actual_grads[name], expected_grads[name])
        assert error <= 1e-4, f"grad {name}: relative error {error:.3g}"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,B,H,lengths", SHAPES, ids=[f"T{s[0]}-B{s[1]}-H{s[2]}" for s in SHAPES])
def test_matches_reference(cell, T, B, H, lengths, weights):
    check_against_reference(cell, T, B, H, lengths, weights[1])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("fused", [False, True], ids=["per-gate", "fused"])
def test_fused_and_per_gate_products(cell, fused, weights):
    """Both forms of the forward's products, whichever the launcher would pick: one product of every
    gate's columns (FUSED; streamed, its K loop double-buffered) and one per gate. H = 40 streamed:
    3 chunks of 16, the last one partial."""
    T, B, _, lengths = SHAPES[2]

    def pick(cell, input, H, backward):
        return weights[1](cell, input, H, backward)._replace(FUSED=fused and not backward)

    check_against_reference(cell, T, B, 40, lengths, pick)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_without_double_buffer(cell, weights, monkeypatch):
    """The backward's streamed K loop as Triton before 3.9 builds it (DOUBLE_BUFFER off: the form the
    3.6 configurations were checked with), against the reference."""
    monkeypatch.setattr(kernels, "double_buffered_backward", lambda: False)
    T, B, _, lengths = SHAPES[2]
    check_against_reference(cell, T, B, 40, lengths, weights[1])


# A GPU of few SMs for the grid tests: hidden units split over programs, batch blocks looped over.
SMALL_GPU_SMS = 6


@pytest.fixture
def small_gpu(weights):
    """The pick of select_config for a GPU of SMALL_GPU_SMS SMs, with W_hh resident (the only
    candidate) or streamed: a direction's hidden units split over programs that exchange h at the grid
    barrier each step. Interpreted, the programs run concurrently, one thread each
    (concurrent_interpreter), as on a GPU."""
    resident = weights[0] == "resident"

    def pick(cell, input, H, backward):
        return kernels.select_config(cell, input.shape[1], H, input.dtype,
                                     kernels.dot_precision(input.dtype, input.device), SMALL_GPU_SMS,
                                     SHARED_LIMIT[90] if resident else 0, backward,
                                     stream_tiles=() if resident else kernels.STREAM_TILES)

    with concurrent_programs() if INTERPRETED else contextlib.nullcontext():
        yield pick


# On the small GPU, H = 40 takes 3 programs per direction (resident: 16 units each, K in 4 chunks;
# streamed: 16 units, 32 rows when B > 16, K in 2 passes of 32). B = 40 runs its batch blocks one
# after the other in each step: 3 rounds of 16 rows resident, 2 of 32 streamed; the last 8 rows, of
# lengths 1 and 2, leave a block with nothing to do after two steps.
GRID_SHAPES = [
    (7, 40, 40, [7, 1, 5, 7, 2, 6, 3, 1, 4, 3, 7, 6, 5, 4, 5, 7, 2, 6, 1, 3, 7, 4, 2, 5, 6, 1, 7, 3, 5, 2, 4, 6,
                 2, 1, 2, 2, 1, 1, 2, 1]),
    (4, 2, 40, [3, 4]),
]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,B,H,lengths", GRID_SHAPES, ids=[f"T{s[0]}-B{s[1]}-H{s[2]}" for s in GRID_SHAPES])
def test_grid_matches_reference(cell, T, B, H, lengths, weights, small_gpu):
    """As test_matches_reference, on grids of several programs per direction meeting at the barrier."""
    input = torch.empty(T, B, 3, device=DEVICE)
    for backward in (False, True):
        config = small_gpu(cell, input, H, backward)
        assert config.n_hblocks == 3 and config.RESIDENT == (weights[0] == "resident"), config
    check_against_reference(cell, T, B, H, lengths, small_gpu)


def test_barrier_floor():
    """The benchmarks' floor kernel meets at the barrier once per step of the forward it stands for,
    T times, however many rounds of batch blocks a step takes (here H = 40 over 3 programs, B = 40 in 3
    rounds of 16)."""
    sys.path.insert(0, ROOT)
    from benchmarks.gpu.floor import barrier_floor

    T, B, H = 3, 40, 40
    input = torch.zeros(T, B, 3, device=DEVICE)
    config = kernels.select_config("LSTM", B, H, input.dtype, "ieee", SMALL_GPU_SMS, SHARED_LIMIT[90])
    assert (config.n_hblocks, config.n_bprog, triton.cdiv(B, config.BB)) == (3, 1, 3)
    with concurrent_programs() if INTERPRETED else contextlib.nullcontext():
        counter = barrier_floor("LSTM", input, H, config)
    stride = kernels_forward.barrier_counters(config, input.device).shape[0] // 3
    assert counter[::stride].tolist() == [T * 3, T * 3, 0]  # each direction's counter; the status word


def torch_layer(cell, args):
    """torch's own bidirectional layer holding args' weights."""
    I, H = args["input"].shape[-1], args["weight_hh"].shape[-1]
    extra = {"nonlinearity": "relu" if cell == "RNN_RELU" else "tanh"} if cell.startswith("RNN") else {}
    layer = MODULES[cell](I, H, bidirectional=True, **extra).to(DEVICE)
    with torch.no_grad():
        for direction, suffix in enumerate(("", "_reverse")):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(layer, f"{name}_l0{suffix}").copy_(args[name][direction])
    return layer


@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_packed(cell):
    """Against nn.LSTM / nn.GRU / nn.RNN on a PackedSequence: outputs, final state and weight gradients."""
    T, B, H, lengths = 6, 4, 5, [3, 6, 1, 4]
    args = make_inputs(cell, T, B, 3, H, lengths, seed=2)
    layer = torch_layer(cell, args)
    x = args["input"].detach().clone().requires_grad_(True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, args["lengths"].cpu(), enforce_sorted=False)
    state = (args["h0"], args["c0"]) if cell == "LSTM" else args["h0"]
    packed_out, final = layer(packed, state)
    expected_out, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out, total_length=T)
    expected_h_n = final[0] if cell == "LSTM" else final

    grads = make_grads(cell, T, B, H, seed=3)
    torch_outputs = [expected_out, expected_h_n] + ([final[1]] if cell == "LSTM" else [])
    params = [x] + [getattr(layer, f"{n}_l0{s}") for n in ("weight_ih", "weight_hh") for s in ("", "_reverse")]
    torch_grads = torch.autograd.grad(torch_outputs, params, grads[:len(torch_outputs)])

    (output, h_n, c_n, _), actual_grads = run_kernels(cell, args, grads)
    assert relative_error(output, expected_out) <= 1e-4
    assert relative_error(h_n, expected_h_n) <= 1e-4
    if cell == "LSTM":
        assert relative_error(c_n, final[1]) <= 1e-4
    assert relative_error(actual_grads["input"], torch_grads[0]) <= 1e-4
    for k, name in enumerate(("weight_ih", "weight_hh")):
        expected = torch.stack(torch_grads[1 + 2 * k: 3 + 2 * k])
        assert relative_error(actual_grads[name], expected) <= 1e-4, name


def test_non_contiguous_input():
    T, B, H, lengths = 4, 3, 6, [4, 1, 3]
    args = make_inputs("LSTM", T, B, 3, H, lengths, seed=4)
    args["input"] = args["input"].transpose(0, 1).contiguous().transpose(0, 1)  # batch-first storage
    assert not args["input"].is_contiguous()
    output, h_n, c_n, _ = kernels_forward.forward("LSTM", *args.values())
    expected = birnn_layer("LSTM", *args.values())
    for actual, reference in zip((output, h_n, c_n), expected):
        assert relative_error(actual, reference) <= 1e-4


def low_precision_dtypes():
    # The interpreter's tl.dot reads bfloat16 operands as integers (checked with triton 3.9).
    return [torch.float16] + ([torch.bfloat16] if not INTERPRETED else [])


def check_half_precision(cell, dtype, T, B, H, lengths, pick):
    """Error against an fp32 reference at most ~2x that of the reference itself run in dtype."""
    args32 = make_inputs(cell, T, B, 3, H, lengths, seed=5)
    args = {name: value.to(dtype) if value.is_floating_point() else value for name, value in args32.items()}
    grads32 = make_grads(cell, T, B, H, seed=6)
    grads = [g.to(dtype) for g in grads32]
    expected, expected_grads = reference_with_grads(cell, args32, grads32)
    low, low_grads = reference_with_grads(cell, args, grads)
    (output, h_n, c_n, workspace), actual_grads = run_kernels(cell, args, grads, pick)
    assert output.dtype == dtype and workspace.dtype == torch.float32
    check_padding(output, args["lengths"])
    pairs = [("output", output, low[0], expected[0]), ("h_n", h_n, low[1], expected[1])]
    pairs += [(f"grad {n}", actual_grads[n], low_grads[n], expected_grads[n]) for n in primal_names(cell)]
    for name, actual, reference_low, reference in pairs:
        assert actual.dtype == dtype, name
        bound = 2 * relative_error(reference_low, reference) + 1e-3
        assert relative_error(actual, reference) <= bound, name


@pytest.mark.parametrize("dtype", low_precision_dtypes())
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_half_precision(cell, dtype, weights):
    check_half_precision(cell, dtype, 5, 3, 7, [2, 5, 1], weights[1])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_grid_half_precision(cell, small_gpu):
    """fp16 on the 3-program grids, B = 40 in rounds: with W_hh resident the forward prefetches the next
    step's input projection between arrive and wait, which fp32 without TF32 (the other grid tests)
    does not."""
    T, B, H, lengths = GRID_SHAPES[0]
    check_half_precision(cell, torch.float16, T, B, H, lengths, small_gpu)


# The GPUs the launcher is checked for: (SMs, compute capability; its shared memory is SHARED_LIMIT).
GPUS = {"A100": (108, 80), "H100": (132, 90)}


def rounds(B, H, tile, num_sms):
    """Batch blocks per program and step for a (BB, BH) tile on num_sms SMs; None where its grid cannot
    fit."""
    BB, BH = tile
    n_bprog = min(triton.cdiv(B, BB), num_sms // (2 * triton.cdiv(H, BH)))
    return triton.cdiv(triton.cdiv(B, BB), n_bprog) if n_bprog else None


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_grid_fits_on_the_gpu(gpu):
    """The grid barrier deadlocks unless every program is resident: never more programs than SMs.
    W_hh resident wherever its slice fits, else the streamed tile of fewest rounds; the configuration
    is one the compile tests build."""
    num_sms, cc = GPUS[gpu]
    shared_bytes = SHARED_LIMIT[cc]
    selectable = set(selectable_configs(cc))
    for cell in CELLS:
        for dtype, precision in PRECISIONS:
            for B in (1, 3, 16, 17, 64, 100, 256, 1000):
                for H in (1, 7, 64, 256, 500, 512, 513, 768, 1024, 1700):
                    for backward, fn_name in enumerate(("birnn_forward_kernel", "birnn_backward_kernel")):
                        config = kernels.select_config(cell, B, H, dtype, precision, num_sms, shared_bytes,
                                                       backward)
                        assert 2 * config.n_hblocks * config.n_bprog <= num_sms
                        assert config.n_hblocks * config.BH >= H
                        streamed = [rounds(B, H, tile, num_sms) for tile in kernels.STREAM_TILES]
                        resident = (rounds(B, H, kernels.RESIDENT_TILE, num_sms)
                                    if kernels.resident_fits(cell, H, dtype, precision, shared_bytes, backward)
                                    else None)
                        assert config.RESIDENT == (resident is not None)
                        expected = resident if resident else min(r for r in streamed if r)
                        assert rounds(B, H, config[:2], num_sms) == expected
                        if config.RESIDENT:
                            assert config.NK * config.BK >= H
                        assert (fn_name, cell, dtype, precision, *config[:5]) in selectable
    h100, a100 = (132, 227 * 1024), (108, 163 * 1024)
    # fp32 LSTM, H = 512: 161 KiB resident with TF32, on either GPU; without TF32 256 at most (128 before 3.9).
    assert kernels.select_config("LSTM", 16, 512, torch.float32, "tf32", *a100).RESIDENT
    assert not kernels.select_config("LSTM", 16, 512, torch.float32, "ieee", *h100).RESIDENT
    # ... and at B = 64, where each of its 64 programs runs the 4 blocks of 16 rows in turn, every step.
    config = kernels.select_config("LSTM", 64, 512, torch.float32, "tf32", *a100)
    assert config.RESIDENT and (config.n_hblocks, config.n_bprog) == (32, 1)
    # H = 1024: half precision resident on an H100 in the forward, fp32 LSTM never (320 KiB per program).
    assert kernels.select_config("LSTM", 16, 1024, torch.bfloat16, "ieee", *h100).RESIDENT
    assert kernels.select_config("GRU", 16, 1024, torch.float16, "ieee", *h100).RESIDENT
    assert not kernels.select_config("LSTM", 16, 1024, torch.float32, "tf32", *h100).RESIDENT
    # The LSTM backward: resident at H = 512 in fp32 (its shared-memory limit), at H = 1024 in bf16 from
    # Triton 3.9 (before, up to 512).
    new_triton = kernels.TRITON_VERSION >= (3, 9)
    assert kernels.select_config("LSTM", 16, 512, torch.float32, "tf32", *h100, backward=True).RESIDENT
    assert kernels.select_config("LSTM", 64, 1024, torch.bfloat16, "ieee", *h100, backward=True).RESIDENT == new_triton
    with pytest.raises(ValueError, match="hidden size"):
        kernels.select_config("LSTM", 4, 10 ** 5, torch.float32, "tf32", num_sms, shared_bytes)


# Compile tests: every (config, cell, dtype, dot precision) the launchers can pick, for sm_80 and
# sm_90, built as launched (benchmarks/gpu/sass.py: fp32 state, the launch options), without the
# JIT's divisibility-by-16 hints (odd H, B, T), and with them for a subset (hinted_configs). They run
# in a child process without the interpreter, where triton.jit gives compilable functions; that
# process is this file run as a script.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SIGNATURE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resource_usage(compiled):
    """Registers, stack and local bytes per thread, shared bytes per program, from the cubin; spill
    instructions in the time loop (sass.round_shape)."""
    sys.path.insert(0, ROOT)
    from benchmarks.gpu import sass

    text = sass.cuobjdump(compiled, "--dump-resource-usage")
    usage = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", text)}
    usage["SHARED"] += compiled.metadata.shared  # the dynamic part, sized by Triton
    usage["LOOP_SPILLS"] = sass.round_shape(sass.cuobjdump(compiled, "--dump-sass"))["LOOP_SPILLS"]
    # Shared-memory allocations outside every loop (the function body's indentation): a resident
    # program's W_hh tiles.
    usage["HOISTED"] = len(re.findall(r"^    %\S+ = ttg\.local_alloc ", compiled.asm["ttgir"], re.MULTILINE))
    return usage


PRECISIONS = ((torch.float32, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "ieee"), (torch.float16, "ieee"))


def selectable_configs(cc):
    """Every (kernel, cell, dtype, precision, BB, BH, NK, BK, RESIDENT) the launcher may pick on sm_cc: the
    streaming tiles, and the resident one at each padded H where ``resident_fits`` SHARED_LIMIT[cc]."""
    for backward, fn_name in enumerate(("birnn_forward_kernel", "birnn_backward_kernel")):
        for cell in CELLS:
            for dtype, precision in PRECISIONS:
                for BB, BH in kernels.STREAM_TILES:
                    yield fn_name, cell, dtype, precision, BB, BH, kernels.STREAM_NK, kernels.STREAM_BK, False
                fma_backward = bool(backward) and kernels.uses_fma(dtype, precision)
                H = 16
                while kernels.resident_fits(cell, H, dtype, precision, SHARED_LIMIT[cc], backward):
                    yield (fn_name, cell, dtype, precision, *kernels.RESIDENT_TILE,
                           *kernels.split_k(H, True, fma_backward), True)
                    H *= 2


def test_triton_36_selection(monkeypatch):
    """Before Triton 3.9 the launcher picks its own resident configurations: exactly the 592 (sm_80 and
    sm_90) whose time loops compiled without spills with 3.6, the GPU image's version, by hand
    (triton_notes.md). If this fails, compile the new set with 3.6 before changing the numbers here."""
    monkeypatch.setattr(kernels, "TRITON_VERSION", (3, 6))
    configs = {cc: set(selectable_configs(cc)) for cc in SHARED_LIMIT}
    assert sum(map(len, configs.values())) == 592

    def largest_resident(fn_name, cell, dtype, precision):
        return max((NK * BK, (NK, BK)) for name, c, d, p, _, _, NK, BK, resident in configs[90]
                   if (name, c, d, p, resident) == (fn_name, cell, dtype, precision, True))

    backward, forward = "birnn_backward_kernel", "birnn_forward_kernel"
    assert largest_resident(forward, "LSTM", torch.bfloat16, "ieee") == (1024, (16, 64))
    assert largest_resident(forward, "GRU", torch.float32, "ieee") == (128, (8, 16))
    assert largest_resident(backward, "LSTM", torch.bfloat16, "ieee") == (512, (8, 64))
    assert largest_resident(backward, "LSTM", torch.float32, "tf32") == (512, (8, 64))
    assert largest_resident(backward, "GRU", torch.float16, "ieee") == (512, (8, 64))


def config_id(config, hints=False):
    fn_name, cell, dtype, precision, BB, BH, NK, BK, RESIDENT = config
    variant = f"resident-K{NK * BK}" if RESIDENT else "streaming"
    return (f"{fn_name.split('_')[1]}-{cell}-{SIGNATURE_DTYPES[dtype]}-{precision}-{BB}x{BH}-{variant}"
            f"{'-hinted' if hints else ''}")


def quick_configs(cc):
    """The heaviest in registers and shared memory: LSTM (most live tiles), fp32-TF32 and bf16, the
    largest resident K and the largest streaming tiles."""
    configs = [config for config in selectable_configs(cc)
               if config[1] == "LSTM" and (config[2], config[3]) in ((torch.float32, "tf32"), (torch.bfloat16, "ieee"))]
    largest_k = {}
    for config in configs:
        if config[-1]:
            key = config[:4]
            largest_k[key] = max(largest_k.get(key, config), config, key=lambda c: c[6] * c[7])
    largest_tiles = sorted(kernels.STREAM_TILES, key=lambda tile: tile[0] * tile[1])[-2:]
    return list(largest_k.values()) + [c for c in configs if not c[-1] and tuple(c[4:6]) in largest_tiles]


def hinted_configs(cc):
    """The selectable configurations also built with the divisibility hints: for every kernel, cell,
    dtype and precision, every streamed tile and the resident one at its largest K (the ones nearest
    255 registers, where a spill appears first). The hints move registers either way (from 87 fewer
    to 24 more than the same build without, Triton 3.9), so this is a sample where registers are
    tightest, not a bound: a smaller resident K hinted could still spill more than its unhinted twin
    (the backward's K = 32 of two chunks: 3 spill instructions against 1). All 604 hinted would about
    double the sweep's time."""
    largest = {}
    streamed = []
    for config in selectable_configs(cc):
        if config[-1]:
            key = config[:4]
            largest[key] = max(largest.get(key, config), config, key=lambda c: c[6] * c[7])
        else:
            streamed.append(config)
    return list(largest.values()) + streamed


def builds(cc, configs, hinted):
    """(config, hints) pairs: configs without hints, hinted with them."""
    return [(config, False) for config in configs] + [(config, True) for config in hinted]


def compile_in_child(pairs, cc):
    """Start this file as a script compiling (config, hints) pairs for sm_cc; it prints one JSON line
    per build."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    ids = [config_id(config, hints) for config, hints in pairs]
    return subprocess.Popen([sys.executable, __file__, str(cc), *ids], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def collect(children):
    usage = {}
    for cc, child in children.items():
        stdout, stderr = child.communicate()
        for line in stdout.splitlines():
            record = json.loads(line)
            usage[cc, record.pop("id")] = record
        if child.returncode:
            pytest.fail(f"compiling for sm_{cc} failed:\n{stderr[-4000:]}")
    return usage


def quick_builds(cc):
    return builds(cc, quick_configs(cc), quick_configs(cc))


def full_builds(cc):
    return builds(cc, list(selectable_configs(cc)), hinted_configs(cc))


def selected_builds(request, test_name, builds_of):
    """{cc: the (config, hints) builds_of(cc) that the session's selected tests of test_name check}: a
    -k selection compiles only what it runs."""
    wanted = {(item.callspec.params["cc"], config_id(item.callspec.params["config"], item.callspec.params["hints"]))
              for item in request.session.items if getattr(item, "originalname", None) == test_name}
    return {cc: [(config, hints) for config, hints in builds_of(cc) if (cc, config_id(config, hints)) in wanted]
            for cc in SHARED_LIMIT}


def compile_selected(request, test_name, builds_of):
    return collect({cc: compile_in_child(pairs, cc)
                    for cc, pairs in selected_builds(request, test_name, builds_of).items() if pairs})


@pytest.fixture(scope="module")
def quick_usage(request):
    return compile_selected(request, "test_compiles_without_spills", quick_builds)


@pytest.fixture(scope="module")
def full_usage(request):
    return compile_selected(request, "test_every_config_compiles_without_spills", full_builds)


def check_usage(usage, config, hints, cc):
    record = usage[cc, config_id(config, hints)]
    print(f"sm_{cc} {config_id(config, hints)}: {record['REG']} registers, {record['SHARED']} B shared, "
          f"{record['STACK']} B stack, {record['LOCAL']} B local, {record['LOOP_SPILLS']} spills in the time loop")
    assert record["SHARED"] <= SHARED_LIMIT[cc], f"{record['SHARED']} B of shared memory"
    # Spills before the time loop run once per launch: a resident program's W_hh tile loads.
    assert record["LOOP_SPILLS"] == 0 and record["LOCAL"] == 0, f"register spills in the time loop: {record}"
    # Resident: each gate's W_hh tile (or, fused, the one tile of all gates) is placed in shared memory
    # once, before the time loop.
    fn_name, cell, dtype, precision, BB, BH, NK, BK, resident = config
    fused = kernels.fused_gates(cell, dtype, precision, BB, BH, NK * BK, resident, fn_name == "birnn_backward_kernel")
    assert record["HOISTED"] == ((1 if fused else kernels.GATES[cell]) if resident else 0), record


def by_cc(builds_of):
    return [pytest.param(config, hints, cc, id=f"{config_id(config, hints)}-sm{cc}") for cc in sorted(SHARED_LIMIT)
            for config, hints in builds_of(cc)]


@pytest.mark.parametrize("config,hints,cc", by_cc(quick_builds))
def test_compiles_without_spills(quick_usage, config, hints, cc):
    check_usage(quick_usage, config, hints, cc)


@pytest.mark.slow
@pytest.mark.parametrize("config,hints,cc", by_cc(full_builds))
def test_every_config_compiles_without_spills(full_usage, config, hints, cc):
    check_usage(full_usage, config, hints, cc)


if __name__ == "__main__":
    # The child of compile_in_child: python test_kernels_triton.py CC [--expect-triton MAJOR.MINOR]
    # [--options-on] BUILD_ID... (--options-on: fused_gates and double_buffered_backward as with a Triton
    # config.checked_triton names, whatever this one is: tests/test_triton_36.py).
    sys.path.insert(0, ROOT)
    from benchmarks.gpu import sass

    target_cc, wanted = int(sys.argv[1]), sys.argv[2:]
    if wanted[:1] == ["--expect-triton"]:
        expected = tuple(int(part) for part in wanted[1].split("."))
        assert kernels.TRITON_VERSION == expected, f"Triton {triton.__version__} ({triton.__file__}), not {wanted[1]}"
        wanted = wanted[2:]
    if wanted[:1] == ["--options-on"]:
        kernels.checked_triton = lambda: True
        wanted = wanted[1:]
    wanted = set(wanted)
    every = list(selectable_configs(target_cc))
    for config, hints in builds(target_cc, every, every):
        if config_id(config, hints) in wanted:
            compiled = sass.compile_kernel(*config, cc=target_cc, hints=hints)
            print(json.dumps(dict(id=config_id(config, hints), **resource_usage(compiled))), flush=True)
