"""Export: torch.onnx.export (the dynamo exporter) to ONNX's own LSTM / GRU / RNN operators, run by
ONNX Runtime; torch.jit.trace as nn.LSTM's; torch.export.export with lengths= as a kwarg.

Every exported or traced program is run on a new input of another length and batch size than the
one it was made from (lengths include 1 and T), and compared with the eager layer.
"""
import io
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN
from birnn_fast import ops

INPUT, HIDDEN = 5, 6
ATOL = 1e-5  # fp32

CELLS = {
    "LSTM": (lambda **kw: FastBiLSTM(INPUT, HIDDEN, **kw), nn.LSTM, "LSTM"),
    "GRU": (lambda **kw: FastBiGRU(INPUT, HIDDEN, **kw), nn.GRU, "GRU"),
    "RNN_TANH": (lambda **kw: FastBiRNN(INPUT, HIDDEN, nonlinearity="tanh", **kw), nn.RNN, "RNN"),
    "RNN_RELU": (lambda **kw: FastBiRNN(INPUT, HIDDEN, nonlinearity="relu", **kw), nn.RNN, "RNN"),
}
# (num_layers, hx given, lengths given, batch_first): each factor both ways.
CASES = [(1, False, False, False), (2, True, True, True), (2, False, True, False)]


def case_id(case):
    layers, with_hx, with_lengths, batch_first = case
    return f"L{layers}" + "-hx" * with_hx + "-lengths" * with_lengths + "-batch_first" * batch_first


def make_inputs(cell, layers, with_hx, with_lengths, batch_first, steps, batch, lengths):
    """The keyword arguments of the layer's forward (input, hx, lengths as the case has them)."""
    x = torch.randn(batch, steps, INPUT) if batch_first else torch.randn(steps, batch, INPUT)
    kwargs = {"input": x}
    if with_hx:
        h0 = torch.randn(2 * layers, batch, HIDDEN)
        kwargs["hx"] = (h0, torch.randn(2 * layers, batch, HIDDEN)) if cell == "LSTM" else h0
    if with_lengths:
        kwargs["lengths"] = torch.tensor(lengths)
    return kwargs


def flat(tree):
    """The tensors of nested outputs or inputs, in order (ONNX's inputs and outputs are flat)."""
    return torch.utils._pytree.tree_leaves(tree)


def export_onnx(model, kwargs, batch_first):
    """torch.onnx.export with dynamic T and B; returns the ONNX model proto."""
    steps_axis, batch_axis = (1, 0) if batch_first else (0, 1)
    dynamic = {"input": {steps_axis: "T", batch_axis: "B"}}
    if "hx" in kwargs:
        dynamic["hx"] = tuple({1: "B"} for _ in kwargs["hx"]) if isinstance(kwargs["hx"], tuple) else {1: "B"}
    if "lengths" in kwargs:
        dynamic["lengths"] = {0: "B"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamic_shapes=dynamic, verbose=False)
    return program.model_proto


def run_onnxruntime(proto, kwargs):
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = [t.numpy() for t in flat(kwargs)]
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(feeds), (names, len(feeds))
    return session.run(None, dict(zip(names, feeds)))


