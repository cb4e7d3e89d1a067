"""The Triton ops against the contract of birnn_fast/library.py where it goes beyond the kernels'
core: B = 0, the workspace defined everywhere, and an LSTM with projections (proj_size), against
torch.nn.LSTM(proj_size=P, bidirectional=True) holding the same weights."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from birnn_fast import kernels  # noqa: E402
from birnn_fast.kernels import backward as kernels_backward  # noqa: E402
from birnn_fast.kernels import config as kernels_config  # noqa: E402
from birnn_fast.kernels import forward as kernels_forward  # noqa: E402
from concurrent_interpreter import concurrent_programs  # noqa: E402
from test_kernels_triton import (CELLS, DEVICE, INTERPRETED, SHARED_LIMIT, check_padding, make_grads,  # noqa: E402
                                 make_inputs, relative_error)


def op_weights(args):
    """The 8 per-direction parameters of the ops, nn.LSTM's order, from make_inputs' stacked ones."""
    return [args[name][d] for d in range(2) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch(cell):
    """B = 0: no launch; every result of its contract shape, gradients zero."""
    T, I, H = 3, 4, 5
    args = make_inputs(cell, T, 0, I, H, [])
    weights = op_weights(args)
    output, h_n, c_n, workspace = kernels.forward_op(cell, args["input"], weights, args["h0"], args["c0"],
                                                     args["lengths"], True)
    W = kernels_config.WORKSPACE[cell]
    assert output.shape == (T, 0, 2 * H) and h_n.shape == (2, 0, H) and workspace.shape == (T, 0, 2, W * H)
    assert c_n.shape == args["c0"].shape
    assert kernels.forward_op(cell, args["input"], weights, args["h0"], args["c0"], args["lengths"], False)[3].shape == (0,)
    grads = make_grads(cell, T, 0, H)
    grad_input, grad_weights, grad_h0, grad_c0 = kernels.backward_op(
        cell, *grads, args["input"], weights, args["h0"], args["c0"], args["lengths"], output, workspace)
    assert grad_input.shape == (T, 0, I) and grad_h0.shape == (2, 0, H) and grad_c0.shape == args["c0"].shape
    for grad, weight in zip(grad_weights, weights):
        assert grad.shape == weight.shape and grad.dtype == weight.dtype and not grad.any()


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_workspace_defined(cell):
    """Every element of the workspace is written: 0 at padded steps (the allocations are NaN-poisoned,
    tests/conftest.py), and the same on a second run."""
    T, B, H, lengths = 6, 5, 7, [6, 1, 3, 6, 2]
    args = make_inputs(cell, T, B, 3, H, lengths)
    output, _, _, workspace = kernels_forward.forward(cell, *args.values())
    assert torch.isfinite(workspace).all()
    padded = torch.arange(T, device=DEVICE)[:, None] >= args["lengths"][None, :]  # [T, B]
    assert (workspace[padded] == 0).all() and (workspace[~padded] != 0).any()
    check_padding(output, args["lengths"])
    assert torch.equal(kernels_forward.forward(cell, *args.values())[3], workspace)


def projected_case(T, B, I, H, P, lengths, dtype=torch.float32, seed=0):
    """An nn.LSTM(proj_size=P, bidirectional=True), its 10 parameters in the ops' order, and inputs."""
    torch.manual_seed(seed)
    layer = torch.nn.LSTM(I, H, proj_size=P, bidirectional=True).to(DEVICE, dtype)
    generator = torch.Generator().manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    return layer, dict(input=randn(T, B, I), h0=randn(2, B, P), c0=randn(2, B, H),
                       lengths=torch.tensor(lengths, dtype=torch.int64, device=DEVICE))


def torch_projected(layer, case, grads):
    """nn.LSTM on a PackedSequence: output, h_n, c_n and the gradients of input, h0, c0 and every
    parameter (layer._flat_weights' order: the ops' order)."""
    x, h0, c0 = (case[name].detach().clone().requires_grad_(True) for name in ("input", "h0", "c0"))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, case["lengths"].cpu(), enforce_sorted=False)
    packed_out, (h_n, c_n) = layer(packed, (h0, c0))
    output, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out, total_length=x.shape[0])
    params = list(layer._flat_weights)
    vjp = torch.autograd.grad([output, h_n, c_n], [x, h0, c0] + params, grads)
    return [output.detach(), h_n.detach(), c_n.detach()], vjp


