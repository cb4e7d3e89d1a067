"""Numerics at the edges: a sequence of T = 100,000 steps stays finite and matches the reference,
and a NaN or Inf in one row's input leaves every other row's outputs and input gradients finite."""
import pytest
import torch

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN, reference
from birnn_fast.cells import CELLS

from conftest import require

LONG = 100_000
WINDOW, MARGIN = 200, 70
CASES = [("LSTM", 0), ("LSTM", 2), ("GRU", 0), ("RNN_TANH", 0), ("RNN_RELU", 0)]


def contractive_layer(cell, inputs, hidden, proj, batch, steps):
    """fp64 op arguments whose recurrence forgets: every W_hh has spectral norm 0.5, so a state or
    an adjoint error shrinks below 1e-16 within MARGIN steps (the LSTM's and GRU's gates at ~0.5
    forget at least as fast)."""
    generator = torch.Generator().manual_seed(0)
    state = proj or hidden
    gates = CELLS[cell].gates

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    weights = []
    for _ in range(2):
        weight_hh = normal(gates * hidden, state)
        weight_hh = 0.5 * weight_hh / torch.linalg.matrix_norm(weight_hh, ord=2)
        weights += [normal(gates * hidden, inputs) * 0.5, weight_hh, normal(gates * hidden) * 0.1,
                    normal(gates * hidden) * 0.1]
        if proj:
            weights.append(normal(state, hidden) / hidden ** 0.5)
    lstm = cell == "LSTM"
    return dict(
        input=normal(steps, batch, inputs), weights=weights, h0=normal(2, batch, state),
        c0=normal(2, batch, hidden) if lstm else torch.empty(0, dtype=torch.float64),
        lengths=torch.full((batch,), steps, dtype=torch.int64), grad_output=normal(steps, batch, 2 * state),
        grad_h_n=normal(2, batch, state), grad_c_n=normal(2, batch, hidden) if lstm else torch.empty(0, dtype=torch.float64))


def run_ops(cell, layer, dtype):
    cast = {key: ([w.to(dtype) for w in value] if key == "weights" else value if key == "lengths" else value.to(dtype))
            for key, value in layer.items()}
    output, h_n, c_n, workspace = torch.ops.birnn_fast.forward(
        cell, cast["input"], cast["weights"], cast["h0"], cast["c0"], cast["lengths"], True)
    grad_input, grad_weights, grad_h0, grad_c0 = torch.ops.birnn_fast.backward(
        cell, cast["grad_output"], cast["grad_h_n"], cast["grad_c_n"], cast["input"], cast["weights"], cast["h0"],
        cast["c0"], cast["lengths"], output, workspace)
    results = dict(output=output, h_n=h_n, c_n=c_n, grad_input=grad_input, grad_h0=grad_h0, grad_c0=grad_c0)
    results.update({f"grad_weights[{k}]": grad for k, grad in enumerate(grad_weights)})
    return {name: value.double() for name, value in results.items()}


def reference_window(cell, layer, first):
    """The reference on steps [first, first + WINDOW) alone: h0 / c0 and the cotangents of h_n /
    c_n are the true ones where the window touches the sequence's ends, zero elsewhere."""
    steps = layer["input"].shape[0]
    at_start, at_end = first == 0, first + WINDOW == steps
    window = slice(first, first + WINDOW)
    h0, c0, grad_h_n, grad_c_n = (layer[key].clone() for key in ("h0", "c0", "grad_h_n", "grad_c_n"))
    # Direction 0 starts at the window's first step, direction 1 at its last; each reads its true
    # initial state only where it starts at the sequence's end, and its final-state cotangent likewise.
    for direction, true_start, true_end in ((0, at_start, at_end), (1, at_end, at_start)):
        if not true_start:
            h0[direction] = 0
            if c0.numel():
                c0[direction] = 0
        if not true_end:
            grad_h_n[direction] = 0
            if grad_c_n.numel():
                grad_c_n[direction] = 0
    lengths = torch.full_like(layer["lengths"], WINDOW)
    x = layer["input"][window]
    output, h_n, c_n = reference.layer(cell, x, layer["weights"], h0, c0, lengths)
    grad_input, _, grad_h0, grad_c0 = reference.vjp(cell, (layer["grad_output"][window], grad_h_n, grad_c_n), x,
                                                    layer["weights"], h0, c0, lengths)
    return dict(output=output, h_n=h_n, c_n=c_n, grad_input=grad_input, grad_h0=grad_h0, grad_c0=grad_c0)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cell,proj", CASES)