def max_errors(got, expected):
    assert len(got) == len(expected)
    errors = []
    for g, e in zip(got, expected):
        assert tuple(g.shape) == tuple(e.shape)
        errors.append(float(np.abs(np.asarray(g) - e.detach().numpy()).max()))
    return errors


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("cell", CELLS)
def test_onnx_export_runs_in_onnxruntime(cell, case):
    layers, with_hx, with_lengths, batch_first = case
    make, _, onnx_op = CELLS[cell]
    torch.manual_seed(0)
    model = make(num_layers=layers, batch_first=batch_first).eval()
    proto = export_onnx(model, make_inputs(cell, *case, 7, 3, [7, 4, 1]), batch_first)

    nodes = list(proto.graph.node)
    recurrent = [node for node in nodes if node.op_type == onnx_op]
    assert len(recurrent) == layers, [node.op_type for node in nodes]
    assert not [node for node in nodes if node.domain not in ("", "ai.onnx")], "a node outside ONNX's own domain"
    for node in recurrent:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["direction"] == b"bidirectional"
        assert attributes["hidden_size"] == HIDDEN
        if cell == "GRU":
            assert attributes["linear_before_reset"] == 1
        if onnx_op == "RNN":
            assert attributes["activations"] == [b"Relu" if cell == "RNN_RELU" else b"Tanh"] * 2
        assert node.input[4], "sequence_lens"
    for value in proto.graph.input:
        if value.name == "input":
            dims = value.type.tensor_type.shape.dim
            assert all(dim.dim_param for dim in dims[:2]), f"T and B not dynamic: {dims}"

    # Other T and B than the export's, lengths with 1 and T; then T = B = 1.
    for steps, lengths in ((9, [9, 1, 5, 3]), (1, [1])):
        inputs = make_inputs(cell, *case, steps, len(lengths), lengths)
        with torch.no_grad():
            expected = flat(model(**inputs))
        got = run_onnxruntime(proto, inputs)
        errors = max_errors(got, expected)
        assert max(errors) <= ATOL, errors
        if with_lengths:  # ONNX Runtime writes exact zeros past sequence_lens, as ours
            output = got[0] if not batch_first else got[0].transpose(1, 0, 2)
            for row, length in enumerate(lengths):
                assert np.all(output[length:, row] == 0)


class _ProjectedLayer(nn.Module):
    """One layer of nn.LSTM(proj_size=...) through ops.birnn_layer with the contract's 10 weights."""

    def __init__(self, proj_size):
        super().__init__()
        self.lstm = nn.LSTM(INPUT, HIDDEN, proj_size=proj_size, bidirectional=True)

    def forward(self, input, h0, c0, lengths):
        weights = [getattr(self.lstm, name) for name in self.lstm._flat_weights_names]
        return ops.birnn_layer("LSTM", input, weights, h0, c0, lengths)


def packed_lstm(lstm, input, h0, c0, lengths):
    """nn.LSTM on padded input with per-row lengths: pack, run, pad (zeros past each length)."""
    packed = nn.utils.rnn.pack_padded_sequence(input, lengths, enforce_sorted=False)
    output, (h_n, c_n) = lstm(packed, (h0, c0))
    return nn.utils.rnn.pad_packed_sequence(output, total_length=input.shape[0])[0], h_n, c_n


def test_onnx_export_proj_size_as_scan():
    """ONNX's LSTM has no projection (and the projection is inside the recurrence): the exporter's
    graph for the contract's 10 weights is an ONNX Scan per direction, checked against nn.LSTM."""
    torch.manual_seed(0)
    proj = 4
    model = _ProjectedLayer(proj).eval()

    def inputs(steps, lengths):
        batch = len(lengths)
        return (torch.randn(steps, batch, INPUT), torch.randn(2, batch, proj), torch.randn(2, batch, HIDDEN),
                torch.tensor(lengths))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs(7, [7, 4, 1]), verbose=False,
                                    dynamic_shapes=({0: "T", 1: "B"}, {1: "B"}, {1: "B"}, {0: "B"}))
    proto = program.model_proto
    assert [node.op_type for node in proto.graph.node].count("Scan") == 2
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps, lengths in ((9, [9, 1, 5, 3]), (1, [1])):
        args = inputs(steps, lengths)
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)})
        with torch.no_grad():
            expected = packed_lstm(model.lstm, *args)
        errors = max_errors(got, expected)
        assert max(errors) <= ATOL, errors


def test_onnx_export_fast_bilstm_proj_size():
    torch.manual_seed(0)
    try:
        model = FastBiLSTM(INPUT, HIDDEN, num_layers=2, proj_size=3).eval()
    except NotImplementedError as error:
        pytest.skip(f"FastBiLSTM has no proj_size on this branch: {error}")
    proto = export_onnx(model, {"input": torch.randn(7, 3, INPUT), "lengths": torch.tensor([7, 4, 1])}, False)
    assert [node.op_type for node in proto.graph.node].count("Scan") == 4
    inputs = {"input": torch.randn(9, 4, INPUT), "lengths": torch.tensor([9, 1, 5, 3])}
    with torch.no_grad():
        expected = flat(model(**inputs))
    errors = max_errors(run_onnxruntime(proto, inputs), expected)
    assert max(errors) <= ATOL, errors


TRACE_CASES = [(1, False, False, False), (2, True, False, True), (2, True, True, False)]


