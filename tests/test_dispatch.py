"""The GPU dispatch (birnn_fast/dispatch.py) and the cuDNN route (birnn_fast/cudnn_route.py), on the CPU.

- selection: the table's measured point, the nearest-point rule for unmeasured shapes, ties and
  unmeasured groups to ours, engines that cannot run skipped, BIRNN_FAST_BACKEND forcing (the cuda
  engine raising with its reason while absent), the reasons engine_info reports;
- the route's contract: the same route code, run by torch's CPU RNN, against the reference for every
  cell, lengths, proj_size, output_mask: outputs, zeros at padding, final states, every gradient;
- the route as the ops' kernel (CPU key, as the dispatch makes it the CUDA one): modules with
  lengths, double backward, torch.compile(fullgraph=True) from the first call, export, opcheck;
- the dispatcher itself as the ops' kernel, with a table that splits shapes between the route and
  the Triton engine (interpreted): each call's forward and backward on the same engine.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import cpu_kernels  # noqa: E402

import birnn_fast  # noqa: E402
from birnn_fast import cudnn_route, dispatch, reference  # noqa: E402
from birnn_fast.dispatch import Key  # noqa: E402

CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
CUDA = torch.device("cuda")


def point(H, B, engine, dtype="float32", lengths=False, training=True, cell="LSTM", arch="sm_90"):
    return {"arch": arch, "dtype": dtype, "cell": cell, "H": H, "B": B, "lengths": lengths, "training": training,
            "engine": engine, "ms": {"triton": 2.0 if engine == "cudnn" else 1.0, "cudnn": 1.5}}


TABLE = {"run": "a test run", "entries": [
    point(256, 16, "triton"), point(1024, 16, "triton"), point(1024, 64, "cudnn"), point(256, 64, "triton"),
    point(1024, 64, "triton", lengths=True)]}


def key(H, B, lengths=False, training=True, cell="LSTM", dtype="float32", arch="sm_90"):
    return Key(arch, dtype, cell, H, B, lengths, training)


@pytest.fixture
def engines(monkeypatch):
    """Every engine runs but ``cuda`` (absent, as while its module is not built); returns the set of
    engines that run, which a test may shrink."""
    runnable = {"triton", "cudnn"}

    def why_not(engine, device, dtype, cell="LSTM", projections=False, hidden=None, batch=1):
        return None if engine in runnable else f"the {engine} engine is unavailable: no module"

    monkeypatch.setattr(dispatch, "why_not", why_not)
    monkeypatch.delenv("BIRNN_FAST_BACKEND", raising=False)
    return runnable


def test_measured_point(engines):
    assert dispatch.choose(key(1024, 64), table=TABLE).engine == "cudnn"
    assert dispatch.choose(key(1024, 16), table=TABLE).engine == "triton"
    choice = dispatch.choose(key(1024, 64), table=TABLE)
    assert "measured H=1024 B=64" in choice.reason and "a test run" in choice.reason


def test_nearest_point(engines):
    """H 2048, B 128: nearest (1024, 64); H 900, B 50: nearest (1024, 64); H 300, B 60: (256, 64)."""
    assert dispatch.choose(key(2048, 128), table=TABLE).engine == "cudnn"
    choice = dispatch.choose(key(900, 50), table=TABLE)
    assert choice.engine == "cudnn" and "nearest measured point H=1024 B=64" in choice.reason
    assert dispatch.choose(key(300, 60), table=TABLE).engine == "triton"


def test_tie_goes_to_ours(engines):
    """B 32 is as far from 16 as from 64 (log2): at H 1024, triton (B 16) and cudnn (B 64) tie."""
    assert dispatch.choose(key(1024, 32), table=TABLE).engine == "triton"


def test_groups_apart(engines):
    """lengths, forward-only, another dtype, cell or arch: their own points, else the first engine."""
    assert dispatch.choose(key(1024, 64, lengths=True), table=TABLE).engine == "triton"
    for other in (key(1024, 64, training=False), key(1024, 64, dtype="bfloat16"), key(1024, 64, cell="GRU"),
                  key(1024, 64, arch="sm_80")):
        choice = dispatch.choose(other, table=TABLE)
        assert choice.engine == "triton" and "has no" in choice.reason, other


def test_unrunnable_engine_skipped(engines):
    engines.discard("cudnn")
    choice = dispatch.choose(key(1024, 64), table=TABLE)
    assert choice.engine == "triton" and "cudnn cannot run it" in choice.reason
    engines.discard("triton")
    with pytest.raises(RuntimeError, match="no GPU engine"):
        dispatch.choose(key(1024, 64), table=TABLE)


@pytest.mark.parametrize("forced", ["triton", "cudnn"])
def test_forced(engines, forced):
    choice = dispatch.choose(key(1024, 64), forced=forced, table=TABLE)
    assert choice == dispatch.Choice(forced, f"forced by BIRNN_FAST_BACKEND={forced}")


def test_forced_cuda_absent_raises(engines):
    with pytest.raises(RuntimeError, match="BIRNN_FAST_BACKEND=cuda cannot run: the cuda engine is unavailable"):
        dispatch.choose(key(256, 16), forced="cuda", table=TABLE)


def test_cuda_engine_says_why_it_cannot_run():
    """The real engines: birnn_fast.cuda_kernels asked with the layer's shape (its kernels take some
    shapes only) says why it cannot run here, and the table's choice skips it with that reason."""
    dispatch.load_engines()
    if "cuda" not in dispatch._engines:
        assert "birnn_fast.cuda_kernels" in dispatch.why_not("cuda", CUDA, torch.float32)
        return
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the cuda engine may run")
    reason = dispatch.why_not("cuda", CUDA, torch.bfloat16, "LSTM", False, 4096, 16)
    assert reason and "cannot run this layer" in reason
    assert dispatch.why_not("cuda", CUDA, torch.bfloat16, "LSTM", False, 256, 16)
    with pytest.raises(RuntimeError, match="BIRNN_FAST_BACKEND=cuda cannot run: "):
        dispatch.choose(key(256, 16, dtype="bfloat16"), forced="cuda", table={"run": None, "entries": []})


