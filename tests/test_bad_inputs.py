"""Bad inputs (issue 15): every public entry point rejects them with a message naming the argument
(torch's own where nn.LSTM has one), or, where the layout is only unusual, computes what nn.* does;
none crashes the process. Each case runs in a child forked from this already-imported process, so a
signal fails that case alone.

``python tests/test_bad_inputs.py --table`` writes the cases and the messages they get to
benchmarks/results/bad_inputs.md."""
import os
import pickle
import re
import select
import signal
import sys
import warnings

import pytest
import torch
from torch import nn

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

T, B, I, H = 3, 2, 4, 5


def lstm(**kwargs):
    return FastBiLSTM(I, H, **kwargs)


def x(*shape, **kwargs):
    return torch.randn(*(shape or (T, B, I)), **kwargs)


def replaced(name, value, module=None):
    module = module or lstm()
    setattr(module, name, nn.Parameter(value))
    return module


def same_as_torch(fast, inputs, hx=None, lengths=None):
    """fast(inputs) equals nn.*'s on the same weights (lengths through a PackedSequence); returns 'ok'."""
    torch_cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(fast.mode, nn.RNN)
    extra = {"nonlinearity": fast.nonlinearity} if torch_cls is nn.RNN else {}
    expected = torch_cls(fast.input_size, fast.hidden_size, fast.num_layers, bidirectional=True, **extra)
    expected.load_state_dict({name: p.contiguous() for name, p in fast.state_dict().items()})
    got = fast(inputs, hx) if lengths is None else fast(inputs, hx, lengths=lengths)
    if lengths is not None:
        packed = nn.utils.rnn.pack_padded_sequence(inputs, lengths, enforce_sorted=False)
        output, state = expected(packed, hx)
        want = (nn.utils.rnn.pad_packed_sequence(output, total_length=inputs.shape[0])[0], state)
    else:
        want = expected(inputs, hx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return "ok"


def empty_batch(fast_cls, with_lengths, **kwargs):
    """B = 0: nn.*'s shapes, forward and backward."""
    module = fast_cls(I, H, **kwargs)
    inputs = x(T, 0, I, requires_grad=True)
    output, state = module(inputs, lengths=torch.zeros(0, dtype=torch.long)) if with_lengths else module(inputs)
    assert output.shape == (T, 0, 2 * H), output.shape
    loss = output.sum() + sum(s.sum() for s in (state if isinstance(state, tuple) else (state,)))
    loss.backward()
    assert inputs.grad.shape == inputs.shape and all(p.grad is not None for p in module.parameters())
    return "ok"


def op_args(cell="LSTM", steps=T, batch=B, gates=4):
    weights = [torch.randn(s) for s in [(gates * H, I), (gates * H, H), (gates * H,), (gates * H,)] * 2]
    c0 = torch.randn(2, batch, H) if cell == "LSTM" else torch.empty(0)
    return [cell, torch.randn(steps, batch, I), weights, torch.randn(2, batch, H), c0,
            torch.full((batch,), steps, dtype=torch.long), True]


def forward_with(**changes):
    args = op_args(changes.pop("cell", "LSTM"), gates=changes.pop("gates", 4))
    names = ["cell", "input", "weights", "h0", "c0", "lengths", "save_workspace"]
    for name, value in changes.items():
        args[names.index(name)] = value(args) if callable(value) else value
    return torch.ops.birnn_fast.forward(*args)


def backward_with(**changes):
    cell, input, weights, h0, c0, lengths, _ = op_args()
    output, h_n, c_n, workspace = torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths, True)
    args = {"cell": cell, "grad_output": torch.randn_like(output), "grad_h_n": torch.randn_like(h_n),
            "grad_c_n": torch.randn_like(c_n), "input": input, "weights": weights, "h0": h0, "c0": c0,
            "lengths": lengths, "output": output, "workspace": workspace}
    for name, value in changes.items():
        args[name] = value(args) if callable(value) else value
    return torch.ops.birnn_fast.backward(*args.values())


