"""The drop-in contract: FastBiLSTM / FastBiGRU / FastBiRNN against torch.nn.LSTM / GRU / RNN,
forward and every gradient, on every backend that can run here."""
import copy
import io
import os
import pickle
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN, backends, reference

from conftest import DEVICE, assert_close

CELLS = {
    "LSTM": (FastBiLSTM, nn.LSTM, {}),
    "GRU": (FastBiGRU, nn.GRU, {}),
    "RNN_TANH": (FastBiRNN, nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (FastBiRNN, nn.RNN, {"nonlinearity": "relu"}),
}
BACKENDS = ["cpu", "reference"]


def make_pair(cell, input_size, hidden_size, dtype=torch.float64, **kwargs):
    fast_cls, torch_cls, extra = CELLS[cell]
    fast = fast_cls(input_size, hidden_size, device=DEVICE, dtype=dtype, **extra, **kwargs)
    expected = torch_cls(input_size, hidden_size, bidirectional=True, device=DEVICE, dtype=dtype, **extra, **kwargs)
    expected.load_state_dict(fast.state_dict())
    return fast, expected


def random_hx(cell, layers, batch, hidden, dtype, unbatched=False, proj_size=0):
    """h0 (2L, B, P) and, for LSTM, c0 (2L, B, H); without the batch dimension if unbatched."""
    states = []
    for size in [proj_size or hidden, hidden][:2 if cell == "LSTM" else 1]:
        shape = (2 * layers, size) if unbatched else (2 * layers, batch, size)
        states.append(torch.randn(shape, device=DEVICE, dtype=dtype))
    return tuple(states) if cell == "LSTM" else states[0]


def relu_margin(module, x, hx=None, lengths=None):
    """The smallest |pre-activation| of any unit, step and row of an RNN_RELU module on this input,
    computed in float64 by the reference."""
    margins = []
    relu = torch.relu

    def recording_relu(pre_activation):
        margins.append(pre_activation.detach().abs().min().item())
        return relu(pre_activation)

    double = copy.deepcopy(module).double()
    hx = None if hx is None else hx.double()
    with mock.patch.dict(os.environ, {"BIRNN_FAST_BACKEND": "reference"}), \
            mock.patch.object(reference.torch, "relu", recording_relu), torch.no_grad():
        double(x.double(), hx, **({} if lengths is None else {"lengths": lengths}))
    return min(margins)


def draw_off_the_kink(cell, module, draw, lengths=None, dtype=torch.float32):
    """draw() -> (x, hx), drawn again for an RNN_RELU module in float32 while a pre-activation lies
    within 1e-5 of ReLU's kink: there two correct float32 implementations, rounding differently,
    can fall on either side of 0, and a derivative of 0 against 1 moves the gradients by O(1)."""
    for _ in range(50):
        x, hx = draw()
        if cell != "RNN_RELU" or dtype != torch.float32 or relu_margin(module, x, hx, lengths) > 1e-5:
            return x, hx
    raise AssertionError("50 draws put a pre-activation within 1e-5 of 0")


def outputs_and_grads(module, x, hx, lengths=None, pack=False, cotangents=None):
    """Run module, backpropagate fixed random cotangents; return outputs, grads and cotangents."""
    x = x.detach().requires_grad_()
    leaves = [x]
    if hx is not None:
        hx = tuple(h.detach().requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.detach().requires_grad_()
        leaves += list(hx) if isinstance(hx, tuple) else [hx]
    if pack:
        time_major = x.transpose(0, 1) if module.batch_first else x
        packed = pack_padded_sequence(time_major, torch.as_tensor(lengths), enforce_sorted=False)
        output, state = module(packed, hx)
        output = pad_packed_sequence(output, total_length=time_major.shape[0])[0]
        output = output.transpose(0, 1) if module.batch_first else output
    elif lengths is not None:
        output, state = module(x, hx, lengths=lengths)
    else:
        output, state = module(x, hx)
    results = [output, *(state if isinstance(state, tuple) else (state,))]
    if cotangents is None:
        cotangents = [torch.randn_like(r) for r in results]
    loss = sum((r * c).sum() for r, c in zip(results, cotangents))
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
    return [r.detach() for r in results], list(grads), cotangents


def check_same(cell, fast, expected, x, hx=None, lengths=None, dtype=torch.float64):
    names = ["output", "h_n", "c_n"][: 3 if cell == "LSTM" else 2]
    want, want_grads, cotangents = outputs_and_grads(expected, x, hx, lengths, pack=lengths is not None)
    got, got_grads, _ = outputs_and_grads(fast, x, hx, lengths, cotangents=cotangents)
    for name, a, b in zip(names, got, want):
        assert_close(a, b, dtype, name)
    grad_names = ["input"] + (["h0", "c0"][: len(hx) if isinstance(hx, tuple) else 1] if hx is not None else [])
    grad_names += [name for name, _ in fast.named_parameters()]
    for name, a, b in zip(grad_names, got_grads, want_grads):
        assert_close(a, b, dtype, "grad " + name)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers,bias,batch_first", [(1, True, False), (2, False, True), (3, True, True)])
def test_matches_torch(use_backend, backend, cell, dtype, layers, bias, batch_first):
    use_backend(backend, dtype)
    fast, expected = make_pair(cell, 5, 7, dtype, num_layers=layers, bias=bias, batch_first=batch_first)
    T, B = 11, 4
    x, hx = draw_off_the_kink(cell, fast, lambda: (
        torch.randn((B, T, 5) if batch_first else (T, B, 5), device=DEVICE, dtype=dtype),
        random_hx(cell, layers, B, 7, dtype)), dtype=dtype)
    check_same(cell, fast, expected, x, hx, dtype=dtype)
    x, _ = draw_off_the_kink(cell, fast, lambda: (
        torch.randn((B, T, 5) if batch_first else (T, B, 5), device=DEVICE, dtype=dtype), None), dtype=dtype)
    check_same(cell, fast, expected, x, None, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_match_packed_sequence(use_backend, backend, cell, batch_first):
    dtype = torch.float32 if backend == "triton" else torch.float64
    use_backend(backend, dtype)
    fast, expected = make_pair(cell, 3, 6, dtype, num_layers=2, batch_first=batch_first)
    T, lengths = 9, [9, 1, 4, 9, 2, 7]
    B = len(lengths)
    x = torch.randn((B, T, 3) if batch_first else (T, B, 3), device=DEVICE, dtype=dtype)
    check_same(cell, fast, expected, x, random_hx(cell, 2, B, 6, dtype), lengths=lengths, dtype=dtype)
    check_same(cell, fast, expected, x, None, lengths=torch.tensor(lengths, device=DEVICE), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_in_packed_sequence_out(use_backend, backend, cell, enforce_sorted):
    use_backend(backend)
    fast, expected = make_pair(cell, 4, 5)
    lengths = [8, 6, 6, 3, 1] if enforce_sorted else [3, 8, 1, 6, 6]
    x = torch.randn(8, 5, 4, device=DEVICE, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    hx = random_hx(cell, 1, 5, 5, torch.float64)
    got_output, got_state = fast(packed, hx)
    want_output, want_state = expected(packed, hx)
    assert isinstance(got_output, type(want_output))
    assert torch.equal(got_output.batch_sizes, want_output.batch_sizes)
    assert_close(got_output.data, want_output.data, torch.float64, "packed output")
    for got, want in zip(got_state if cell == "LSTM" else [got_state], want_state if cell == "LSTM" else [want_state]):
        assert_close(got, want, torch.float64, "state in caller's batch order")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["LSTM", "RNN_TANH"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched(use_backend, backend, cell, batch_first):
    use_backend(backend)
    fast, expected = make_pair(cell, 3, 7, num_layers=2, batch_first=batch_first)
    x = torch.randn(6, 3, device=DEVICE, dtype=torch.float64)
    check_same(cell, fast, expected, x, random_hx(cell, 2, 1, 7, torch.float64, unbatched=True))
    check_same(cell, fast, expected, x, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_odd_sizes_and_noncontiguous_input(use_backend, backend, cell):
    use_backend(backend)
    for T, B, I, H in [(1, 1, 1, 1), (1, 3, 2, 7), (13, 1, 5, 1), (7, 5, 9, 33)]:
        fast, expected = make_pair(cell, I, H)
        x = torch.randn(B, T, 2 * I, device=DEVICE, dtype=torch.float64)[:, :, ::2].transpose(0, 1)
        assert x.numel() == 1 or not x.is_contiguous()
        check_same(cell, fast, expected, x, random_hx(cell, 1, B, H, torch.float64))
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        check_same(cell, fast, expected, x, None, lengths=lengths)


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("cell", CELLS)
def test_long_sequence(use_backend, backend, cell):
    use_backend(backend)
    fast, expected = make_pair(cell, 4, 8, torch.float32)
    x = torch.randn(520, 3, 4, device=DEVICE)
    check_same(cell, fast, expected, x, None, lengths=[520, 1, 333], dtype=torch.float32)


@pytest.mark.parametrize("hidden", [7, 40])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_kernel_at_any_thread_count(use_backend, cell, threads, hidden):
    """With up to two threads each direction's thread projects its input and sums its gradients a
    few steps (about 128 rows) at a time; with more, both happen in one GEMM outside the loop. Both
    ways, over several chunks, the last one partial. H=40 makes the per-step GEMMs large enough to
    go through at::mm rather than the small-product loop the other tests' sizes use. The directions
    run on two threads here but for the RNN cells at H=7, which, like most other tests' layers, are
    small enough to run both in the calling thread."""
    use_backend("cpu")
    fast, expected = make_pair(cell, 5, hidden, num_layers=2)
    T, B = 23, 40
    lengths = torch.randint(1, T + 1, (B,))
    lengths[:2] = torch.tensor([T, 1])
    x = torch.randn(T, B, 5, device=DEVICE, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_same(cell, fast, expected, x, random_hx(cell, 2, B, hidden, torch.float64), lengths=lengths)
        check_same(cell, fast, expected, x, None)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("hidden", [7, 40])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_float32_every_count_of_running_rows(use_backend, cell, hidden, threads):
    """float32 runs the per-step products on the AVX2 panel kernel (blocks of up to 6 rows, panels
    of 16 columns), and with two threads or fewer the chunked input projection too. Lengths 15 down
    to 1 make every count of running rows from 14 down to 1 appear; H=7 gives partial column panels,
    H=40 whole and partial ones, and runs the directions on two threads."""
    use_backend("cpu")
    fast, expected = make_pair(cell, 9, hidden, torch.float32)
    T, B = 15, 14
    lengths = torch.tensor([15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 2, 1])
    x, hx = draw_off_the_kink(cell, fast, lambda: (torch.randn(T, B, 9, device=DEVICE),
                                                   random_hx(cell, 1, B, hidden, torch.float32)), lengths)
    unpadded, _ = draw_off_the_kink(cell, fast, lambda: (torch.randn(T, B, 9, device=DEVICE), None))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_same(cell, fast, expected, x, hx, lengths=lengths, dtype=torch.float32)
        check_same(cell, fast, expected, unpadded, None, dtype=torch.float32)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cell", CELLS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes_and_lengths(use_backend, cell, data):
    use_backend("cpu")
    T = data.draw(st.integers(1, 24), "T")
    B = data.draw(st.integers(1, 9), "B")
    I = data.draw(st.integers(1, 12), "I")
    H = data.draw(st.integers(1, 20), "H")
    layers = data.draw(st.integers(1, 2), "layers")
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), "lengths")
    fast, expected = make_pair(cell, I, H, num_layers=layers)
    x = torch.randn(T, B, I, device=DEVICE, dtype=torch.float64)
    check_same(cell, fast, expected, x, random_hx(cell, layers, B, H, torch.float64), lengths=lengths)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(use_backend, backend, cell):
    use_backend(backend)
    fast, _ = make_pair(cell, 3, 4)
    x = torch.randn(5, 2, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    hx = random_hx(cell, 1, 2, 4, torch.float64)
    hx = tuple(h.requires_grad_() for h in hx) if cell == "LSTM" else (hx.requires_grad_(),)
    params = tuple(fast.parameters())
    names = [name for name, _ in fast.named_parameters()]

    def function(x, *tensors):
        states, weights = tensors[: len(hx)], tensors[len(hx):]
        output, state = torch.func.functional_call(
            fast, dict(zip(names, weights)), (x, states if cell == "LSTM" else states[0]), {"lengths": [5, 3]}
        )
        return (output, *(state if cell == "LSTM" else (state,)))

    assert torch.autograd.gradcheck(function, (x, *hx, *params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_between_layers(use_backend, backend):
    use_backend(backend)
    # dropout=1 zeroes every layer's input but the first: deterministic, so torch must agree exactly.
    fast, expected = make_pair("LSTM", 3, 5, num_layers=3, dropout=1.0)
    fast.train()
    expected.train()
    check_same("LSTM", fast, expected, torch.randn(6, 2, 3, device=DEVICE, dtype=torch.float64))
    fast, _ = make_pair("GRU", 3, 5, num_layers=2, dropout=0.5)
    x = torch.randn(6, 2, 3, device=DEVICE, dtype=torch.float64)
    assert not torch.equal(fast(x)[0], fast(x)[0]), "training mode must apply dropout"
    fast.eval()
    assert torch.equal(fast(x)[0], fast(x)[0]), "eval mode must not apply dropout"


def test_padded_outputs_are_zero_and_padded_inputs_get_no_gradient(use_backend):
    use_backend("cpu")
    fast = FastBiLSTM(3, 4, num_layers=2, dtype=torch.float64, device=DEVICE)
    x = torch.randn(7, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 2, 5])
    output, _ = fast(x, lengths=lengths)
    padded = torch.arange(7)[:, None] >= lengths[None, :]
    assert torch.all(output[padded.to(DEVICE)] == 0)
    output.sum().backward()
    assert torch.all(x.grad[padded.to(DEVICE)] == 0)


@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_deepcopy_pickle_round_trips(cell):
    fast, expected = make_pair(cell, 3, 5, num_layers=2)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in expected.named_parameters()]
    back = CELLS[cell][0](3, 5, num_layers=2, device=DEVICE, dtype=torch.float64, **CELLS[cell][2])
    back.load_state_dict(expected.state_dict())
    expected.load_state_dict(fast.state_dict())
    x = torch.randn(4, 2, 3, device=DEVICE, dtype=torch.float64)
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)), back):
        assert torch.equal(clone(x)[0], fast(x)[0])
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    buffer.seek(0)
    back.load_state_dict(torch.load(buffer))
    assert torch.equal(back(x)[0], fast(x)[0])


def test_parameters_initialised_as_torch():
    torch.manual_seed(0)
    fast = FastBiLSTM(6, 9, num_layers=2)
    torch.manual_seed(0)
    expected = nn.LSTM(6, 9, num_layers=2, bidirectional=True)
    for (name, a), (_, b) in zip(fast.named_parameters(), expected.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("cell", CELLS)
def test_inference_without_grad_matches_torch(use_backend, backend, cell):
    """Under no_grad the ops save no workspace: a separate kernel path, checked on its own."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    use_backend(backend, dtype)
    fast, expected = make_pair(cell, 4, 9, dtype, num_layers=2)
    x = torch.randn(8, 5, 4, device=DEVICE, dtype=dtype)
    lengths = torch.tensor([8, 1, 5, 8, 3])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.no_grad():
        got_output, got_state = fast(x, lengths=lengths)
        want_output, want_state = expected(packed)
    want_output = pad_packed_sequence(want_output, total_length=8)[0]
    assert_close(got_output, want_output, dtype, "output")
    got_state = got_state if isinstance(got_state, tuple) else (got_state,)
    want_state = want_state if isinstance(want_state, tuple) else (want_state,)
    for got, want in zip(got_state, want_state):
        assert_close(got, want, dtype, "final state")


def projections_runnable(backend, request):
    """An LSTM with projections on a compiled backend whose kernels do not take them (yet): a strict
    xfail, which fails as soon as they do until backends._PROJECTIONS says so."""
    takes = backends._PROJECTIONS["triton" if backend == "triton" else "cpu"]
    if backend != "reference" and not takes:
        request.applymarker(pytest.mark.xfail(strict=True, raises=RuntimeError,
                                              reason=f"the {backend} kernels take no projections yet"))


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("layers,bias,batch_first", [(1, True, False), (2, False, True)])
def test_projections_match_torch(request, use_backend, backend, layers, bias, batch_first):
    dtype = torch.float32 if backend == "triton" else torch.float64
    projections_runnable(backend, request)
    use_backend(backend, dtype)
    fast, expected = make_pair("LSTM", 4, 6, dtype, num_layers=layers, bias=bias, batch_first=batch_first,
                               proj_size=3)
    T, lengths = 8, [8, 1, 5, 8, 3]
    B = len(lengths)
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), device=DEVICE, dtype=dtype)
    check_same("LSTM", fast, expected, x, random_hx("LSTM", layers, B, 6, dtype, proj_size=3), dtype=dtype)
    check_same("LSTM", fast, expected, x, None, lengths=lengths, dtype=dtype)
    check_same("LSTM", fast, expected, x[0] if batch_first else x[:, 0],
               random_hx("LSTM", layers, 1, 6, dtype, unbatched=True, proj_size=3), dtype=dtype)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_projections_packed_sequence_in_packed_sequence_out(request, use_backend, enforce_sorted):
    use_backend("reference")
    fast, expected = make_pair("LSTM", 4, 5, num_layers=2, proj_size=2)
    lengths = [8, 6, 6, 3, 1] if enforce_sorted else [3, 8, 1, 6, 6]
    packed = pack_padded_sequence(torch.randn(8, 5, 4, device=DEVICE, dtype=torch.float64), torch.tensor(lengths),
                                  enforce_sorted=enforce_sorted)
    hx = random_hx("LSTM", 2, 5, 5, torch.float64, proj_size=2)
    got_output, got_state = fast(packed, hx)
    want_output, want_state = expected(packed, hx)
    assert_close(got_output.data, want_output.data, torch.float64, "packed output")
    for got, want in zip(got_state, want_state):
        assert_close(got, want, torch.float64, "state")


def test_projections_fall_back_to_the_reference_with_a_warning(monkeypatch):
    """Where the default backend's kernels take no projections, the reference runs them, and says so."""
    monkeypatch.delenv("BIRNN_FAST_BACKEND", raising=False)
    monkeypatch.setitem(backends._PROJECTIONS, "cpu", False)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_selected", {})
    fast, expected = make_pair("LSTM", 3, 5, proj_size=2)
    x = torch.randn(4, 2, 3, device=DEVICE, dtype=torch.float64)
    with pytest.warns(UserWarning, match="falls back to the slow reference.*proj_size"):
        check_same("LSTM", fast, expected, x, None)


def test_projections_parameters_as_torch():
    torch.manual_seed(0)
    fast = FastBiLSTM(6, 9, num_layers=2, proj_size=4, bias=False)
    torch.manual_seed(0)
    expected = nn.LSTM(6, 9, num_layers=2, bidirectional=True, proj_size=4, bias=False)
    assert [(n, p.shape) for n, p in fast.named_parameters()] == [(n, p.shape) for n, p in expected.named_parameters()]
    for (name, a), (_, b) in zip(fast.named_parameters(), expected.named_parameters()):
        assert torch.equal(a, b), name
    assert repr(fast).replace("FastBiLSTM", "LSTM") == repr(expected)
    back = FastBiLSTM(6, 9, num_layers=2, proj_size=4, bias=False)
    back.load_state_dict(expected.state_dict())
    x = torch.randn(3, 2, 6)
    assert torch.equal(pickle.loads(pickle.dumps(back))(x)[0], back(x)[0])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_as_torch(cell, batch_first):
    """B = 0: torch's shapes, and a backward that runs (all gradients zero)."""
    fast, expected = make_pair(cell, 3, 4, num_layers=2, batch_first=batch_first)
    x = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), device=DEVICE, dtype=torch.float64, requires_grad=True)
    got, want = fast(x), expected(x)
    got_all = [got[0], *(got[1] if cell == "LSTM" else (got[1],))]
    want_all = [want[0], *(want[1] if cell == "LSTM" else (want[1],))]
    assert [t.shape for t in got_all] == [t.shape for t in want_all]
    sum(t.sum() for t in got_all).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in fast.parameters())
    output, _ = fast(x, lengths=torch.zeros(0, dtype=torch.int64))
    assert output.shape == want[0].shape