def test_package_table_routes_the_h200_losses(engines):
    """The seeded table (H200 run of 2026-12-04): fp32 B64 H1024 to cuDNN in every mode; ours where
    it measured faster (bf16 B16 H1024, every H 256)."""
    table = dispatch.load_table()
    assert table["run"] and table["entries"]
    for lengths in (False, True):
        for training in (False, True):
            assert dispatch.choose(key(1024, 64, lengths, training), table=table).engine == "cudnn"
            assert dispatch.choose(key(1024, 16, lengths, training, dtype="bfloat16"), table=table).engine == "triton"
            assert dispatch.choose(key(256, 16, lengths, training), table=table).engine == "triton"
    for entry in table["entries"]:
        assert entry["engine"] == min(entry["ms"], key=entry["ms"].get), entry


def test_engine_info_cpu():
    engine, reason = birnn_fast.engine_info("LSTM", 16, 256, torch.float32, "cpu")
    assert engine in ("cpu", "reference") and reason


def test_engine_info_cuda(engines, monkeypatch):
    """On CUDA (selection only, no tensor): the table's engine and its reason."""
    from birnn_fast import backends

    monkeypatch.setattr(backends, "select", lambda device, dtype, projections=False: "triton")
    monkeypatch.setattr(dispatch, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(dispatch, "TABLE", TABLE)
    monkeypatch.setattr(dispatch, "_choices", {})
    engine, reason = birnn_fast.engine_info("LSTM", 64, 1024, torch.float32, "cuda", training=True)
    assert engine == "cudnn" and "measured H=1024 B=64" in reason
    assert birnn_fast.engine_info("LSTM", 64, 1024, torch.float32, "cuda", lengths=True)[0] == "triton"


# The route's contract, by torch's CPU RNN, against the reference.

def layer_args(cell, T, B, I, H, lengths, proj=0, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    G = GATES[cell]
    P = proj or H

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype) * 0.5

    per_direction = [randn(G * H, I), randn(G * H, P), randn(G * H), randn(G * H)] + ([randn(P, H)] if proj else [])
    weights = per_direction + [randn(*w.shape) for w in per_direction]
    c0 = randn(2, B, H) if cell == "LSTM" else torch.empty(0, dtype=dtype)
    return randn(T, B, I), weights, randn(2, B, P), c0, torch.tensor(lengths)


CASES = [("LSTM", 0), ("GRU", 0), ("RNN_TANH", 0), ("RNN_RELU", 0), ("LSTM", 3)]


@pytest.mark.parametrize("lengths", [[5, 5, 5], [5, 1, 3], [2, 4, 3]], ids=["equal", "ragged", "none_full"])
@pytest.mark.parametrize("cell,proj", CASES, ids=[f"{c}{'_proj' if p else ''}" for c, p in CASES])
def test_route_as_reference(cell, proj, lengths):
    T, B, I, H = 5, 3, 4, 6
    x, weights, h0, c0, lengths = layer_args(cell, T, B, I, H, lengths, proj)
    generator = torch.Generator().manual_seed(1)
    got = cudnn_route.forward_op(cell, x, weights, h0, c0, lengths, True)
    expected = reference.forward_op(cell, x, weights, h0, c0, lengths, True)
    for index in range(3):
        torch.testing.assert_close(got[index], expected[index], rtol=1e-9, atol=1e-9)
    padding = torch.arange(T)[:, None] >= lengths[None, :]
    assert (got[0][padding] == 0).all()
    assert got[3].shape == expected[3].shape and got[3].dtype == expected[3].dtype
    assert cudnn_route.forward_op(cell, x, weights, h0, c0, lengths, False)[3].shape == (0,)
    grads = [torch.randn(got[0].shape, generator=generator, dtype=x.dtype),
             torch.randn(got[1].shape, generator=generator, dtype=x.dtype),
             torch.randn(got[2].shape, generator=generator, dtype=x.dtype)]
    for mask in ([True, True, True, True], [False, True, False, True], [True, False, True, False]):
        mine = cudnn_route.backward_op(cell, *grads, x, weights, h0, c0, lengths, got[0], got[3], mask)
        theirs = reference.backward_op(cell, *grads, x, weights, h0, c0, lengths, expected[0], expected[3], mask)
        torch.testing.assert_close(mine[0], theirs[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(mine[2], theirs[2], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(mine[3], theirs[3], rtol=1e-9, atol=1e-9)
        for a, b in zip(mine[1], theirs[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.fixture
def route_as_cpu_kernels(monkeypatch):
    """The route as the ops' CPU kernels (as dispatch makes it their CUDA one for a shape)."""
    from birnn_fast import backends

    monkeypatch.setitem(backends._load_errors, "cpu", None)
    monkeypatch.setenv("BIRNN_FAST_BACKEND", "cpu")
    monkeypatch.setattr(backends, "_selected", {})
    with cpu_kernels(cudnn_route.forward_op, cudnn_route.backward_op):
        yield


def test_route_module_with_lengths(route_as_cpu_kernels):
    torch.manual_seed(0)
    ours = birnn_fast.FastBiLSTM(4, 6).double()
    theirs = torch.nn.LSTM(4, 6, bidirectional=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 2, 5])
    output, (h_n, c_n) = ours(x, lengths=lengths)
    packed, (h_ref, c_ref) = theirs(torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(packed, total_length=7)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(h_n, h_ref)
    torch.testing.assert_close(c_n, c_ref)
    cotangent = torch.randn_like(output)
    mine = torch.autograd.grad(output, [x, *ours.parameters()], cotangent)
    reference_grads = torch.autograd.grad(expected, [x, *theirs.parameters()], cotangent)
    for a, b in zip(mine, reference_grads):
        torch.testing.assert_close(a, b)


def test_route_double_backward(route_as_cpu_kernels):
    torch.manual_seed(0)
    layer = birnn_fast.FastBiGRU(3, 4).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])
    torch.autograd.gradgradcheck(lambda inp: layer(inp, lengths=lengths)[0], (x,))


def test_route_compile_fullgraph(route_as_cpu_kernels):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = birnn_fast.FastBiLSTM(4, 6)
    x = torch.randn(5, 3, 4, requires_grad=True)
    lengths = torch.tensor([5, 1, 3])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    output = compiled(x, lengths=lengths)[0]
    expected = layer(x, lengths=lengths)[0]
    torch.testing.assert_close(output, expected)
    (grad,) = torch.autograd.grad(output.sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, grad_expected)


def test_route_export(route_as_cpu_kernels):
    torch.manual_seed(0)
    layer = birnn_fast.FastBiLSTM(4, 6)
    x = torch.randn(5, 3, 4)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x)[0], layer(x)[0])


@pytest.mark.parametrize("lengths", [[4, 4, 4], [4, 2, 3]], ids=["equal", "ragged"])
def test_route_opcheck(lengths):
    """Schema (no argument mutated, no alias returned) and fake kernel of both ops on the route, also
    under opcheck's dispatch modes (which exclude more of the dispatcher's keys inside the kernel)."""
    x, weights, h0, c0, lengths = layer_args("LSTM", 4, 3, 4, 5, lengths, dtype=torch.float32)
    with cpu_kernels(cudnn_route.forward_op, cudnn_route.backward_op):
        torch.library.opcheck(torch.ops.birnn_fast.forward.default, ("LSTM", x, weights, h0, c0, lengths, True),
                              test_utils=("test_schema", "test_faketensor"))
        output, h_n, c_n, workspace = torch.ops.birnn_fast.forward("LSTM", x, weights, h0, c0, lengths, True)
        args = ("LSTM", torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x, weights, h0, c0,
                lengths, output, workspace, [True, True, True, True])
        torch.library.opcheck(torch.ops.birnn_fast.backward.default, args,
                              test_utils=("test_schema", "test_faketensor"))


# The dispatcher as the ops' kernel: the route and the Triton engine (interpreted) split by the table.

@pytest.fixture
def dispatcher_as_cpu_kernels(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter runs CPU tensors only")
    from birnn_fast import backends

    dispatch.load_engines()
    table = {"run": "a test run", "entries": [
        point(8, 3, "cudnn", arch="cpu", lengths=False), point(8, 3, "triton", arch="cpu", lengths=True),
        point(8, 3, "triton", arch="cpu", lengths=False, training=False)]}
    monkeypatch.setattr(dispatch, "TABLE", table)
    monkeypatch.setattr(dispatch, "_choices", {})
    real_why_not = dispatch.why_not
    monkeypatch.setattr(dispatch, "why_not", lambda engine, device, dtype, cell="LSTM", projections=False, hidden=None,
                        batch=1: None if engine != "cuda" else real_why_not(engine, device, dtype, cell, projections))
    monkeypatch.setitem(backends._load_errors, "cpu", None)
    monkeypatch.setenv("BIRNN_FAST_BACKEND", "cpu")
    monkeypatch.setattr(backends, "_selected", {})
    calls = []
    for name in ("triton", "cudnn"):
        module = dispatch._engines[name]
        for op in ("forward_op", "backward_op"):
            real = getattr(module, op)
            monkeypatch.setattr(module, op, (lambda real, name, op: lambda *args: calls.append((name, op)) or
                                             real(*args))(real, name, op), raising=True)
    with cpu_kernels(dispatch.forward_op, dispatch.backward_op):
        yield calls


@pytest.mark.parametrize("lengths,training,engine", [([5, 5, 5], True, "cudnn"), ([5, 2, 4], True, "triton"),
                                                     ([5, 5, 5], False, "triton")])
def test_dispatcher_splits_by_table(dispatcher_as_cpu_kernels, lengths, training, engine):
    calls = dispatcher_as_cpu_kernels
    torch.manual_seed(0)
    layer = birnn_fast.FastBiLSTM(4, 8)
    x = torch.randn(5, 3, 4, requires_grad=training)
    lengths = torch.tensor(lengths)
    with torch.set_grad_enabled(training):
        output = layer(x, lengths=lengths)[0]
    expected = reference.layer("LSTM", x.detach(), [w.detach() for w in layer._flat_weights],
                               torch.zeros(2, 3, 8), torch.zeros(2, 3, 8), lengths)[0]
    torch.testing.assert_close(output.detach(), expected, rtol=1e-4, atol=1e-5)
    if training:
        output.sum().backward()
        assert calls == [(engine, "forward_op"), (engine, "backward_op")]
    else:
        assert calls == [(engine, "forward_op")]
