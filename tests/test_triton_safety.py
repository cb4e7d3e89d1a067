"""What keeps a launch of the Triton kernels from hanging or silently computing garbage: the bounded
barrier wait and the launcher's error, the cooperative-launch check, the precision flags."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import time  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from birnn_fast.kernels import backward as kernels_backward  # noqa: E402
from birnn_fast.kernels import config as kernels  # noqa: E402
from birnn_fast.kernels import forward as kernels_forward  # noqa: E402
from birnn_fast.kernels.common import tf32_rounded  # noqa: E402
from concurrent_interpreter import concurrent_programs  # noqa: E402
from test_kernels_triton import DEVICE, INTERPRETED, SHARED_LIMIT, make_grads, make_inputs  # noqa: E402

# Polls before a barrier wait gives up in these tests: in the interpreter a poll takes tens of
# microseconds, a step of these shapes a few milliseconds.
SHORT_WAIT = 5000


def three_programs(cell, B, H, backward):
    """select_config's resident grid for a 6-SM GPU: 3 programs per direction meet at the barrier."""
    config = kernels.select_config(cell, B, H, torch.float32, "ieee", 6, SHARED_LIMIT[90], backward, stream_tiles=())
    assert config.n_hblocks == 3, config
    return config


@pytest.mark.skipif(not INTERPRETED, reason="a grid one program short is staged by the interpreter")
@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_grid_one_program_short_raises(cell, kernel):
    """The last program of the grid starts only once the others have finished, as on a GPU that cannot
    hold the grid: their barrier waits give up, the launch ends, and the launcher raises, naming the
    kernel, its configuration and the barrier (the step-tagged exchange's own: tests/test_triton_variants.py)."""
    T, B, H, lengths = 3, 4, 40, [3, 1, 2, 3]
    args = make_inputs(cell, T, B, 3, H, lengths)
    forward_config, backward_config = (three_programs(cell, B, H, backward) for backward in (False, True))
    if kernel == "forward":
        match = "birnn_forward_kernel with Config.*at the grid barrier"
        with concurrent_programs(held_back=1), pytest.raises(RuntimeError, match=match):
            kernels_forward.forward(cell, *args.values(), config=forward_config, max_polls=SHORT_WAIT)
        return
    with concurrent_programs():
        output, h_n, c_n, workspace = kernels_forward.forward(cell, *args.values(), config=forward_config)
    grads = make_grads(cell, T, B, H)
    match = "birnn_backward_kernel with Config.*at the grid barrier"
    with concurrent_programs(held_back=1), pytest.raises(RuntimeError, match=match):
        kernels_backward.backward(cell, *grads, args["input"], args["weight_ih"], args["weight_hh"], args["bias_hh"],
                                  args["h0"], args["c0"], args["lengths"], output, workspace, config=backward_config,
                                  max_polls=SHORT_WAIT)


@pytest.mark.skipif(not INTERPRETED, reason="a grid one program short is staged by the interpreter")
def test_barrier_floor_one_program_short_raises():
    import sys

    from test_kernels_triton import ROOT

    sys.path.insert(0, ROOT)
    from benchmarks.gpu.floor import barrier_floor

    input = torch.zeros(4, 16, 3, device=DEVICE)
    with concurrent_programs(held_back=1), pytest.raises(RuntimeError, match="barrier_floor_kernel"):
        barrier_floor("LSTM", input, 40, three_programs("LSTM", 16, 40, False), max_polls=SHORT_WAIT)


@triton.jit
def _store_one(p, i):
    tl.store(p + i, 1.0)


@triton.jit
def _calls_a_device_function(p):
    _store_one(p, tl.program_id(0))


@pytest.mark.skipif(not INTERPRETED, reason="the concurrent interpreter's own contract")
def test_concurrent_programs_rewrite_one_at_a_time(monkeypatch):
    """Program threads reaching a device function's first call together rewrite (parse) it one at a
    time: two parses at once can fail in CPython 3.11 (stop 36's CI, tests/concurrent_interpreter.py)."""
    from triton.runtime import interpreter

    inside, most = [0], [0]
    rewrite_ast = interpreter.FunctionRewriter.rewrite_ast

    def slow_rewrite_ast(rewriter):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.01)  # releases the GIL: another program thread would enter here
        try:
            return rewrite_ast(rewriter)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(interpreter.FunctionRewriter, "rewrite_ast", slow_rewrite_ast)
    for function in (_store_one, _calls_a_device_function):
        interpreter.InterpretedFunction.rewritten_fn.pop(function.fn, None)
    out = torch.zeros(8, device=DEVICE)
    with concurrent_programs():
        _calls_a_device_function[(8,)](out)
    assert out.tolist() == [1.0] * 8
    assert most[0] == 1


