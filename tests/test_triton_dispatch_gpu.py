"""The dispatch and the cuDNN route on a GPU (``make gpu-check``'s pytest stage): the route, forced,
against torch's own layer (cuDNN both), with lengths against cuDNN on a PackedSequence, every
gradient, under torch.compile(fullgraph=True) from the first call; the package's table as
engine_info reports it. The same route code runs on the CPU in tests/test_dispatch.py."""
import torch
import pytest

from birnn_fast import FastBiGRU, FastBiLSTM, dispatch, engine_info

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = torch.device("cuda")


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def pair(module, torch_module, I, H, dtype):
    torch.manual_seed(0)
    ours = module(I, H).to(DEVICE, dtype)
    theirs = torch_module(I, H, bidirectional=True).to(DEVICE, dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run(layer, x, lengths, cotangent, ours):
    x = x.detach().requires_grad_(True)
    if ours:
        output, state = layer(x, lengths=lengths) if lengths is not None else layer(x)
    elif lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        packed_output, state = layer(packed)
        output, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_output, total_length=x.shape[0])
    else:
        output, state = layer(x)
    grads = torch.autograd.grad(output, [x, *layer.parameters()], cotangent)
    states = list(state) if isinstance(state, tuple) else [state]
    return [output.detach(), *[s.detach() for s in states], *grads]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["equal", "lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("module,torch_module", [(FastBiLSTM, torch.nn.LSTM), (FastBiGRU, torch.nn.GRU)],
                         ids=["LSTM", "GRU"])
def test_route_as_cudnn(module, torch_module, dtype, with_lengths):
    T, B, I, H = 33, 24, 64, 128
    ours, theirs = pair(module, torch_module, I, H, dtype)
    x = torch.randn(T, B, I, device=DEVICE, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE) if with_lengths else None
    if lengths is not None:
        lengths[0], lengths[1] = 1, T
    cotangent = torch.randn(T, B, 2 * H, device=DEVICE, dtype=dtype)
    with dispatch.forcing("cudnn"):
        mine = run(ours, x, lengths, cotangent, True)
    expected = run(theirs, x, lengths, cotangent, False)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for index, (a, b) in enumerate(zip(mine, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        assert relative_error(a, b) <= bound, (index, relative_error(a, b))
    if lengths is not None:
        padding = torch.arange(T, device=DEVICE)[:, None] >= lengths[None, :]
        assert (mine[0][padding] == 0).all()


def test_route_compiled_fullgraph_first_call():
    torch._dynamo.reset()
    ours, theirs = pair(FastBiLSTM, torch.nn.LSTM, 32, 64, torch.float32)
    x = torch.randn(17, 8, 32, device=DEVICE)
    lengths = torch.tensor([17, 3, 9, 1, 17, 5, 6, 7], device=DEVICE)
    compiled = torch.compile(ours, fullgraph=True)
    with dispatch.forcing("cudnn"):
        output = compiled(x, lengths=lengths)[0]
        output.sum().backward()
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(theirs(packed)[0], total_length=17)
    assert relative_error(output.detach(), expected.detach()) <= 1e-5


def test_package_table_on_this_gpu():
    """engine_info reads the table for this GPU's architecture: on sm_90 the seeded H200 run sends
    fp32 B 64 H 1024 to cuDNN; elsewhere the table has no point and ours runs."""
    engine, reason = engine_info("LSTM", 64, 1024, torch.float32, "cuda", training=True)
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) == (9, 0):
        assert engine == "cudnn", reason
    else:
        assert engine == "triton" and "has no" in reason, reason
    assert engine_info("LSTM", 16, 256, torch.bfloat16, "cuda")[0] == "triton"


def test_dispatched_layer_runs_the_table_engine():
    """A layer the table sends to cuDNN (sm_90, fp32 B 64 H 1024) gives cuDNN's results through the
    default path (no forcing), forward and backward."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the package's table has sm_90 points only")
    ours, theirs = pair(FastBiLSTM, torch.nn.LSTM, 256, 1024, torch.float32)
    x = torch.randn(8, 64, 256, device=DEVICE)
    cotangent = torch.randn(8, 64, 2048, device=DEVICE)
    mine = run(ours, x, None, cotangent, True)
    expected = run(theirs, x, None, cotangent, False)
    for index, (a, b) in enumerate(zip(mine, expected)):
        assert relative_error(a, b) <= 1e-5, index
