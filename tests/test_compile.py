"""torch.compile(fullgraph=True) traces the layers through our ops without a graph break (nn.LSTM
cannot), equal to eager forward and backward; dynamic shapes compile once.

Inductor compiles C++ for every graph (tens of seconds on 2 cores), so it gets two cases and
aot_eager (the same AOT autograd graphs, run eagerly) the rest. The first call of a fresh process
is tests/test_user_paths.py's."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

from conftest import DEVICE, assert_close, require

CLASSES = {"LSTM": FastBiLSTM, "GRU": FastBiGRU, "RNN": FastBiRNN}


def inputs(cell, layers, hx, lengths, T=7, B=3, I=5, H=6):
    x = torch.randn(T, B, I, device=DEVICE)
    states = [torch.randn(2 * layers, B, H, device=DEVICE) for _ in range(2 if cell == "LSTM" else 1)]
    state = (tuple(states) if cell == "LSTM" else states[0]) if hx else None
    lengths = torch.randint(1, T + 1, (B,)) if lengths else None
    if lengths is not None:
        lengths[:2] = torch.tensor([T, 1])
    return x, state, lengths


def run(module, x, hx, lengths):
    """Outputs and the gradients of input, hx and every parameter for fixed cotangents."""
    x = x.detach().requires_grad_()
    leaves = [x]
    if hx is not None:
        hx = tuple(h.detach().requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.detach().requires_grad_()
        leaves += list(hx) if isinstance(hx, tuple) else [hx]
    output, state = module(x, hx, lengths=lengths)
    results = [output, *(state if isinstance(state, tuple) else (state,))]
    generator = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=generator).to(r.device)).sum() for r in results)
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
    return [r.detach() for r in results] + list(grads)


def check_compiled(cell, layers, hx, lengths, backend):
    require("cpu" if DEVICE.type == "cpu" else "triton", torch.float32)
    torch._dynamo.reset()
    module = CLASSES[cell](5, 6, num_layers=layers, device=DEVICE)
    args = inputs(cell, layers, hx, lengths)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    for got, want in zip(run(compiled, *args), run(module, *args)):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("lengths", [False, True], ids=["", "lengths"])
@pytest.mark.parametrize("hx", [False, True], ids=["", "hx"])
@pytest.mark.parametrize("layers", [1, 3])
def test_lstm_aot_eager(layers, hx, lengths):
    check_compiled("LSTM", layers, hx, lengths, "aot_eager")


@pytest.mark.parametrize("cell,layers,hx,lengths", [("GRU", 1, False, True), ("GRU", 3, True, False),
                                                    ("RNN", 1, True, True), ("RNN", 3, False, False)])
def test_gru_rnn_aot_eager(cell, layers, hx, lengths):
    check_compiled(cell, layers, hx, lengths, "aot_eager")


@pytest.mark.parametrize("cell,layers,hx,lengths", [("LSTM", 1, False, False), ("GRU", 3, True, True)])
def test_inductor(cell, layers, hx, lengths):
    check_compiled(cell, layers, hx, lengths, "inductor")


def test_projections_aot_eager():
    require("cpu" if DEVICE.type == "cpu" else "triton", torch.float32)
    torch._dynamo.reset()
    module = FastBiLSTM(5, 6, num_layers=2, proj_size=3, device=DEVICE)
    x = torch.randn(7, 3, 5, device=DEVICE)
    hx = (torch.randn(4, 3, 3, device=DEVICE), torch.randn(4, 3, 6, device=DEVICE))
    lengths = torch.tensor([7, 1, 4])
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for got, want in zip(run(compiled, x, hx, lengths), run(module, x, hx, lengths)):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_dynamic_shapes_compile_once(cell):
    """dynamic=True: new T, B and lengths reuse the one graph (sizes >= 2: torch specialises 0 and 1)."""
    require("cpu" if DEVICE.type == "cpu" else "triton", torch.float32)
    torch._dynamo.reset()
    module = CLASSES[cell](5, 6, num_layers=2, device=DEVICE)
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    compiles = []
    for T, B in [(7, 3), (9, 4), (5, 2), (12, 6)]:
        args = inputs(cell, 2, True, True, T=T, B=B)
        for got, want in zip(run(compiled, *args), run(module, *args)):
            assert_close(got, want, torch.float32)
        compiles.append(counter.frame_count)
    assert compiles[1:] == compiles[:1] * 3, f"backend calls after each of 4 shapes: {compiles}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