def test_launch_must_be_cooperative():
    """A grid that meets at a barrier raises unless its compiled kernel is cooperative (Triton drops or
    refuses launch options it does not know); one program per group needs no cooperative launch."""
    barrier = kernels.Config(16, 16, 1, 32, False, n_hblocks=2, n_bprog=1)
    single = barrier._replace(n_hblocks=1)
    plain = types.SimpleNamespace(metadata=types.SimpleNamespace(launch_cooperative_grid=False))
    cooperative = types.SimpleNamespace(metadata=types.SimpleNamespace(launch_cooperative_grid=True))
    with pytest.raises(RuntimeError, match="birnn_forward_kernel .* not launched cooperatively"):
        kernels.check_cooperative(plain, "birnn_forward_kernel", barrier)
    with pytest.raises(RuntimeError, match="not launched cooperatively"):
        kernels.check_cooperative(types.SimpleNamespace(), "birnn_forward_kernel", barrier)
    kernels.check_cooperative(cooperative, "birnn_forward_kernel", barrier)
    kernels.check_cooperative(plain, "birnn_forward_kernel", single)
    assert kernels.cooperative_launch_supported()
    assert kernels.launch_options(barrier)["launch_cooperative_grid"]


@pytest.fixture
def precision_flags():
    """Restores torch's TF32 flags, old and new API, however a test left them."""
    if not hasattr(torch.backends.cudnn, "rnn"):
        pytest.skip("torch before 2.9: no per-op fp32_precision flags")
    cudnn = torch.backends.cudnn
    saved = (torch.backends.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    yield
    torch.backends.fp32_precision, cudnn.fp32_precision = saved[:2]
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[2:]


@pytest.mark.parametrize("rnn,expected", [("ieee", "ieee"), ("tf32", "tf32")])
def test_precision_from_the_rnn_flag(precision_flags, rnn, expected):
    """cuDNN's conv and rnn flags set apart (torch >= 2.9): the legacy cudnn.allow_tf32 raises, the
    kernels follow cuDNN's RNN flag."""
    torch.backends.cudnn.conv.fp32_precision = "ieee" if rnn == "tf32" else "tf32"
    torch.backends.cudnn.rnn.fp32_precision = rnn
    with pytest.raises(RuntimeError, match="allow_tf32"):
        torch.backends.cudnn.allow_tf32
    assert kernels.fp32_precision() == expected


def test_precision_inherits(precision_flags):
    """"none" defers to cuDNN's flag, then to the generic one."""
    torch.backends.fp32_precision = "tf32"
    torch.backends.cudnn.rnn.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "none"
    assert kernels.fp32_precision() == "tf32"
    torch.backends.cudnn.fp32_precision = "ieee"
    assert kernels.fp32_precision() == "ieee"
    torch.backends.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "none"
    assert kernels.fp32_precision() == "ieee"
    # The interpreter computes in ieee whatever the flags.
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    assert kernels.dot_precision(torch.float32, torch.device("cpu")) == "ieee"


@triton.jit
def _rounded_kernel(x_ptr, y_ptr, N, DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, tf32_rounded(x, DOT_PRECISION), mask=offs < N)


def _nearest_tf32(x):
    """The reference: x rounded to 10 mantissa bits, to the nearest, ties away from zero (fp64 math)."""
    x = x.double()
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    scaled = mantissa * 2.0 ** 11
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (rounded * 2.0 ** (exponent - 11).double()).float()


def test_tf32_rounding():
    """The TF32 dots' operands are rounded to the nearest TF32 (as cuDNN and cuBLAS read them), not
    truncated as Triton's mma would: the host's rounding of W_hh and h0 and the kernels' rounding of
    the exchanged h and gate gradients give the same values, exact ties included."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4093, generator=generator) * torch.logspace(-20, 20, 4093)
    # Exact ties (the 13 dropped bits 0x1000) and the values next to them, both signs.
    ties = (torch.randn(64, generator=generator).view(torch.int32) & ~0x1FFF) | 0x1000
    x = torch.cat([x, ties.view(torch.float32), (ties - 1).view(torch.float32), -ties.view(torch.float32),
                   torch.tensor([0.0, -0.0, 1.0, 3.0e38])])
    expected = _nearest_tf32(x)
    assert torch.equal(kernels.tf32_rounded(x, "tf32"), expected)
    assert kernels.tf32_rounded(x, "ieee") is x
    for precision in ("tf32", "ieee"):
        device_x = x.to(DEVICE)
        y = torch.empty_like(device_x)
        _rounded_kernel[(triton.cdiv(x.numel(), 256),)](device_x, y, x.numel(), DOT_PRECISION=precision, BLOCK=256)
        assert torch.equal(y.cpu(), expected if precision == "tf32" else x), precision
