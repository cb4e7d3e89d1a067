"""The C++ CPU kernels through the ops themselves (torch.ops.birnn_fast.forward / backward): every cell
against torch.nn in fp64 and fp32, projections (proj_size), lengths, the chunked (<= 2 threads) and
whole-sequence (more threads) paths, every product backend and ISA ceiling, bfloat16 / float16
against torch's own error in the same dtype, B = 0, a fully defined workspace (opcheck), and the
argument checks.

    python tests/test_cpu_kernel.py    # prints the bf16 / fp16 error table
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from birnn_fast import backends, ops
from birnn_fast.cells import CELLS

if __name__ != "__main__":
    from conftest import require

CELL_NAMES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@pytest.fixture(autouse=True)
def cpu_kernels():
    if __name__ != "__main__":
        require("cpu", torch.float64, torch.device("cpu"))


def make_layer(cell, steps, batch, inputs, hidden, proj=0, lengths=None, seed=0):
    """fp64 arguments of one layer: input, weights (8, or 10 with proj), h0, c0, lengths, and
    cotangents for output, h_n, c_n. Weights uniform in +-1/sqrt(H), as torch initialises them."""
    generator = torch.Generator().manual_seed(seed)
    state = proj or hidden
    gates = CELLS[cell].gates
    scale = hidden ** -0.5

    def uniform(*shape):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    weights = []
    for _ in range(2):
        weights += [uniform(gates * hidden, inputs), uniform(gates * hidden, state),
                    uniform(gates * hidden), uniform(gates * hidden)]
        if proj:
            weights.append(uniform(state, hidden))
    lstm = cell == "LSTM"
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64)
    return dict(
        input=normal(steps, batch, inputs), weights=weights, h0=normal(2, batch, state),
        c0=normal(2, batch, hidden) if lstm else torch.empty(0, dtype=torch.float64),
        lengths=torch.as_tensor(lengths, dtype=torch.int64),
        grad_output=normal(steps, batch, 2 * state), grad_h_n=normal(2, batch, state),
        grad_c_n=normal(2, batch, hidden) if lstm else torch.empty(0, dtype=torch.float64))


def cast(layer, dtype):
    return {key: ([w.to(dtype) for w in value] if key == "weights" else
                  value if key == "lengths" else value.to(dtype)) for key, value in layer.items()}


def run_ops(cell, layer):
    """(output, h_n, c_n, grad_input, *grad_weights, grad_h0, grad_c0) through our two ops."""
    output, h_n, c_n, workspace = torch.ops.birnn_fast.forward(
        cell, layer["input"], layer["weights"], layer["h0"], layer["c0"], layer["lengths"], True)
    grad_input, grad_weights, grad_h0, grad_c0 = torch.ops.birnn_fast.backward(
        cell, layer["grad_output"], layer["grad_h_n"], layer["grad_c_n"], layer["input"], layer["weights"],
        layer["h0"], layer["c0"], layer["lengths"], output, workspace)
    results = [output, h_n, c_n, grad_input, *grad_weights, grad_h0, grad_c0]
    return results if cell == "LSTM" else results[:-1]


def torch_module(cell, inputs, hidden, proj, dtype):
    if cell == "LSTM":
        return nn.LSTM(inputs, hidden, bidirectional=True, proj_size=proj, dtype=dtype)
    if cell == "GRU":
        return nn.GRU(inputs, hidden, bidirectional=True, dtype=dtype)
    return nn.RNN(inputs, hidden, bidirectional=True, nonlinearity=cell[4:].lower(), dtype=dtype)


def run_torch(cell, layer, packed=True):
    """The same results from torch.nn (PackedSequence for the lengths), by autograd."""
    x = layer["input"]
    steps, _, inputs = x.shape
    hidden = layer["weights"][0].shape[0] // CELLS[cell].gates
    proj = layer["weights"][4].shape[0] if len(layer["weights"]) == 10 else 0
    module = torch_module(cell, inputs, hidden, proj, x.dtype)
    with torch.no_grad():
        for parameter, weight in zip(module._flat_weights, layer["weights"]):
            parameter.copy_(weight)
    lstm = cell == "LSTM"
    x = x.detach().requires_grad_()
    h0 = layer["h0"].detach().requires_grad_()
    c0 = layer["c0"].detach().requires_grad_() if lstm else None
    hx = (h0, c0) if lstm else h0
    if packed:
        output, state = module(pack_padded_sequence(x, layer["lengths"], enforce_sorted=False), hx)
        output, _ = pad_packed_sequence(output, total_length=steps)
    else:
        output, state = module(x, hx)
    h_n, c_n = state if lstm else (state, None)
    loss = (output * layer["grad_output"]).sum() + (h_n * layer["grad_h_n"]).sum()
    if lstm:
        loss = loss + (c_n * layer["grad_c_n"]).sum()
    grads = torch.autograd.grad(loss, [x, *module._flat_weights, h0] + ([c0] if lstm else []))
    results = [output, h_n] + ([c_n] if lstm else [torch.empty(0)]) + list(grads)
    return [result.detach() for result in results]


def names(cell, proj):
    kinds = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"] + (["weight_hr"] if proj else [])
    weights = [f"grad_{kind}{suffix}" for suffix in ("", "_reverse") for kind in kinds]
    return ["output", "h_n", "c_n", "grad_input", *weights, "grad_h0"] + (["grad_c0"] if cell == "LSTM" else [])


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_all_close(cell, proj, ours, theirs, tolerance):
    for name, actual, expected in zip(names(cell, proj), ours, theirs):
        if name == "c_n" and cell != "LSTM":
            continue
        assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} != {tuple(expected.shape)}"
        error = relative_error(actual, expected)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:g}"


CASES = [(cell, 0) for cell in CELL_NAMES] + [("LSTM", 3)]
LENGTHS = {"equal": None, "mixed": [9, 1, 4, 9, 6]}


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("cell,proj", CASES)
def test_matches_torch_fp64(cell, proj, lengths, threads):
    """T 9, B 5, I 7, H 10 (P 3): lengths 1 and T; 1-2 threads run the chunked path, 4 the other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = make_layer(cell, 9, 5, 7, 10, proj, LENGTHS[lengths])
        assert_all_close(cell, proj, run_ops(cell, layer), run_torch(cell, layer), 1e-9)
    finally:
        torch.set_num_threads(previous)