def projected_grads(T, B, H, P, dtype=torch.float32, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(DEVICE, dtype) for shape in ((T, B, 2 * P), (2, B, P), (2, B, H))]


NAMES = ["input", "h0", "c0"] + [f"{kind}{suffix}" for suffix in ("", "_reverse")
                                 for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")]


def check_projected(T, B, I, H, P, lengths, run):
    """run(case, weights, grads) -> (output, h_n, c_n), [grad of NAMES...] against torch's layer."""
    layer, case = projected_case(T, B, I, H, P, lengths)
    grads = projected_grads(T, B, H, P)
    expected, expected_grads = torch_projected(layer, case, grads)
    weights = [weight.detach() for weight in layer._flat_weights]
    outputs, actual_grads = run(case, weights, grads)
    check_padding(outputs[0], case["lengths"])
    for name, actual, reference in zip(("output", "h_n", "c_n"), outputs, expected):
        assert actual.shape == reference.shape, name
        assert relative_error(actual, reference) <= 1e-4, name
    for name, actual, reference in zip(NAMES, actual_grads, expected_grads):
        assert actual.shape == reference.shape and actual.dtype == reference.dtype, name
        error = relative_error(actual, reference)
        assert error <= 1e-4, f"grad {name}: relative error {error:.3g}"


def run_ops(case, weights, grads):
    output, h_n, c_n, workspace = kernels.forward_op("LSTM", case["input"], weights, case["h0"], case["c0"],
                                                     case["lengths"], True)
    grad_input, grad_weights, grad_h0, grad_c0 = kernels.backward_op(
        "LSTM", *grads, case["input"], weights, case["h0"], case["c0"], case["lengths"], output, workspace)
    return (output, h_n, c_n), [grad_input, grad_h0, grad_c0] + grad_weights


@pytest.mark.parametrize("T,B,I,H,P,lengths", [(5, 3, 4, 7, 3, [2, 5, 1]), (4, 17, 3, 20, 19, [4, 1] * 8 + [3]),
                                               (1, 1, 2, 5, 1, [1])],
                         ids=["T5-B3-H7-P3", "T4-B17-H20-P19", "T1-B1-H5-P1"])
def test_projection_matches_torch(T, B, I, H, P, lengths):
    """The ops with 10 weights: forward and every gradient, weight_hr's included, with lengths."""
    check_projected(T, B, I, H, P, lengths, run_ops)


@pytest.mark.parametrize("weights", ["resident", "streaming"])
def test_projection_on_a_grid(weights):
    """The same on select_config's grid for a 6-SM GPU (3 programs per direction meet at the barrier),
    W_hh W_hr resident or streamed."""
    resident = weights == "resident"

    def pick(backward, B, H):
        return kernels_config.select_config("LSTM", B, H, torch.float32, "ieee", 6, SHARED_LIMIT[90] if resident else 0,
                                            backward, stream_tiles=() if resident else kernels_config.STREAM_TILES)

    def run(case, weights, grads):
        stacked = [torch.stack(weights[kind::5]) for kind in range(5)]
        B, H = case["input"].shape[1], stacked[1].shape[1] // 4
        assert pick(False, B, H).n_hblocks == 3
        with concurrent_programs() if INTERPRETED else torch.no_grad():
            output, h_n, c_n, workspace = kernels_forward.forward(
                "LSTM", case["input"], *stacked[:4], case["h0"], case["c0"], case["lengths"], weight_hr=stacked[4],
                config=pick(False, B, H))
            grad_input, gw_ih, gw_hh, gb_ih, gb_hh, grad_h0, grad_c0, gw_hr = kernels_backward.backward(
                "LSTM", *grads, case["input"], stacked[0], stacked[1], stacked[3], case["h0"], case["c0"],
                case["lengths"], output, workspace, weight_hr=stacked[4], config=pick(True, B, H))
        per_direction = [grad[d] for d in range(2) for grad in (gw_ih, gw_hh, gb_ih, gb_hh, gw_hr)]
        return (output, h_n, c_n), [grad_input, grad_h0, grad_c0] + per_direction

    check_projected(5, 18, 3, 40, 24, [5, 1, 3, 5, 2, 4, 1, 5, 3, 2, 4, 5, 1, 2, 3, 4, 5, 1], run)