def test_long_sequence_is_finite_and_matches_the_reference(cell, proj):
    """T = 100,000 in float64 and float32. The reference (a Python loop, ~5 ms a step with its
    backward) cannot run 100,000 steps in a test, but the recurrence forgets: on any window of
    steps, the reference started from zeros gives the whole run's outputs and input gradients at
    the steps more than MARGIN from the window's inner edges. Windows at the start, the middle and
    the end check every output, h_n, c_n, grad_input, grad_h0, grad_c0 there; the weight
    gradients, sums over all 100,000 steps, are checked float32 against float64."""
    require("cpu", torch.float64, torch.device("cpu"))
    layer = contractive_layer(cell, inputs=2, hidden=3, proj=proj, batch=2, steps=LONG)
    ours = run_ops(cell, layer, torch.float64)
    ours32 = run_ops(cell, layer, torch.float32)
    for name, value in ours.items():
        assert torch.isfinite(value).all() and torch.isfinite(ours32[name]).all(), f"{name}: non-finite"
        if value.numel():
            assert relative_error(ours32[name], value) <= 1e-4, f"{name}: float32 against float64"
    for first in (0, LONG // 2 - WINDOW // 2, LONG - WINDOW):
        want = reference_window(cell, layer, first)
        low = 0 if first == 0 else MARGIN
        high = WINDOW if first + WINDOW == LONG else WINDOW - MARGIN
        steps = slice(first + low, first + high)
        for name in ("output", "grad_input"):
            error = relative_error(ours[name][steps], want[name][low:high])
            assert error <= 1e-9, f"{name} at steps {first + low}..{first + high}: relative error {error:.3g}"
        # The final states and the initial states' gradients: direction 0's at the end, 1's at the start.
        direction = {0: 1, LONG - WINDOW: 0}.get(first)
        if direction is not None:
            names = ["h_n", "grad_h0"] + (["c_n", "grad_c0"] if cell == "LSTM" else [])
            for name in names:
                # h_n / c_n: forward direction's final state at the end window, the reverse's at the
                # start; grad_h0 / grad_c0 the other way round (the adjoint runs backwards).
                index = direction if name in ("h_n", "c_n") else 1 - direction
                error = relative_error(ours[name][index], want[name][index])
                assert error <= 1e-9, f"{name}[{index}] in the window at {first}: relative error {error:.3g}"


MODULES = {
    "LSTM": lambda: FastBiLSTM(3, 5, num_layers=2, dtype=torch.float64),
    "LSTM_PROJ": lambda: FastBiLSTM(3, 5, num_layers=2, proj_size=2, dtype=torch.float64),
    "GRU": lambda: FastBiGRU(3, 5, num_layers=2, dtype=torch.float64),
    "RNN_TANH": lambda: FastBiRNN(3, 5, num_layers=2, dtype=torch.float64),
    "RNN_RELU": lambda: FastBiRNN(3, 5, num_layers=2, nonlinearity="relu", dtype=torch.float64),
}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("lengths", [None, [9, 3, 9, 1, 6]])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", MODULES)
def test_a_poisoned_row_leaves_the_other_rows_finite(use_backend, backend, kind, poison, lengths):
    """One element of row 2's input is NaN or Inf: row 2 and the weight gradients may be poisoned,
    but no product of the kernels may mix it into another row's outputs, states or input and state
    gradients. With lengths, row 3 (length 1) also has a poisoned padded step: as in a
    PackedSequence, padding is never read, so that row stays finite too on the compiled backends."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    if backend == "triton" and (kind == "LSTM_PROJ" or poison == float("inf")):
        pytest.skip("triton (interpreted, slow): NaN only, without projections")
    use_backend(backend, dtype)
    torch.manual_seed(0)
    module = MODULES[kind]().to(dtype)
    T, B, bad = 9, 5, 2
    x = torch.randn(T, B, 3, dtype=dtype)
    x[4, bad, 1] = poison
    padding_poisoned = lengths is not None and backend != "reference"
    if padding_poisoned:
        x[5, 3, 0] = poison
    x.requires_grad_()
    is_lstm = kind.startswith("LSTM")
    state_shapes = [(4, B, module.proj_size or 5), (4, B, 5)][:2 if is_lstm else 1]
    hx = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in state_shapes]
    output, state = module(x, tuple(hx) if is_lstm else hx[0], lengths=lengths)
    states = list(state) if is_lstm else [state]
    loss = sum((result * torch.randn_like(result)).sum() for result in [output, *states])
    grads = torch.autograd.grad(loss, [x, *hx])
    # The reference computes padded steps and masks them: poisoned padding poisons its own row's
    # gradients (0 * NaN), so there row 3's padding stays clean.
    others = [b for b in range(B) if b != bad]
    if poison != poison:  # NaN propagates; an Inf may saturate the gates into finite values
        assert not torch.isfinite(output[:, bad]).all(), "the poisoned row's output should be NaN"
    for name, value in [("output", output), ("grad input", grads[0])]:
        assert torch.isfinite(value[:, others]).all(), f"{name}: another row is not finite"
    for name, value in [("h_n", states[0]), ("c_n", states[-1]), ("grad h0", grads[1]), ("grad c0", grads[-1])]:
        assert torch.isfinite(value[:, others]).all(), f"{name}: another row is not finite"
