"""What a new user does, each in a fresh Python process with default settings, as the first call:
nothing imported, compiled or warmed up before (issue 13's table).

``python tests/test_user_paths.py --table`` runs every path and prints the table (what nn.* does,
what FastBi* does now: "works" or the error's last line), for the notes."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PATHS = {
    # torch.compile, default backend (inductor), fullgraph, lengths, first call in the process.
    "compile_first_call": """
        model = FastBiLSTM(5, 6)
        x, lengths = torch.randn(7, 3, 5, requires_grad=True), torch.tensor([7, 2, 5])
        output, (h_n, c_n) = torch.compile(model, fullgraph=True)(x, lengths=lengths)
        (grad,) = torch.autograd.grad(output.sum() + h_n.sum(), x)
        expected, (h_e, _) = model(x, lengths=lengths)
        (expected_grad,) = torch.autograd.grad(expected.sum() + h_e.sum(), x)
        close(output, expected), close(grad, expected_grad)
    """,
    # One layer, no hx, no lengths, the library loaded by a first eager call: h0 and c0 are
    # created inside, and must not be one tensor twice.
    "compile_one_layer_no_hx": """
        model = FastBiLSTM(5, 6)
        x = torch.randn(7, 3, 5, requires_grad=True)
        expected, _ = model(x)
        output, _ = torch.compile(model, fullgraph=True)(x)
        (grad,) = torch.autograd.grad(output.sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        close(output, expected), close(grad, expected_grad)
    """,
    # A gradient penalty: create_graph=True, then backward through the gradient.
    "double_backward": """
        for fast_cls, torch_cls, kwargs in [(FastBiLSTM, nn.LSTM, {}), (FastBiGRU, nn.GRU, {}),
                                            (FastBiRNN, nn.RNN, {}), (FastBiRNN, nn.RNN, {"nonlinearity": "relu"})]:
            model = fast_cls(5, 6, dtype=torch.float64, **kwargs)
            expected = torch_cls(5, 6, bidirectional=True, dtype=torch.float64, **kwargs)
            expected.load_state_dict(model.state_dict())
            x = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)

            def penalty(module):
                (grad,) = torch.autograd.grad(module(x)[0].square().sum(), x, create_graph=True)
                return torch.autograd.grad(grad.square().sum(), list(module.parameters()))

            got, want = penalty(model), penalty(expected)
            assert all(w.abs().max() > 0 for w in want[:2])
            for a, b in zip(got, want):
                close(a, b)
    """,
    # Features that need no gradient (a speech encoder's input), eager and compiled, and a frozen
    # layer under a trainable input: the gradients torch gives, and None where torch gives None.
    "input_without_grad_frozen_layer": """
        for fast_cls, torch_cls in [(FastBiLSTM, nn.LSTM), (FastBiGRU, nn.GRU), (FastBiRNN, nn.RNN)]:
            model = fast_cls(5, 6, num_layers=2)
            expected = torch_cls(5, 6, num_layers=2, bidirectional=True)
            expected.load_state_dict(model.state_dict())
            x, lengths = torch.randn(7, 3, 5), torch.tensor([7, 2, 5])

            def torch_output(x):
                packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
                return nn.utils.rnn.pad_packed_sequence(expected(packed)[0], total_length=7)[0]

            torch_output(x).sin().sum().backward()
            for run in (model, torch.compile(model, fullgraph=True)):
                model.zero_grad(set_to_none=True)
                run(x, lengths=lengths)[0].sin().sum().backward()
                for mine, theirs in zip(model.parameters(), expected.parameters()):
                    close(mine.grad, theirs.grad)
            model.requires_grad_(False), expected.requires_grad_(False)
            model.zero_grad(set_to_none=True)
            x_fast, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
            model(x_fast, lengths=lengths)[0].sin().sum().backward()
            torch_output(x_torch).sin().sum().backward()
            close(x_fast.grad, x_torch.grad)
            assert all(p.grad is None for p in model.parameters())
        # The defaults: one layer, no hx, no lengths, features without grad.
        model, expected = FastBiLSTM(5, 6), nn.LSTM(5, 6, bidirectional=True)
        expected.load_state_dict(model.state_dict())
        x = torch.randn(7, 3, 5)
        model(x)[0].sin().sum().backward()
        expected(x)[0].sin().sum().backward()
        for mine, theirs in zip(model.parameters(), expected.parameters()):
            close(mine.grad, theirs.grad)
    """,
    # The dtypes nn.* returns under autocast, and its values to bf16's precision.
    "autocast_cpu_bf16": """
        for fast_cls, torch_cls in [(FastBiLSTM, nn.LSTM), (FastBiGRU, nn.GRU), (FastBiRNN, nn.RNN)]:
            model = fast_cls(5, 6)
            expected = torch_cls(5, 6, bidirectional=True)
            expected.load_state_dict(model.state_dict())
            x = torch.randn(7, 3, 5)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = torch.utils._pytree.tree_leaves(model(x))
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    want = torch.utils._pytree.tree_leaves(expected(x))
            except RuntimeError as error:
                # oneDNN has no bf16 LSTM on this CPU: nn.LSTM raises; where it has one,
                # mkldnn_rnn_layer returns bf16.
                assert "could not create a primitive descriptor" in str(error), error
                want = [t.bfloat16() for t in torch.utils._pytree.tree_leaves(expected(x))]
            assert [t.dtype for t in got] == [t.dtype for t in want], (fast_cls, got, want)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05)
    """,
    # A bf16 model trained as it is (no autocast), defaults, first call: every gradient within twice
    # torch's own bf16 error against float64 (the C++ kernels' forward and backward in bf16).
    "bf16_training": """
        torch.manual_seed(0)
        for fast_cls, torch_cls in [(FastBiLSTM, nn.LSTM), (FastBiGRU, nn.GRU), (FastBiRNN, nn.RNN)]:
            model = fast_cls(5, 6).to(torch.bfloat16)
            mimic = torch_cls(5, 6, bidirectional=True).to(torch.bfloat16)
            exact = torch_cls(5, 6, bidirectional=True).double()
            mimic.load_state_dict(model.state_dict()), exact.load_state_dict(model.state_dict())
            x, weight = torch.randn(7, 3, 5).bfloat16(), torch.randn(7, 3, 12, dtype=torch.float64)
            results = []
            for module, dtype in ((model, torch.bfloat16), (mimic, torch.bfloat16), (exact, torch.float64)):
                inp = x.to(dtype, copy=True).requires_grad_()
                output, _ = module(inp)
                assert output.dtype == dtype, (fast_cls, output.dtype)
                (output.double() * weight).sum().backward()
                results.append([output, inp.grad, *(p.grad for p in module.parameters())])
            for ours, theirs, reference in zip(*results):
                def error(t):
                    return ((t.double() - reference).norm() / reference.norm()).item()
                assert error(ours) <= 2 * error(theirs) + 1e-6, (fast_cls, error(ours), error(theirs))
    """,
    "proj_size": """
        model = FastBiLSTM(5, 6, num_layers=2, proj_size=2)
        expected = nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=2)
        expected.load_state_dict(model.state_dict())
        x, lengths = torch.randn(7, 3, 5), torch.tensor([7, 2, 5])
        hx = (torch.randn(4, 3, 2), torch.randn(4, 3, 6))
        output, (h_n, c_n) = model(x, hx, lengths=lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        want, (h_w, c_w) = expected(packed, hx)
        close(output, nn.utils.rnn.pad_packed_sequence(want, total_length=7)[0]), close(h_n, h_w), close(c_n, c_w)
    """,
    "opcheck_forward": """
        from torch.library import opcheck
        for cell, gates in [("LSTM", 4), ("GRU", 3), ("RNN_TANH", 1), ("RNN_RELU", 1)]:
            weights = [torch.randn(shape, requires_grad=True)
                       for shape in [(gates * 6, 5), (gates * 6, 6), (gates * 6,), (gates * 6,)] * 2]
            c0 = torch.randn(2, 3, 6, requires_grad=True) if cell == "LSTM" else torch.empty(0)
            args = (cell, torch.randn(4, 3, 5, requires_grad=True), weights, torch.randn(2, 3, 6, requires_grad=True),
                    c0, torch.tensor([4, 1, 3]), True)
            opcheck(torch.ops.birnn_fast.forward.default, args)
    """,
    "onnx_export_onnxruntime": """
        import warnings
        import onnxruntime
        model = FastBiLSTM(5, 6)
        x = torch.randn(7, 3, 5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamic_shapes={"input": {0: "T", 1: "B"}})
        ops = {node.op_type for node in program.model_proto.graph.node}
        assert "LSTM" in ops, ops
        session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        other = torch.randn(4, 2, 5)
        got = session.run(None, {session.get_inputs()[0].name: other.numpy()})
        want = torch.utils._pytree.tree_leaves(model(other))
        for a, b in zip(got, want):
            close(torch.from_numpy(a), b.detach())
    """,
    "jit_trace": """
        model = FastBiLSTM(5, 6)
        x = torch.randn(7, 3, 5)
        traced = torch.jit.trace(model, x)
        other = torch.randn(7, 2, 5)
        close(traced(other)[0], model(other)[0])
    """,
    "export_with_lengths": """
        model = FastBiLSTM(5, 6)
        x, lengths = torch.randn(7, 3, 5), torch.tensor([7, 2, 5])
        program = torch.export.export(model, (x,), {"lengths": lengths})
        got, (h_n, _) = program.module()(x, lengths=lengths)
        want, (h_w, _) = model(x, lengths=lengths)
        close(got, want), close(h_n, h_w)
    """,
    # An existing torch.nn model moved over in one call, as its own code calls it (a PackedSequence,
    # flatten_parameters in training), then compiled whole; equal to the unconverted model.
    "convert_existing_model": """
        import copy
        import birnn_fast

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList([nn.LSTM(5, 6, batch_first=True, bidirectional=True),
                                             nn.GRU(12, 4, batch_first=True, bidirectional=True)])

            def forward(self, x, lengths):
                for layer in self.layers:
                    layer.flatten_parameters()
                    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                    x = nn.utils.rnn.pad_packed_sequence(layer(packed)[0], batch_first=True, total_length=7)[0]
                return x

        model = Encoder()
        original = copy.deepcopy(model)
        converted, names = birnn_fast.convert(model, return_names=True)
        assert names == ["layers.0", "layers.1"], names
        x, lengths = torch.randn(3, 7, 5), torch.tensor([7, 2, 5])
        for run in (converted, torch.compile(converted)):
            got, want = run(x, lengths), original(x, lengths)
            grads = torch.autograd.grad(got.sin().sum(), list(converted.parameters()))
            expected_grads = torch.autograd.grad(want.sin().sum(), list(original.parameters()))
            close(got, want)
            for a, b in zip(grads, expected_grads):
                close(a, b)
    """,
    "empty_batch": """
        model = FastBiLSTM(5, 6)
        x = torch.randn(7, 0, 5, requires_grad=True)
        output, (h_n, c_n) = model(x)
        assert output.shape == (7, 0, 12) and h_n.shape == (2, 0, 6)
        output.sum().backward()
    """,
    "empty_sequence_raises_as_torch": """
        try:
            FastBiLSTM(5, 6)(torch.randn(0, 3, 5))
        except RuntimeError as error:
            assert "Expected sequence length to be larger than 0 in RNN" in str(error), error
        else:
            raise AssertionError("no error")
    """,
}

PROLOGUE = """
import torch
from torch import nn
from birnn_fast import FastBiGRU, FastBiLSTM, FastBiRNN

def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
"""


def run_fresh(code):
    env = {key: value for key, value in os.environ.items()
           if key not in ("BIRNN_FAST_BACKEND", "TRITON_INTERPRET", "PYTEST_CURRENT_TEST")}
    script = PROLOGUE + textwrap.dedent(code) + "\nprint('user path ok')\n"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("path", PATHS)
def test_user_path_in_a_fresh_process(path):
    result = run_fresh(PATHS[path])
    assert result.returncode == 0 and "user path ok" in result.stdout, result.stderr[-4000:]


# What nn.LSTM / GRU / RNN (bidirectional) do on each path, for the table.
TORCH_DOES = {
    "compile_first_call": "graph-breaks (fullgraph=True raises)",
    "compile_one_layer_no_hx": "graph-breaks",
    "double_backward": "exact second-order gradients",
    "input_without_grad_frozen_layer": "gradients of what requires grad; None for a frozen layer",
    "autocast_cpu_bf16": "LSTM: bf16 (raises here: no bf16 oneDNN LSTM on Zen 2), GRU: float32, RNN: bf16",
    "bf16_training": "bf16 forward and backward",
    "proj_size": "LSTM with projections",
    "opcheck_forward": "(no custom op)",
    "onnx_export_onnxruntime": "exports (ONNX LSTM op)",
    "jit_trace": "works",
    "export_with_lengths": "(no lengths=)",
    "convert_existing_model": "(no convert)",
    "empty_batch": "(T, 0, 2H) output, backpropagates",
    "empty_sequence_raises_as_torch": "Expected sequence length to be larger than 0 in RNN",
}


def test_the_table_has_a_row_for_every_path():
    assert set(TORCH_DOES) == set(PATHS)


def table():
    rows = ["| user path (fresh process, first call) | nn.* bidirectional | FastBi* now |", "| --- | --- | --- |"]
    for path, code in PATHS.items():
        result = run_fresh(code)
        if result.returncode == 0 and "user path ok" in result.stdout:
            now = "works"
        else:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            now = "FAILS: " + (lines[-1] if lines else f"exit {result.returncode}")
        rows.append(f"| `{path}` | {TORCH_DOES[path]} | {now} |")
    return "\n".join(rows)


if __name__ == "__main__" and sys.argv[1:] == ["--table"]:
    print(table())