# name -> (the call, expected exception type or None for "works", regex the message must match)
CASES = {
    # input
    "input rank 1": (lambda: lstm()(x(I)), ValueError, r"LSTM: Expected input to be 2D or 3D, got 1D"),
    "input rank 4": (lambda: lstm()(x(T, B, 1, I)), ValueError, r"Expected input to be 2D or 3D, got 4D"),
    "input feature size": (lambda: lstm()(x(T, B, I + 1)), RuntimeError,
                           r"input.size\(-1\) must be equal to input_size. Expected 4, got 5"),
    "input int64": (lambda: lstm()(torch.ones(T, B, I, dtype=torch.long)), ValueError,
                    r"input dtype \(torch.int64\) does not match weight dtype"),
    "input bool": (lambda: lstm()(torch.ones(T, B, I, dtype=torch.bool)), ValueError,
                   r"input dtype \(torch.bool\) does not match weight dtype"),
    "input float64, module float32": (lambda: lstm()(x(dtype=torch.float64)), ValueError,
                                      r"input dtype \(torch.float64\) does not match weight dtype"),
    "input T = 0": (lambda: lstm()(x(0, B, I)), RuntimeError, r"Expected sequence length to be larger than 0 in RNN"),
    "input T = 0, GRU": (lambda: FastBiGRU(I, H)(x(0, B, I)), RuntimeError,
                         r"Expected sequence length to be larger than 0 in RNN"),
    "input transposed (non-contiguous)": (lambda: same_as_torch(lstm(), x(B, T, I).transpose(0, 1)), None, "ok"),
    "input strided (every other feature)": (lambda: same_as_torch(lstm(), x(T, B, 2 * I)[..., ::2]), None, "ok"),
    # hx
    "h0 size": (lambda: lstm()(x(), (torch.randn(2, B + 1, H), torch.randn(2, B, H))), RuntimeError,
                r"Expected hidden\[0\] size \(2, 2, 5\), got \[2, 3, 5\]"),
    "c0 size": (lambda: lstm()(x(), (torch.randn(2, B, H), torch.randn(4, B, H))), RuntimeError,
                r"Expected hidden\[1\] size \(2, 2, 5\), got \[4, 2, 5\]"),
    "h0 rank 2, batched input": (lambda: lstm()(x(), (torch.randn(B, H), torch.randn(2, B, H))), RuntimeError,
                                 r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\)"),
    "GRU h0 size": (lambda: FastBiGRU(I, H)(x(), torch.randn(1, B, H)), RuntimeError,
                    r"Expected hidden size \(2, 2, 5\), got \[1, 2, 5\]"),
    "h0 float64": (lambda: lstm()(x(), (torch.randn(2, B, H, dtype=torch.float64), torch.randn(2, B, H))),
                   RuntimeError, r"expected h0 of dtype Float, got Double"),
    "h0 transposed (non-contiguous)": (
        lambda: same_as_torch(lstm(), x(), (torch.randn(B, 2, H).transpose(0, 1), torch.randn(2, B, H))), None, "ok"),
    # lengths
    "lengths > T": (lambda: lstm()(x(), lengths=torch.tensor([T + 1, 1])), ValueError,
                    r"lengths must be <= the input's sequence length 3"),
    "lengths 0": (lambda: lstm()(x(), lengths=torch.tensor([0, 1])), ValueError, r"lengths must be >= 1"),
    "lengths negative": (lambda: lstm()(x(), lengths=torch.tensor([-1, 2])), ValueError, r"lengths must be >= 1"),
    "lengths wrong count": (lambda: lstm()(x(), lengths=torch.tensor([3, 2, 1])), ValueError,
                            r"lengths must be 1-D with one entry per batch element: expected shape \(2,\), got \(3,\)"),
    "lengths float": (lambda: lstm()(x(), lengths=torch.tensor([3.0, 2.0])), ValueError,
                      r"lengths must be an integer tensor, got dtype torch.float32"),
    "lengths bool": (lambda: lstm()(x(), lengths=torch.tensor([True, True])), ValueError,
                     r"lengths must be an integer tensor, got dtype torch.bool"),
    "lengths rank 2": (lambda: lstm()(x(), lengths=torch.tensor([[3, 2]])), ValueError,
                       r"lengths must be 1-D .* got \(1, 2\)"),
    "lengths not numbers": (lambda: lstm()(x(), lengths=["a", "b"]), ValueError,
                            r"lengths must be a 1-D integer tensor or a list of ints"),
    "lengths with a PackedSequence": (
        lambda: lstm()(nn.utils.rnn.pack_padded_sequence(x(), [3, 2]), lengths=[3, 2]), ValueError,
        r"lengths must not be given with a PackedSequence"),
    "lengths int32, a list": (lambda: same_as_torch(lstm(), x(), lengths=torch.tensor([3, 1], dtype=torch.int32)),
                              None, "ok"),
    # devices
    "input on meta, weights on cpu": (lambda: lstm()(x(device="meta")), RuntimeError,
                                      r"Input and parameter tensors are not at the same device, found input tensor "
                                      r"at meta and parameter tensor at cpu"),
    "h0 on meta, input on cpu": (lambda: lstm()(x(), (torch.zeros(2, B, H, device="meta"), torch.zeros(2, B, H))),
                                 RuntimeError, r"Input and hidden tensors are not at the same device, found input "
                                               r"tensor at cpu and hidden tensor at meta"),
    "module and input on meta (as nn.LSTM: shapes)": (
        lambda: "ok" if [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(
            FastBiLSTM(I, H, num_layers=2, device="meta")(x(device="meta"), lengths=[3, 1]))]
        == [(T, B, 2 * H), (4, B, H), (4, B, H)] else "wrong shapes", None, "ok"),
    "one parameter on meta": (lambda: replaced("weight_hh_l0_reverse", torch.randn(4 * H, H, device="meta"))(x()),
                              RuntimeError, r"expected weights\[5\] on cpu \(input's device\), got meta"),
    # parameters a user replaced
    "weight_hh of the wrong shape": (lambda: replaced("weight_hh_l0", torch.randn(4 * H, 3))(x()), RuntimeError,
                                     r"expected weights\[1\] \(weight_hh\) of shape \(20, 5\)"),
    "weight_ih of the wrong shape": (lambda: replaced("weight_ih_l0", torch.randn(4 * H, I + 1))(x()), RuntimeError,
                                     r"expected weights\[0\] \(weight_ih\) of size \[20, 4\], got \[20, 5\]"),
    "bias_ih of the wrong shape": (lambda: replaced("bias_ih_l0", torch.randn(4 * H + 1))(x()), RuntimeError,
                                   r"expected weights\[2\] \(bias_ih\) of size \[20\], got \[21\]"),
    "weight_hh_reverse float64": (lambda: replaced("weight_hh_l0_reverse", torch.randn(4 * H, H, dtype=torch.float64))(x()),
                                  RuntimeError, r"expected weights\[5\] \(weight_hh_reverse\) of dtype Float, got Double"),
    "weight_ih transposed (non-contiguous)": (
        lambda: same_as_torch(replaced("weight_ih_l0", torch.randn(I, 4 * H).t()), x()), None, "ok"),
    "weight_hr of the wrong shape (proj_size)": (
        lambda: replaced("weight_hr_l0", torch.randn(3, H), FastBiLSTM(I, H, proj_size=2))(x()), RuntimeError,
        r"weight_hr|size"),
    # the op, called directly
    "op: unknown cell": (lambda: forward_with(cell="LSTMX"), RuntimeError, r"LSTMX"),
    "op: 7 weights": (lambda: forward_with(weights=lambda a: a[2][:7]), RuntimeError,
                      r"expected the layer's 8 weights .* got 7"),
    "op: 10 weights for a GRU": (lambda: forward_with(cell="GRU", gates=3, weights=lambda a: a[2] + a[2][:2]),
                                 RuntimeError, r"expected the layer's 8 weights"),
    "op: input rank 2": (lambda: forward_with(input=torch.randn(T, I)), RuntimeError,
                         r"expected input of shape \(T, B, I\)"),
    "op: T = 0": (lambda: forward_with(input=torch.randn(0, B, I), lengths=torch.zeros(B, dtype=torch.long)),
                  RuntimeError, r"at least one time step"),
    "op: input int64": (lambda: forward_with(input=torch.ones(T, B, I, dtype=torch.long)), RuntimeError,
                        r"take float32, float64, bfloat16 or float16 input, got Long"),
    "op: h0 size": (lambda: forward_with(h0=torch.randn(2, B + 1, H)), RuntimeError, r"expected h0 of size"),
    "op: c0 size": (lambda: forward_with(c0=torch.randn(1, B, H)), RuntimeError, r"expected c0 of size"),
    "op: non-empty c0 for a GRU": (lambda: forward_with(cell="GRU", gates=3, c0=torch.randn(2, B, H)), RuntimeError,
                                   r"expected an empty c0 for cell GRU"),
    "op: h0 transposed": (lambda: forward_with(h0=torch.randn(B, 2, H).transpose(0, 1)), RuntimeError,
                          r"expected h0 to be contiguous"),
    "op: lengths float": (lambda: forward_with(lengths=torch.ones(B)), RuntimeError, r"expected lengths as"),
    "op: lengths wrong count": (lambda: forward_with(lengths=torch.ones(B + 1, dtype=torch.long)), RuntimeError,
                                r"expected lengths as .* of size \(2\)"),
    "op: lengths > T": (lambda: forward_with(lengths=torch.tensor([T + 1, 1])), RuntimeError,
                        r"lengths\[0\] must be in \[1, 3\]"),
    "op: lengths 0": (lambda: forward_with(lengths=torch.tensor([2, 0])), RuntimeError,
                      r"lengths\[1\] must be in \[1, 3\]"),
    "op: weight on meta": (lambda: forward_with(weights=lambda a: a[2][:1] + [a[2][1].to("meta")] + a[2][2:]),
                           RuntimeError, r"expected weights\[1\] on cpu \(input's device\), got meta"),
    "op backward: grad_output size": (lambda: backward_with(grad_output=torch.randn(T, B, H)),
                                      RuntimeError, r"expected grad_output of size"),
    "op backward: no workspace": (lambda: backward_with(workspace=torch.empty(0)), RuntimeError,
                                  r"expected workspace \(forward's, with save_workspace=True\) of size"),
    "op backward: grad_c_n size": (lambda: backward_with(grad_c_n=torch.randn(1, B, H)), RuntimeError,
                                   r"expected grad_c_n of size"),
    "op backward: lengths > T": (lambda: backward_with(lengths=torch.tensor([T + 1, 1])), RuntimeError,
                                 r"lengths\[0\] must be in \[1, 3\]"),
    "op backward: output_mask of 3": (lambda: backward_with(output_mask=[True, False, True]), RuntimeError,
                                      r"List with 3 elements to a fixed-size array of size 4"),
}
for _name, _cls, _kwargs in [("LSTM", FastBiLSTM, {}), ("GRU", FastBiGRU, {}), ("RNN tanh", FastBiRNN, {}),
                             ("RNN relu", FastBiRNN, {"nonlinearity": "relu"})]:
    for _with_lengths in (False, True):
        CASES[f"B = 0, {_name}{', lengths' if _with_lengths else ''}"] = (
            lambda c=_cls, w=_with_lengths, k=_kwargs: empty_batch(c, w, **k), None, "ok")


