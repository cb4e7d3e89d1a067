"""Bad arguments raise torch's exception types and messages; lengths errors name lengths."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN, backends


def torch_error(callable_):
    with pytest.raises(Exception) as info:
        callable_()
    return info.type, str(info.value)


@pytest.mark.parametrize("kwargs", [
    {"hidden_size": 0}, {"num_layers": 0}, {"dropout": 1.5}, {"dropout": -0.1}, {"dropout": "x"},
])
def test_constructor_errors_are_torchs(kwargs):
    arguments = {"input_size": 3, "hidden_size": 4, **kwargs}
    for fast_cls, torch_cls in [(FastBiLSTM, nn.LSTM), (FastBiGRU, nn.GRU), (FastBiRNN, nn.RNN)]:
        expected = torch_error(lambda: torch_cls(bidirectional=True, **arguments))
        assert torch_error(lambda: fast_cls(**arguments)) == expected


def test_unsupported_arguments_raise():
    with pytest.raises(ValueError, match="bidirectional only"):
        FastBiLSTM(3, 4, bidirectional=False)
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        FastBiRNN(3, 4, nonlinearity="gelu")


@pytest.mark.parametrize("proj_size", [-1, 4, 5])
def test_proj_size_errors_are_torchs(proj_size):
    expected = torch_error(lambda: nn.LSTM(3, 4, bidirectional=True, proj_size=proj_size))
    assert torch_error(lambda: FastBiLSTM(3, 4, proj_size=proj_size)) == expected


@pytest.mark.parametrize("proj_size", [0, 2])
def test_proj_size_is_lstm_only_as_in_torch(proj_size):
    for fast_cls, torch_cls in [(FastBiGRU, nn.GRU), (FastBiRNN, nn.RNN)]:
        expected = torch_error(lambda: torch_cls(3, 4, bidirectional=True, proj_size=proj_size))
        assert torch_error(lambda: fast_cls(3, 4, proj_size=proj_size)) == expected


def test_projected_hidden_state_errors_are_torchs():
    """With projections h0 is (2L, B, P) and c0 (2L, B, H): each wrong one named as torch names it."""
    fast = FastBiLSTM(3, 4, num_layers=2, proj_size=2)
    expected = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    x = torch.randn(5, 2, 3)
    for hx in [(torch.randn(4, 2, 4), torch.randn(4, 2, 4)), (torch.randn(4, 2, 2), torch.randn(4, 2, 2)),
               (torch.randn(4, 3, 2), torch.randn(4, 2, 4))]:
        assert torch_error(lambda: fast(x, hx)) == torch_error(lambda: expected(x, hx))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_sequence_raises_as_torch(cell, batch_first):
    fast_cls, torch_cls = {"LSTM": (FastBiLSTM, nn.LSTM), "GRU": (FastBiGRU, nn.GRU), "RNN": (FastBiRNN, nn.RNN)}[cell]
    fast = fast_cls(3, 4, batch_first=batch_first)
    expected = torch_cls(3, 4, bidirectional=True, batch_first=batch_first)
    for x in (torch.randn(2, 0, 3) if batch_first else torch.randn(0, 2, 3), torch.randn(0, 3)):
        assert torch_error(lambda: fast(x)) == torch_error(lambda: expected(x))


CASES = {
    "wrong input size": (lambda: torch.randn(5, 2, 4), None),
    "4-D input": (lambda: torch.randn(5, 2, 3, 1), None),
    "1-D input": (lambda: torch.randn(5), None),
    "wrong dtype": (lambda: torch.randn(5, 2, 3, dtype=torch.float64), None),
    "hidden batch": (lambda: torch.randn(5, 2, 3), lambda lstm: (torch.randn(4, 3, 4), torch.randn(4, 2, 4))),
    "cell batch": (lambda: torch.randn(5, 2, 3), lambda lstm: (torch.randn(4, 2, 4), torch.randn(4, 3, 4))),
    "hidden layers": (lambda: torch.randn(5, 2, 3), lambda lstm: (torch.randn(2, 2, 4), torch.randn(4, 2, 4))),
    "2-D hx for batched input": (lambda: torch.randn(5, 2, 3), lambda lstm: (torch.randn(4, 4), torch.randn(4, 4))),
    "3-D hx for unbatched input": (lambda: torch.randn(5, 3), lambda lstm: (torch.randn(4, 1, 4), torch.randn(4, 1, 4))),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_forward_errors_are_torchs(case, cell):
    if case == "cell batch" and cell != "LSTM":
        pytest.skip("only an LSTM has a cell state")
    fast_cls, torch_cls = {"LSTM": (FastBiLSTM, nn.LSTM), "GRU": (FastBiGRU, nn.GRU), "RNN": (FastBiRNN, nn.RNN)}[cell]
    fast = fast_cls(3, 4, num_layers=2)
    expected = torch_cls(3, 4, num_layers=2, bidirectional=True)
    make_input, make_hx = CASES[case]
    x = make_input()
    hx = make_hx(cell == "LSTM") if make_hx else None
    if hx is not None and cell != "LSTM":
        hx = hx[0]
    before = [p.clone() for p in fast.parameters()]
    assert torch_error(lambda: fast(x, hx)) == torch_error(lambda: expected(x, hx))
    assert all(torch.equal(a, b) for a, b in zip(before, fast.parameters()))


@pytest.mark.parametrize("lengths,message", [
    ([5, 6], "lengths must be <= the input's sequence length 5"),
    ([5, 0], "lengths must be >= 1"),
    ([5, -1], "lengths must be >= 1"),
    ([5], r"expected shape \(2,\), got \(1,\)"),
    ([5, 2, 1], r"expected shape \(2,\), got \(3,\)"),
    (torch.tensor([5.0, 2.0]), "lengths must be an integer tensor"),
    (torch.tensor([[5, 2]]), r"expected shape \(2,\), got \(1, 2\)"),
    ("ab", "lengths must be"),
])
def test_lengths_errors(lengths, message):
    fast = FastBiLSTM(3, 4)
    with pytest.raises(ValueError, match=message):
        fast(torch.randn(5, 2, 3), lengths=lengths)


def test_lengths_with_packed_sequence_raises():
    fast = FastBiLSTM(3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="lengths must not be given with a PackedSequence"):
        fast(packed, lengths=[5, 3])


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("BIRNN_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="BIRNN_FAST_BACKEND=triton cannot run: .*CUDA tensors"):
        FastBiLSTM(3, 4)(torch.randn(5, 2, 3))
    monkeypatch.setenv("BIRNN_FAST_BACKEND", "cpu")
    monkeypatch.setitem(backends._PROJECTIONS, "cpu", False)
    monkeypatch.setattr(backends, "_selected", {})
    with pytest.raises(RuntimeError, match="BIRNN_FAST_BACKEND=cpu cannot run: .*proj_size"):
        FastBiLSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3))
    monkeypatch.setenv("BIRNN_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="BIRNN_FAST_BACKEND must be one of"):
        FastBiLSTM(3, 4)(torch.randn(5, 2, 3))


def test_automatic_fallback_warns(monkeypatch):
    monkeypatch.delenv("BIRNN_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_selected", {})
    monkeypatch.setitem(backends._DTYPES, "cpu", (torch.float64,))
    with pytest.warns(UserWarning, match="falls back to the slow reference.*supports torch.float64, got torch.float32"):
        FastBiLSTM(3, 4)(torch.randn(5, 2, 3))


def test_library_built_for_other_schemas_falls_back(tmp_path):
    """A _C built before a change to library.py's schemas (an editable install not rebuilt): the
    import does not abort the interpreter; the CPU backend reports why, the reference runs, and no
    C++ kernel is left registered. Fresh process: a copy of the package whose backward schema
    gained an argument, next to this build's _C."""
    if backends.why_not("cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the C++ library is not built")
    package = pathlib.Path(backends.__file__).parent
    copy = tmp_path / "birnn_fast"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    schema = "bool[4] output_mask=[True, True, True, True])"
    source = (copy / "library.py").read_text()
    assert schema in source
    (copy / "library.py").write_text(source.replace(schema, "bool[4] output_mask=[True, True, True, True], int extra=0)"))
    script = textwrap.dedent("""
        import warnings
        import torch
        from torch import nn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import birnn_fast
            from birnn_fast import backends
            assert birnn_fast.__file__.startswith(%r), birnn_fast.__file__
            reason = backends.why_not("cpu", torch.device("cpu"), torch.float32)
            assert "built for other op schemas" in reason and "birnn_fast::backward" in reason, reason
            fast = birnn_fast.FastBiLSTM(5, 7)
            slow = nn.LSTM(5, 7, bidirectional=True)
            slow.load_state_dict(fast.state_dict())
            x = torch.randn(4, 3, 5)
            with torch.no_grad():
                torch.testing.assert_close(fast(x)[0], slow(x)[0])
        assert any("falls back to the slow reference" in str(w.message) for w in caught)
        dump = torch._C._dispatch_dump("birnn_fast::forward")
        cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        assert "backends.py" in cpu and "module.cpp" not in cpu, cpu
        print("ok")
    """ % str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr

def test_op_names_the_bad_weight():
    """The ops check what they are given, even when called directly, and name the argument."""
    if backends.why_not("cpu", torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the C++ library is not built")
    T, B, I, H = 3, 2, 5, 4
    weights = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)] * 2
    args = (torch.randn(T, B, I), weights, torch.zeros(2, B, H), torch.zeros(2, B, H), torch.full((B,), T))
    output = torch.ops.birnn_fast.forward("LSTM", *args, False)[0]
    assert output.shape == (T, B, 2 * H)
    with pytest.raises(RuntimeError, match="expected the layer's 8 weights"):
        torch.ops.birnn_fast.forward("LSTM", args[0], weights[:4], *args[2:], False)
    bad = list(weights)
    bad[4] = torch.randn(4 * H, I + 1)
    with pytest.raises(RuntimeError, match=r"weights\[4\] \(weight_ih_reverse\) of size \[16, 5\]"):
        torch.ops.birnn_fast.forward("LSTM", args[0], bad, *args[2:], False)
