"""Second-order gradients (gradient penalties, MAML, Hessian-vector products): exact for every cell,
against torch's own and by gradgradcheck, through the default backend (its backward kernel for the
first order, the backward op's formula, a recompute through the reference, for the second)."""
import pytest
import torch
from torch import nn

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

from conftest import DEVICE, assert_close

CELLS = {
    "LSTM": (FastBiLSTM, nn.LSTM, {}),
    "GRU": (FastBiGRU, nn.GRU, {}),
    "RNN_TANH": (FastBiRNN, nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (FastBiRNN, nn.RNN, {"nonlinearity": "relu"}),
}


def make_pair(cell, **kwargs):
    fast_cls, torch_cls, extra = CELLS[cell]
    fast = fast_cls(3, 5, device=DEVICE, dtype=torch.float64, **extra, **kwargs)
    expected = torch_cls(3, 5, bidirectional=True, device=DEVICE, dtype=torch.float64, **extra, **kwargs)
    expected.load_state_dict(fast.state_dict())
    return fast, expected


def random_hx(cell, layers, batch, hidden, cell_hidden=None):
    h = torch.randn(2 * layers, batch, hidden, device=DEVICE, dtype=torch.float64, requires_grad=True)
    if cell != "LSTM":
        return h
    return h, torch.randn(2 * layers, batch, cell_hidden or hidden, device=DEVICE, dtype=torch.float64,
                          requires_grad=True)


def leaves_of(hx):
    return list(hx) if isinstance(hx, tuple) else [hx]


def second_order(module, x, hx, lengths, cotangents):
    """d/d(x, hx, parameters) of ||d<outputs, cotangents>/d(x, hx)||^2: the gradient penalty."""
    fast = isinstance(module, (FastBiLSTM, FastBiGRU, FastBiRNN))
    if lengths is None or fast:
        output, state = module(x, hx) if lengths is None else module(x, hx, lengths=lengths)
    else:
        output, state = module(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        output = nn.utils.rnn.pad_packed_sequence(output, total_length=x.shape[0])[0]
    results = [output, *(state if isinstance(state, tuple) else (state,))]
    loss = sum((r * c).sum() for r, c in zip(results, cotangents))
    first = torch.autograd.grad(loss, [x, *leaves_of(hx)], create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    return torch.autograd.grad(penalty, [x, *leaves_of(hx), *module.parameters()])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,lengths", [(1, None), (2, [6, 1, 4])], ids=["1-layer", "2-layers-lengths"])
def test_gradient_penalty_matches_torch(cell, layers, lengths):
    fast, expected = make_pair(cell, num_layers=layers)
    x = torch.randn(6, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    hx = random_hx(cell, layers, 3, 5)
    output_shapes = [(6, 3, 10), (2 * layers, 3, 5)] + ([(2 * layers, 3, 5)] if cell == "LSTM" else [])
    cotangents = [torch.randn(shape, device=DEVICE, dtype=torch.float64) for shape in output_shapes]
    lengths = None if lengths is None else torch.tensor(lengths)
    got = second_order(fast, x, hx, lengths, cotangents)
    want = second_order(expected, x, hx, lengths, cotangents)
    names = ["input"] + ["h0", "c0"][:len(leaves_of(hx))] + [name for name, _ in fast.named_parameters()]
    # Not a case of zeros (relu's are zero for input, states and biases: piecewise linear in them).
    assert all(b.abs().max() > 0 for name, b in zip(names, want) if name.startswith("weight"))
    for name, a, b in zip(names, got, want):
        assert_close(a, b, torch.float64, name)


def test_gradient_penalty_with_projections_matches_torch():
    fast, expected = make_pair("LSTM", num_layers=2, proj_size=2)
    x = torch.randn(5, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    hx = random_hx("LSTM", 2, 3, 2, cell_hidden=5)
    cotangents = [torch.randn(shape, device=DEVICE, dtype=torch.float64) for shape in [(5, 3, 4), (4, 3, 2), (4, 3, 5)]]
    lengths = torch.tensor([5, 1, 3])
    for a, b in zip(second_order(fast, x, hx, lengths, cotangents), second_order(expected, x, hx, lengths, cotangents)):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_hessian_vector_product_matches_torch(cell):
    """(d^2 loss / d weights^2) v for a loss of the outputs: MAML's and Newton's inner product."""
    fast, expected = make_pair(cell)
    x = torch.randn(4, 2, 3, device=DEVICE, dtype=torch.float64)
    vectors = [torch.randn_like(p) for p in fast.parameters()]

    def hvp(module):
        loss = module(x)[0].tanh().square().sum()
        grads = torch.autograd.grad(loss, list(module.parameters()), create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors)), list(module.parameters()))

    for a, b in zip(hvp(fast), hvp(expected)):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_input_gradient_penalty_of_a_frozen_layer_matches_torch(cell):
    """A frozen critic's input-gradient penalty: the first backward computes no weight gradients
    (output_mask), and the second order still reaches the input."""
    fast, expected = make_pair(cell, num_layers=2)
    x0 = torch.randn(5, 3, 3, device=DEVICE, dtype=torch.float64)

    def penalty(module):
        module.requires_grad_(False)
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(module(x)[0].tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), x)[0]

    assert_close(penalty(fast), penalty(expected), torch.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_gradgradcheck(cell):
    fast, _ = make_pair(cell)
    names = [name for name, _ in fast.named_parameters()]
    x = torch.randn(4, 2, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    hx = random_hx(cell, 1, 2, 5)
    params = [p.detach().requires_grad_() for p in fast.parameters()]

    def function(x, *tensors):
        states, weights = tensors[:len(leaves_of(hx))], tensors[len(leaves_of(hx)):]
        state = tuple(states) if cell == "LSTM" else states[0]
        output, result = torch.func.functional_call(fast, dict(zip(names, weights)), (x, state), {"lengths": [4, 2]})
        return (output, *(result if isinstance(result, tuple) else (result,)))

    assert torch.autograd.gradgradcheck(function, (x, *leaves_of(hx), *params), fast_mode=True)


def test_third_order_matches_torch():
    """The double backward is itself differentiable (built with create_graph when asked)."""
    fast, expected = make_pair("GRU")
    x0 = torch.randn(3, 2, 3, device=DEVICE, dtype=torch.float64)

    def third(module):
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(module(x)[0].sin().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gg.sum(), list(module.parameters()))

    for a, b in zip(third(fast), third(expected)):
        assert_close(a, b, torch.float64)