IN_ORDER_LENGTHS = {
    # Every row runs T - 6 steps: in reverse the in-place chunks start at the longest length, not T.
    "equal-short": [17] * 40,
    # Sorted already: forward, the chunks before the first row ends read the input in place, the
    # rest gather; in reverse every chunk gathers.
    "sorted": sorted((23 if b < 8 else 11 + b % 12 for b in range(40)), reverse=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths", list(IN_ORDER_LENGTHS))
@pytest.mark.parametrize("cell,proj", CASES)
def test_chunks_in_order_read_the_input_in_place(cell, proj, lengths, dtype):
    """B 40 (chunks of 4 steps on two threads), T 23: a chunk whose rows lie in order in the input
    is projected from it in place (forward.cpp); against torch, forward and every gradient."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer = make_layer(cell, 23, 40, 7, 10, proj, IN_ORDER_LENGTHS[lengths], seed=2)
        ours = run_ops(cell, cast(layer, dtype))
        assert_all_close(cell, proj, ours, run_torch(cell, layer), 1e-9 if dtype == torch.float64 else 2e-5)
    finally:
        torch.set_num_threads(previous)


MASKS = {"no-input": (False, True, True, True), "no-weights": (True, False, True, True),
         "states-only": (False, False, True, False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("cell,proj", CASES)
def test_backward_output_mask(cell, proj, mask, threads, dtype):
    """What output_mask asks for is bitwise what the full backward gives (the skipped products feed
    nothing else); the rest comes back empty. Large enough for the half backend's chunk products;
    two threads run the chunked path, three the other."""
    output_mask = MASKS[mask]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = cast(make_layer(cell, 13, 9, 41, 64, proj and 12, [13, 2, 13, 7, 1, 13, 9, 5, 11], seed=3), dtype)
        output, _, _, workspace = torch.ops.birnn_fast.forward(
            cell, layer["input"], layer["weights"], layer["h0"], layer["c0"], layer["lengths"], True)
        args = (cell, layer["grad_output"], layer["grad_h_n"], layer["grad_c_n"], layer["input"], layer["weights"],
                layer["h0"], layer["c0"], layer["lengths"], output, workspace)
        full = torch.ops.birnn_fast.backward(*args)
        masked = torch.ops.birnn_fast.backward(*args, list(output_mask))
    finally:
        torch.set_num_threads(previous)
    for name, wanted, got, expected in zip(("grad_input", "grad_weights", "grad_h0", "grad_c0"), output_mask,
                                           masked, full):
        got, expected = ((got, expected) if isinstance(got, list) else ([got], [expected]))
        assert len(got) == len(expected), name
        for one, other in zip(got, expected):
            assert torch.equal(one, other) if wanted else one.shape == (0,), name


@pytest.mark.parametrize("cell,proj", CASES)
def test_matches_torch_fp32(cell, proj):
    """Large enough that the products leave the plain loops (panel / brgemm / MKL)."""
    layer = make_layer(cell, 21, 11, 40, 48, proj and 20, [21, 1, 13, 21, 7, 20, 2, 21, 5, 16, 9], seed=1)
    reference = run_torch(cell, layer)
    assert_all_close(cell, proj, run_ops(cell, cast(layer, torch.float32)), reference, 2e-5)



@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("cell,proj", CASES)
def test_matches_torch_fp32_few_rows(cell, proj, batch):
    """One to three rows with an odd H large enough that even a 1-row step product leaves the plain
    loops: the panel kernel's 1-3-row blocks, with their partial sums over k and the k left over."""
    layer = make_layer(cell, 5, batch, 33, 183, proj and 20, [5, 3, 4][:batch], seed=4)
    reference = run_torch(cell, layer)
    assert_all_close(cell, proj, run_ops(cell, cast(layer, torch.float32)), reference, 2e-5)

def test_projection_through_birnn_layer():
    """ops.birnn_layer passes the 10 weights of a projected LSTM through to the op (and its autograd)."""
    layer = make_layer("LSTM", 6, 3, 5, 8, 3, [6, 2, 5], seed=2)
    weights = [w.detach().requires_grad_() for w in layer["weights"]]
    try:
        output, h_n, c_n = ops.birnn_layer("LSTM", layer["input"], weights, layer["h0"], layer["c0"],
                                           layer["lengths"], backend="cpu")
    except ValueError as error:
        pytest.skip(f"ops.birnn_layer does not take proj_size yet: {error}")
    expected = run_torch("LSTM", layer)
    assert relative_error(output, expected[0]) < 1e-9
    loss = (output * layer["grad_output"]).sum() + (h_n * layer["grad_h_n"]).sum() + (c_n * layer["grad_c_n"]).sum()
    loss.backward()
    assert relative_error(weights[4].grad, expected[3 + 1 + 4]) < 1e-9


# --- bfloat16 / float16: fp32 inside, error at most 2x torch's own in the same dtype --------------

def precision_errors(cell, proj, dtype, lengths, size=(16, 6, 24, 32)):
    """{result name: (our error, torch's error)} against torch in fp64 on the same rounded inputs;
    size: steps, batch, inputs, hidden."""
    layer = make_layer(cell, *size, proj and 12, lengths, seed=3)
    low = cast(layer, dtype)
    reference = run_torch(cell, cast(low, torch.float64), packed=lengths is not None)
    ours = run_ops(cell, low)
    theirs = run_torch(cell, low, packed=lengths is not None)
    table = {}
    for name, mine, torch_same, expected in zip(names(cell, proj), ours, theirs, reference):
        if name == "c_n" and cell != "LSTM":
            continue
        assert mine.dtype == dtype, f"{name}: dtype {mine.dtype}, expected {dtype}"
        table[name] = (relative_error(mine, expected), relative_error(torch_same, expected))
    return table


PRECISION_CASES = [(cell, 0) for cell in ("LSTM", "GRU", "RNN_TANH")] + [("LSTM", 1)]


@pytest.mark.parametrize("lengths", [None, [16, 1, 9, 16, 4, 12]], ids=["equal", "mixed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell,proj", PRECISION_CASES)
def test_half_precision_error_within_twice_torch(cell, proj, dtype, lengths):
    for name, (ours, theirs) in precision_errors(cell, proj, dtype, lengths).items():
        assert ours <= 2 * theirs + 1e-6, f"{name}: our error {ours:.3g} > 2 x torch's {theirs:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell,proj", PRECISION_CASES)
def test_half_precision_error_with_more_threads(cell, proj, dtype):
    """Three threads: the products around the recurrences run as multi-threaded GEMMs after them
    (not by chunks), on the layer's operands widened to float32."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        errors = precision_errors(cell, proj, dtype, [16, 1, 9, 16, 4, 12])
    finally:
        torch.set_num_threads(previous)
    for name, (ours, theirs) in errors.items():
        assert ours <= 2 * theirs + 1e-6, f"{name}: our error {ours:.3g} > 2 x torch's {theirs:.3g}"


def test_half_precision_workspace_is_float32():
    layer = cast(make_layer("LSTM", 4, 2, 3, 5), torch.bfloat16)
    output, h_n, c_n, workspace = torch.ops.birnn_fast.forward(
        "LSTM", layer["input"], layer["weights"], layer["h0"], layer["c0"], layer["lengths"], True)
    assert (output.dtype, h_n.dtype, c_n.dtype, workspace.dtype) == (torch.bfloat16,) * 3 + (torch.float32,)


# --- B = 0, T = 0 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("save_workspace", [True, False])
@pytest.mark.parametrize("cell,proj", CASES)
def test_empty_batch(cell, proj, save_workspace):
    layer = make_layer(cell, 5, 0, 4, 6, proj)
    output, h_n, c_n, workspace = torch.ops.birnn_fast.forward(
        cell, layer["input"], layer["weights"], layer["h0"], layer["c0"], layer["lengths"], save_workspace)
    state = proj or 6
    assert output.shape == (5, 0, 2 * state) and h_n.shape == (2, 0, state)
    assert c_n.shape == ((2, 0, 6) if cell == "LSTM" else (0,))
    saved = CELLS[cell].saved * 6
    assert workspace.shape == ((5, 0, 2, saved) if save_workspace else (0,))
    if not save_workspace:
        return
    grad_input, grad_weights, grad_h0, grad_c0 = torch.ops.birnn_fast.backward(
        cell, torch.zeros_like(output), torch.zeros_like(h_n), torch.zeros_like(c_n), layer["input"],
        layer["weights"], layer["h0"], layer["c0"], layer["lengths"], output, workspace)
    assert grad_input.shape == (5, 0, 4) and grad_h0.shape == (2, 0, state)
    for grad, weight in zip(grad_weights, layer["weights"]):
        assert grad.shape == weight.shape and not grad.any()


def test_no_time_steps_raises():
    layer = make_layer("LSTM", 1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="at least one time step"):
        torch.ops.birnn_fast.forward("LSTM", layer["input"][:0], layer["weights"], layer["h0"], layer["c0"],
                                     torch.empty(2, dtype=torch.int64), False)


# --- the workspace is defined everywhere: opcheck ------------------------------------------------------

def op_args(cell, proj, lengths, dtype=torch.float64):
    layer = cast(make_layer(cell, 6, 4, 3, 5, proj, lengths, seed=4), dtype)
    return layer, (cell, layer["input"], layer["weights"], layer["h0"], layer["c0"], layer["lengths"])


@pytest.mark.parametrize("lengths", [None, [6, 1, 3, 5]], ids=["equal", "mixed"])
@pytest.mark.parametrize("cell,proj", CASES)
def test_workspace_padding_is_zero(cell, proj, lengths):
    """Under conftest's NaN-filled allocations: the workspace's rows past the real tokens are 0."""
    layer, args = op_args(cell, proj, lengths)
    workspace = torch.ops.birnn_fast.forward(*args, True)[3]
    assert torch.isfinite(workspace).all()
    if workspace.numel():
        tokens = int(layer["lengths"].sum())
        assert not workspace.view(-1, workspace.shape[-1] * 2)[tokens:].any()


def test_workspace_padding_is_zero_when_large():
    """Padding of a few MiB goes back to the kernel (zero pages) instead of being written."""
    layer = make_layer("LSTM", 64, 16, 4, 64, lengths=[64] + [1] * 15)
    workspace = torch.ops.birnn_fast.forward("LSTM", *[layer[k] for k in ("input", "weights", "h0", "c0", "lengths")],
                                             True)[3]
    tokens = 64 + 15
    assert workspace.numel() * 8 > 4 << 20
    assert torch.isfinite(workspace).all() and not workspace.view(64 * 16, -1)[tokens:].any()


@pytest.mark.parametrize("save_workspace", [True, False])
@pytest.mark.parametrize("lengths", [None, [6, 1, 3, 5]], ids=["equal", "mixed"])
@pytest.mark.parametrize("cell,proj", CASES)
def test_opcheck_forward(cell, proj, lengths, save_workspace):
    _, args = op_args(cell, proj, lengths)
    torch.library.opcheck(torch.ops.birnn_fast.forward.default, (*args, save_workspace))


@pytest.mark.parametrize("lengths", [None, [6, 1, 3, 5]], ids=["equal", "mixed"])
@pytest.mark.parametrize("cell,proj", CASES)
def test_opcheck_backward(cell, proj, lengths):
    layer, args = op_args(cell, proj, lengths)
    output, _, _, workspace = torch.ops.birnn_fast.forward(*args, True)
    torch.library.opcheck(torch.ops.birnn_fast.backward.default, (
        cell, layer["grad_output"], layer["grad_h_n"], layer["grad_c_n"], *args[1:], output, workspace))


def test_opcheck_bfloat16():
    layer, args = op_args("LSTM", 2, [6, 1, 3, 5], torch.bfloat16)
    torch.library.opcheck(torch.ops.birnn_fast.forward.default, (*args, True))
    output, _, _, workspace = torch.ops.birnn_fast.forward(*args, True)
    torch.library.opcheck(torch.ops.birnn_fast.backward.default, (
        "LSTM", layer["grad_output"], layer["grad_h_n"], layer["grad_c_n"], *args[1:], output, workspace))


# --- bad arguments: a clear RuntimeError naming the argument, never a crash ----------------------------

def bad_forward(change):
    layer = make_layer("LSTM", 4, 3, 5, 6, lengths=[4, 2, 1])
    args = dict(cell="LSTM", input=layer["input"], weights=list(layer["weights"]), h0=layer["h0"],
                c0=layer["c0"], lengths=layer["lengths"])
    change(args)
    return lambda: torch.ops.birnn_fast.forward(args["cell"], args["input"], args["weights"], args["h0"],
                                                args["c0"], args["lengths"], True)


def _set(key, value):
    return lambda args: args.__setitem__(key, value(args) if callable(value) else value)


def _weight(index, value):
    return lambda args: args["weights"].__setitem__(index, value(args["weights"][index]))


BAD_ARGUMENTS = {
    "unknown cell": (_set("cell", "LSTMX"), "unknown cell"),
    "2-D input": (_set("input", lambda a: a["input"][0]), "input of shape"),
    "int input": (_set("input", lambda a: a["input"].long()), "float32, float64, bfloat16 or float16"),
    "7 weights": (lambda a: a["weights"].pop(), "8 weights"),
    "10 weights for GRU": (lambda a: (a.__setitem__("cell", "GRU"), a["weights"].extend(a["weights"][:2])),
                           "8 weights"),
    "weight_hr of the wrong shape": (lambda a: (a["weights"].insert(4, torch.zeros(3, 7, dtype=torch.float64)),
                                                a["weights"].append(torch.zeros(3, 6, dtype=torch.float64))),
                                     r"weights\[4\] \(weight_hr\) of size"),
    "weight dtype": (_weight(0, lambda w: w.float()), r"weights\[0\] \(weight_ih\) of dtype"),
    "weight shape": (_weight(5, lambda w: w[:, :-1].contiguous()), r"weights\[5\] \(weight_hh_reverse\)"),
    "bias shape": (_weight(6, lambda w: w[:-1]), r"weights\[6\] \(bias_ih_reverse\)"),
    "non-contiguous weight": (_weight(0, lambda w: w.t().contiguous().t()), r"weights\[0\].*contiguous"),
    "non-contiguous input": (_set("input", lambda a: a["input"].transpose(0, 1).contiguous().transpose(0, 1)),
                             "input to be contiguous"),
    "h0 shape": (_set("h0", lambda a: a["h0"][:, :2].contiguous()), "h0 of size"),
    "h0 dtype": (_set("h0", lambda a: a["h0"].float()), "h0 of dtype"),
    "c0 missing": (_set("c0", torch.empty(0, dtype=torch.float64)), "c0 of size"),
    "lengths too long": (_set("lengths", torch.tensor([5, 2, 1])), r"lengths\[0\] must be in \[1, 4\]"),
    "lengths zero": (_set("lengths", torch.tensor([4, 0, 1])), r"lengths\[1\] must be in \[1, 4\]"),
    "lengths negative": (_set("lengths", torch.tensor([4, 2, -3])), r"lengths\[2\] must be in \[1, 4\]"),
    "lengths int32": (_set("lengths", torch.tensor([4, 2, 1], dtype=torch.int32)), "lengths as a contiguous int64"),
    "lengths count": (_set("lengths", torch.tensor([4, 2])), "lengths as a contiguous int64"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_forward_arguments_raise(case):
    change, message = BAD_ARGUMENTS[case]
    call = bad_forward(change)
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("case", ["grad_output", "grad_h_n", "grad_c_n", "output", "workspace", "no workspace"])
def test_bad_backward_arguments_raise(case):
    layer = make_layer("LSTM", 4, 3, 5, 6, lengths=[4, 2, 1])
    args = dict(input=layer["input"], weights=layer["weights"], h0=layer["h0"], c0=layer["c0"],
                lengths=layer["lengths"])
    output, _, _, workspace = torch.ops.birnn_fast.forward("LSTM", *args.values(), True)
    grads = dict(grad_output=layer["grad_output"], grad_h_n=layer["grad_h_n"], grad_c_n=layer["grad_c_n"],
                 output=output, workspace=workspace)
    if case == "no workspace":
        grads["workspace"] = torch.empty(0, dtype=torch.float64)
    else:
        grads[case] = grads[case][..., :-1].contiguous()
    with pytest.raises(RuntimeError, match="workspace" if case == "no workspace" else case):
        torch.ops.birnn_fast.backward("LSTM", grads["grad_output"], grads["grad_h_n"], grads["grad_c_n"],
                                      *args.values(), grads["output"], grads["workspace"])


# --- ISA ceilings and product backends: which path ran, and that it is right ----------------------------

_PARITY = """
import torch, sys
sys.path.insert(0, {tests!r})
import birnn_fast  # noqa: F401  (imports the C++ kernels)
from test_cpu_kernel import make_layer, cast, run_ops, run_torch, relative_error
worst = 0.0
for cell, proj in (("LSTM", 0), ("LSTM", 1), ("GRU", 0)):
    layer = make_layer(cell, 13, 7, 40, 48, proj and 20, [13, 1, 8, 13, 5, 12, 2], seed=5)
    ours = run_ops(cell, cast(layer, torch.float32))
    for mine, expected in zip(ours, run_torch(cell, layer)):
        if expected.numel():
            worst = max(worst, relative_error(mine, expected))
print(torch.ops.birnn_fast_cpu.engine_info())
print(worst)
"""


def run_under(env):
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                  "BIRNN_FAST_CPU_PRODUCTS")}
    environment.update(env)
    script = _PARITY.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info, worst = result.stdout.strip().splitlines()[-2:]
    return dict(item.split("=") for item in info.split()), float(worst)


def native_isa():
    return dict(item.split("=") for item in torch.ops.birnn_fast_cpu.engine_info().split())["cpu"]


ORDER = ("baseline", "avx2", "avx512")


@pytest.mark.parametrize("env,cells,products", [
    ({}, None, None),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "avx2", "panel"),
    ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "avx2", "panel"),
    ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, "baseline", "mm"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, None, None),
    ({"BIRNN_FAST_CPU_PRODUCTS": "brgemm"}, None, "brgemm"),
    ({"BIRNN_FAST_CPU_PRODUCTS": "mm"}, None, "mm"),
], ids=["native", "avx2", "mkl-avx2", "sse41", "amx-ceiling", "brgemm", "mm"])
def test_isa_ceiling_and_products(env, cells, products):
    """The ceiling caps our own dispatch as it caps oneDNN's and MKL's; every path matches torch."""
    native = native_isa()
    if cells is not None and ORDER.index(cells) > ORDER.index(native):
        pytest.skip(f"this CPU has {native}, below the {cells} this case forces")
    info, worst = run_under(env)
    expected_cells = cells or native
    assert info["cells"] == expected_cells
    default_products = {"avx512": "brgemm", "avx2": "panel", "baseline": "mm"}[info["cells"]]
    assert info["products.float32"] == (products or default_products)
    assert worst < 2e-5, f"{info}: relative error {worst:.3g}"


def test_isa_run_under_the_ceiling_variables_of_the_environment():
    """`make test-cpu-isa` runs this file again under ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2:
    the in-process kernels must then report that ceiling."""
    info = dict(item.split("=") for item in torch.ops.birnn_fast_cpu.engine_info().split())
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2":
        assert info["ceiling"] == "avx2" and info["cells"] in ("avx2", "baseline")
    else:
        assert info["cells"] == info["cpu"] or info["ceiling"] != "avx512"


# Large enough that every product with a reused weight runs on the half backend (not the plain loop);
# I odd (41) and P even (64, 12): a weight laid out from a rounded copy and one read in place.
_HALF_PRODUCTS = """
import torch, sys
sys.path.insert(0, {tests!r})
import birnn_fast  # noqa: F401  (imports the C++ kernels)
from test_cpu_kernel import PRECISION_CASES, cast, make_layer, precision_errors, run_ops
worst, outputs = 0.0, []
for cell, proj in PRECISION_CASES:
    for dtype in (torch.bfloat16, torch.float16):
        for name, (ours, theirs) in precision_errors(cell, proj, dtype, [12, 3, 12, 7, 1, 12, 9, 5],
                                                     size=(12, 8, 41, 64)).items():
            worst = max(worst, ours / (2 * theirs + 1e-6))
        outputs.append(run_ops(cell, cast(make_layer(cell, 12, 8, 41, 64, proj and 12, seed=1), dtype)))
torch.save(outputs, {path!r})
print(torch.ops.birnn_fast_cpu.engine_info())
print(worst)
"""


@pytest.mark.parametrize("half", ["float32", "brgemm", "vnni"])
def test_half_products(half, tmp_path):
    """Every backend of the bf16 / fp16 products: within twice torch's own error, for every cell, and
    (brgemm, vnni) really run: operands rounded to the dtype change the result. vnni, oneDNN's packed
    path, runs where the CPU has it (AMX / AVX512-BF16); the default picks it there."""
    def run(backend):
        path = tmp_path / f"{backend}.pt"
        environment = {**os.environ, "BIRNN_FAST_CPU_HALF_PRODUCTS": backend}
        script = _HALF_PRODUCTS.format(tests=os.path.dirname(os.path.abspath(__file__)), path=str(path))
        result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                                timeout=600)
        return result, path

    result, path = run(half)
    if half == "vnni" and "needs a CPU that multiplies" in result.stderr:
        pytest.skip("this CPU (or the ISA ceiling) has no native bf16 / fp16 products")
    assert result.returncode == 0, result.stderr[-3000:]
    info_line, worst = result.stdout.strip().splitlines()[-2:]
    info = dict(item.split("=") for item in info_line.split())
    assert info["products.bfloat16"] == {"vnni": "brgemm-vnni"}.get(half, half)
    assert float(worst) <= 1.0, f"{info_line}: error {float(worst):.3g} x the allowed 2 x torch's"
    if half != "float32":
        # Inputs and weights are already in the dtype, so rounding them changes nothing: the half
        # products show in what rounds a float32 operand (h, the gates' gradients).
        baseline, baseline_path = run("float32")
        assert baseline.returncode == 0, baseline.stderr[-3000:]
        dtypes = [torch.bfloat16, torch.float16] * len(PRECISION_CASES)
        for dtype, ours, widened in zip(dtypes, torch.load(path), torch.load(baseline_path)):
            if info[f"products.{str(dtype)[6:]}"] != "float32":
                assert not all(map(torch.equal, ours, widened)), f"{dtype}: the half products did not run"
            else:
                assert all(map(torch.equal, ours, widened)), f"{dtype}: float32 products changed the result"


@pytest.mark.parametrize("level", ["AVX512_CORE", "AVX512_CORE_VNNI"])
def test_half_products_under_the_onednn_ceiling(level):
    """A oneDNN ceiling below AVX512_CORE_BF16 takes the bf16 instructions away from oneDNN: our bf16 /
    fp16 products fall back to float32 operands, while the float32 ones stay on AVX-512."""
    script = "import torch, birnn_fast; print(torch.ops.birnn_fast_cpu.engine_info())"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("BIRNN_FAST_CPU_HALF_PRODUCTS", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    environment["ONEDNN_MAX_CPU_ISA"] = level
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = dict(item.split("=") for item in result.stdout.strip().splitlines()[-1].split())
    assert info["products.bfloat16"] == info["products.float16"] == "float32"
    assert info["cells"] == native_isa()


def test_half_products_default():
    """Without the override, bf16 / fp16 run natively only on AVX-512 cells (AMX, AVX512-BF16 / -FP16)."""
    info = dict(item.split("=") for item in torch.ops.birnn_fast_cpu.engine_info().split())
    if os.environ.get("BIRNN_FAST_CPU_HALF_PRODUCTS"):
        pytest.skip("BIRNN_FAST_CPU_HALF_PRODUCTS is set")
    if info["cells"] != "avx512":
        assert info["products.bfloat16"] == info["products.float16"] == "float32"
    else:
        assert info["products.bfloat16"] in ("brgemm-vnni", "float32")


def error_table(size=(16, 6, 24, 32)):
    """The bf16 / fp16 error table: ours and torch's relative error against fp64, per result;
    ``python tests/test_cpu_kernel.py [steps batch inputs hidden]``."""
    print("| case | result | ours | torch same dtype | ours / torch |")
    print("|---|---|---:|---:|---:|")
    for cell, proj in PRECISION_CASES:
        for dtype in (torch.bfloat16, torch.float16):
            for mixed in (False, True):
                steps, batch = size[:2]
                lengths = [steps if b % 3 == 0 else 1 + (b * 7) % steps for b in range(batch)] if mixed else None
                label = f"{cell}{' proj' if proj else ''} {str(dtype)[6:]} {'mixed' if lengths else 'equal'}"
                for name, (ours, theirs) in precision_errors(cell, proj, dtype, lengths, size).items():
                    print(f"| {label} | {name} | {ours:.2e} | {theirs:.2e} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    error_table(tuple(int(value) for value in sys.argv[1:5]) if len(sys.argv) > 4 else (16, 6, 24, 32))
