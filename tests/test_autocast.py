"""torch.autocast: the layers compute in, and return, the autocast dtype, as torch's fused RNN ops do
(mkldnn_rnn_layer, the CPU LSTM's, and _cudnn_rnn on CUDA are lower-precision ops: input, weights
and states cast, outputs in the low dtype); gradients reach the float32 parameters in float32.
Accuracy by flash-attention's rule: our error against float32 torch at most twice that of torch
itself run in the low dtype, plus a little."""
import statistics
import warnings

import pytest
import torch
from torch import nn

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

from conftest import REFERENCE_KERNELS, cpu_kernels, relative_error

CELLS = {
    "LSTM": (FastBiLSTM, nn.LSTM, {}),
    "GRU": (FastBiGRU, nn.GRU, {}),
    "RNN_TANH": (FastBiRNN, nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (FastBiRNN, nn.RNN, {"nonlinearity": "relu"}),
}


@pytest.fixture(autouse=True)
def quiet_fallback():
    # Until the C++ kernels take bfloat16, the reference runs it, with a warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "birnn_fast falls back")
        yield


def outputs_and_grads(module, x, hx, lengths, autocast=None):
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        output, state = module(x, hx, lengths=lengths) if lengths is not None else module(x, hx)
    results = [output, *(state if isinstance(state, tuple) else (state,))]
    generator = torch.Generator().manual_seed(3)
    loss = sum((r.float() * torch.randn(r.shape, generator=generator).to(r.device)).sum() for r in results)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return results, list(grads)


SEEDS = range(9)


def check(cell, device, dtype, layers=2, lengths=None, hx=False, **kwargs):
    """The dtypes nn.* returns under autocast, float32 gradients of the float32 leaves, and the
    accuracy rule over SEEDS (fixed): each error's median at most twice torch's own median, and
    its largest at most twice torch's largest. Per sample, the rule is noise for a RELU cell: its
    derivative jumps at 0, so a pre-activation that rounding moves across 0 changes a gradient by
    O(1); either run does that in about one sample in ten (relative errors ~0.2 then, ~0.005 else)."""
    fast_cls, torch_cls, extra = CELLS[cell]
    errors = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        fast = fast_cls(5, 8, num_layers=layers, device=device, **extra, **kwargs)
        expected = torch_cls(5, 8, num_layers=layers, bidirectional=True, device=device, **extra, **kwargs)
        expected.load_state_dict(fast.state_dict())
        low = torch_cls(5, 8, num_layers=layers, bidirectional=True, device=device, dtype=dtype, **extra, **kwargs)
        low.load_state_dict(fast.state_dict())
        T, B = 9, 4
        x = torch.randn(T, B, 5, device=device)
        state = None
        if hx:
            hidden = kwargs.get("proj_size") or 8
            state = [torch.randn(2 * layers, B, hidden, device=device)]
            state += [torch.randn(2 * layers, B, 8, device=device)] if cell == "LSTM" else []
            state = tuple(state) if cell == "LSTM" else state[0]

        got, got_grads = outputs_and_grads(fast, x, state, lengths, autocast=dtype)
        if seed == SEEDS[0]:
            # lengths= runs the dense layer (the packed one of nn.* is test_cpu_autocast_packed's).
            returned = _torch_dtypes_under_autocast(expected, x, state, dtype)
            assert [tensor.dtype for tensor in got] == returned, f"returned under autocast({dtype}), nn.* {returned}"
            assert all(grad.dtype == torch.float32 for grad in got_grads), "float32 leaves get float32 gradients"

        want, want_grads = _torch_outputs_and_grads(expected, x, state, lengths, torch.float32)
        ref, ref_grads = _torch_outputs_and_grads(low, x, state, lengths, dtype)
        names = ["output", "h_n", "c_n"][:len(got)] + ["grad input"] + [f"grad {name}" for name, _ in
                                                                      fast.named_parameters()]
        for name, a, b, r in zip(names, got + got_grads, want + want_grads, ref + ref_grads):
            errors.setdefault(name, []).append((relative_error(a, b), relative_error(r, b)))
    for name, pairs in errors.items():
        ours, torchs = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        for statistic in (statistics.median, max):
            error, reference_error = statistic(ours), statistic(torchs)
            assert error <= 2 * reference_error + 1e-3, (
                f"{name}: {statistic.__name__} error {error:.3g} vs torch in {dtype}: {reference_error:.3g}")


def _torch_dtypes_under_autocast(module, inputs, state, dtype):
    """The dtypes nn.* returns under autocast (inputs: a tensor or a PackedSequence); the low
    dtype, as mkldnn_rnn_layer returns, where oneDNN has no LSTM in it on this CPU (it raises then)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            output, state = module(inputs, state)
    except RuntimeError as error:
        if "could not create a primitive descriptor" not in str(error):
            raise
        return [dtype] * (3 if isinstance(module, nn.LSTM) else 2)
    output = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    return [output.dtype] + [tensor.dtype for tensor in (state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("cell,proj_size", [(cell, 0) for cell in CELLS] + [("LSTM", 2)])
@pytest.mark.parametrize("state_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_cpu_autocast_returns_as_torch(cell, proj_size, state_dtype, packed):
    """The dtypes of nn.*'s outputs under CPU autocast: dense or packed input, hx absent, float32 or
    bfloat16 (they follow the given state where torch's recurrence is a decomposition)."""
    fast_cls, torch_cls, extra = CELLS[cell]
    kwargs = {**extra, **({"proj_size": proj_size} if proj_size else {})}
    fast = fast_cls(5, 6, num_layers=2, **kwargs)
    expected = torch_cls(5, 6, num_layers=2, bidirectional=True, **kwargs)
    expected.load_state_dict(fast.state_dict())
    x = torch.randn(7, 3, 5)
    inputs = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([7, 2, 5]), enforce_sorted=False) if packed else x
    state = None
    if state_dtype is not None:
        state = [torch.randn(4, 3, proj_size or 6, dtype=state_dtype)]
        state = (state[0], torch.randn(4, 3, 6, dtype=state_dtype)) if cell == "LSTM" else state[0]
    want = _torch_dtypes_under_autocast(expected, inputs, state, torch.bfloat16)
    got = _torch_dtypes_under_autocast(fast, inputs, state, torch.bfloat16)
    assert got == want


def _torch_outputs_and_grads(module, x, state, lengths, dtype):
    """torch's module in ``dtype`` (float32, or the low dtype for the error it makes there itself)."""
    x = x.detach().to(dtype).requires_grad_()
    if state is not None:
        state = tuple(s.to(dtype) for s in state) if isinstance(state, tuple) else state.to(dtype)
    inputs = x if lengths is None else nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    output, result_state = module(inputs, state)
    if lengths is not None:
        output = nn.utils.rnn.pad_packed_sequence(output, total_length=x.shape[0])[0]
    results = [output, *(result_state if isinstance(result_state, tuple) else (result_state,))]
    generator = torch.Generator().manual_seed(3)
    loss = sum((r.float() * torch.randn(r.shape, generator=generator).to(r.device)).sum() for r in results)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return results, list(grads)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast(cell, dtype):
    check(cell, "cpu", dtype, hx=True, lengths=torch.tensor([9, 1, 5, 9]))


@pytest.mark.parametrize("layers,hx,lengths", [(1, False, None), (3, True, [9, 2, 9, 4])])
def test_cpu_autocast_lstm_variants(layers, hx, lengths):
    check("LSTM", "cpu", torch.bfloat16, layers=layers, hx=hx,
          lengths=None if lengths is None else torch.tensor(lengths))


def test_cpu_autocast_projections():
    check("LSTM", "cpu", torch.bfloat16, hx=True, lengths=torch.tensor([9, 1, 5, 9]), proj_size=3)


def test_float64_is_not_cast():
    """Autocast leaves float64 alone, as torch does."""
    fast = FastBiLSTM(3, 4, dtype=torch.float64)
    with torch.autocast("cpu"):
        output, (h_n, c_n) = fast(torch.randn(5, 2, 3, dtype=torch.float64))
    assert output.dtype == h_n.dtype == c_n.dtype == torch.float64


def test_outside_autocast_nothing_changes():
    fast = FastBiGRU(3, 4)
    with torch.autocast("cpu", enabled=False):
        assert fast(torch.randn(5, 2, 3))[0].dtype == torch.float32


def test_op_autocast_rule():
    """Called by hand, the op casts too (its AutocastCPU kernel), here with the reference as the CPU
    kernels (the C++ ones take no bfloat16 yet)."""
    H = 4
    weights = [torch.randn(4 * H, 3), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)] * 2
    args = (torch.randn(5, 2, 3), weights, torch.randn(2, 2, H), torch.randn(2, 2, H), torch.tensor([5, 2]), True)
    with cpu_kernels(*REFERENCE_KERNELS), torch.autocast("cpu"):
        output, h_n, c_n, workspace = torch.ops.birnn_fast.forward("LSTM", *args)
    assert output.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    assert workspace.dtype == torch.float32


def test_compiled_under_autocast():
    torch._dynamo.reset()
    fast = FastBiLSTM(5, 6, num_layers=2)
    x = torch.randn(7, 3, 5, requires_grad=True)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu"):
        got, _ = compiled(x, lengths=torch.tensor([7, 1, 4]))
        want, _ = fast(x, lengths=torch.tensor([7, 1, 4]))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(cell, dtype):
    check(cell, "cuda", dtype, hx=True, lengths=torch.tensor([9, 1, 5, 9]))