@pytest.mark.parametrize("case", TRACE_CASES, ids=case_id)
@pytest.mark.parametrize("cell", CELLS)
def test_jit_trace_as_nn(cell, case):
    """The traced layer runs a new T and B as eager does, as nn.*'s traced layer does; gradients
    flow through it; it saves and loads."""
    layers, with_hx, with_lengths, batch_first = case
    make, torch_class, _ = CELLS[cell]
    torch.manual_seed(0)
    model = make(num_layers=layers, batch_first=batch_first)
    example = make_inputs(cell, *case, 7, 3, [7, 4, 1])
    new = make_inputs(cell, *case, 9, 4, [9, 1, 5, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation, nn.RNNBase's tracer warnings
        traced = torch.jit.trace(model, example_kwarg_inputs=example)
        if not with_lengths:
            kwargs = {"nonlinearity": "relu"} if cell == "RNN_RELU" else {}
            reference = torch_class(INPUT, HIDDEN, num_layers=layers, batch_first=batch_first,
                                    bidirectional=True, **kwargs)
            reference.load_state_dict(model.state_dict())
            traced_reference = torch.jit.trace(reference, example_kwarg_inputs=example)
            for got, expected in zip(flat(traced_reference(**new)), flat(reference(**new))):
                torch.testing.assert_close(got, expected)  # nn's trace generalises here
    assert [node.kind() for node in traced.inlined_graph.nodes()].count("birnn_fast::forward") == layers

    new["input"].requires_grad_(True)
    got, expected = flat(traced(**new)), flat(model(**new))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    seed = [torch.randn_like(e) for e in expected]
    wrt = [new["input"], model.weight_hh_l0, model.weight_ih_l0_reverse]
    grads = torch.autograd.grad(got, wrt, seed)
    expected_grads = torch.autograd.grad(expected, wrt, seed)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)

    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        for g, e in zip(flat(loaded(**new)), flat(model(**new))):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_export_with_lengths_kwarg(cell):
    make, _, _ = CELLS[cell]
    torch.manual_seed(0)
    model = make(num_layers=2).eval()
    x, lengths = torch.randn(7, 3, INPUT), torch.tensor([7, 4, 1])
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (x,), {"lengths": lengths},
                                   dynamic_shapes={"input": {0: torch.export.Dim("steps"), 1: batch},
                                                   "lengths": {0: batch}})
    targets = [str(node.target) for node in exported.graph.nodes]
    assert targets.count("birnn_fast.forward.default") == 2
    x, lengths = torch.randn(9, 4, INPUT), torch.tensor([9, 1, 5, 3])
    with torch.no_grad():
        for got, expected in zip(flat(exported.module()(x, lengths=lengths)), flat(model(x, lengths=lengths))):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _run_fresh(script):
    """Run ``script`` in a new interpreter (nothing imported or warmed up); return its stdout."""
    # A user's environment: not the Triton interpreter that conftest.py switches on for this process.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_user_path_onnx_export_fresh_process():
    out = _run_fresh("""
        import numpy as np, onnxruntime, torch
        from birnn_fast import FastBiLSTM
        model = FastBiLSTM(5, 6).eval()
        x = torch.randn(7, 3, 5)
        program = torch.onnx.export(model, (x,))
        session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
        (name,) = [i.name for i in session.get_inputs()]
        got = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            output, (h_n, c_n) = model(x)
        ops = sorted({node.op_type for node in program.model_proto.graph.node})
        print("ops", ops)
        print("error", max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, (output, h_n, c_n))))
    """)
    assert "'LSTM'" in out
    assert float(out.split("error")[-1]) <= ATOL, out


def test_user_path_jit_trace_fresh_process():
    out = _run_fresh("""
        import torch
        from birnn_fast import FastBiLSTM
        model = FastBiLSTM(5, 6)
        traced = torch.jit.trace(model, torch.randn(7, 3, 5))
        x = torch.randn(9, 4, 5)
        output, (h_n, c_n) = traced(x)
        expected, (h_e, c_e) = model(x)
        print("error", max(float((g - e).abs().max()) for g, e in zip((output, h_n, c_n), (expected, h_e, c_e))))
    """)
    assert float(out.split("error")[-1]) == 0.0, out