def run_isolated(name, timeout=60):
    """(kind, message) of CASES[name] run in a forked child: kind is the exception's type name,
    'returned' (the call's result as the message), 'signal' or 'timeout'."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            # The parent's OpenMP pool does not survive the fork (a parallel region would wait on
            # its threads for ever): one thread, run inline.
            torch.set_num_threads(1)
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = ("returned", str(CASES[name][0]()))
        except BaseException as error:  # noqa: B036 (a child reports everything)
            result = (type(error).__name__, str(error))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(pickle.dumps(result))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], timeout)
        data = pipe.read() if ready else b""
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and ready:
        return "signal", f"killed by signal {os.WTERMSIG(status)}"
    if not ready:
        return "timeout", f"no answer in {timeout} s"
    return pickle.loads(data) if data else ("signal", f"exit status {status}, no report")


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name):
    _, expected_type, pattern = CASES[name]
    kind, message = run_isolated(name)
    if expected_type is None:
        assert (kind, message) == ("returned", pattern), f"{kind}: {message}"
        return
    names = {t.__name__ for t in (expected_type if isinstance(expected_type, tuple) else (expected_type,))}
    assert kind in names, f"expected {names}, got {kind}: {message}"
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"


def table():
    rows = ["| case | raises | message (first line) |", "| --- | --- | --- |"]
    for name in CASES:
        kind, message = run_isolated(name)
        first = message.strip().splitlines()[0] if message.strip() else ""
        rows.append(f"| {name} | {'works (equals nn.*)' if kind == 'returned' else kind} | "
                    f"{'' if kind == 'returned' else first.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__" and sys.argv[1:] == ["--table"]:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "bad_inputs.md")
    with open(path, "w") as out:
        out.write(f"# Bad inputs: {len(CASES)} cases (`python tests/test_bad_inputs.py --table`)\n\n" + table())
    print(path)
