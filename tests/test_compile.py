"""torch.compile traces the layers through our ops without a graph break (nn.LSTM cannot)."""
import pytest
import torch

from birnn_fast import FastBiGRU, FastBiLSTM

from conftest import DEVICE, assert_close, require


@pytest.mark.parametrize("cls", [FastBiLSTM, FastBiGRU])
def test_compile_fullgraph(cls):
    require("cpu" if DEVICE.type == "cpu" else "triton", torch.float32)
    torch._dynamo.reset()
    rnn = cls(5, 6, num_layers=2, device=DEVICE)
    x = torch.randn(7, 3, 5, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([7, 2, 5])
    compiled = torch.compile(rnn, fullgraph=True, backend="aot_eager")
    expected, got = rnn(x, lengths=lengths)[0], compiled(x, lengths=lengths)[0]
    assert_close(got, expected, torch.float32, "output")
    grad, = torch.autograd.grad(got.sum(), x)
    expected_grad, = torch.autograd.grad(expected.sum(), x)
    assert_close(grad, expected_grad, torch.float32, "grad input")
