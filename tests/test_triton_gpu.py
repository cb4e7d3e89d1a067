"""The hardware check of the Triton kernels (``make gpu-check``): every cell at realistic sizes, fp32,
TF32, bf16 and fp16, with lengths, on the multi-program grids the launcher picks, against an fp64
reference, each within 2x torch's own error in the same precision (flash-attention's rule).

Marked ``gpu``: skipped without a CUDA device, except under ``BIRNN_GPU_CHECK=tiny`` (``make
gpu-selftest``), which runs the same tests on the CPU through the Triton interpreter at tiny sizes.
"""
import os

import torch

TINY = os.environ.get("BIRNN_GPU_CHECK") == "tiny"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
from birnn_fast import kernels  # noqa: E402
from birnn_fast.kernels import config as kernels_config  # noqa: E402
from birnn_fast.kernels import forward as kernels_forward  # noqa: E402
from birnn_fast.reference import birnn_layer  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() and not TINY,
                                                  reason="needs a CUDA device (BIRNN_GPU_CHECK=tiny: interpreted)")]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
MODULES = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN, "RNN_RELU": torch.nn.RNN}
# (T, B, I, H): on a GPU several batch blocks and 16 or more programs per direction.
SIZE = (5, 3, 4, 20) if TINY else (64, 48, 128, 256)
# dtype, TF32: the interpreter has neither bf16 dots nor TF32.
PRECISIONS = [("fp32", torch.float32, False), ("fp16", torch.float16, False)]
if not TINY:
    PRECISIONS += [("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)]
# Below these relative errors ours passes whatever torch's own error is.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture
def tf32():
    """TF32 on (cuDNN's RNN flag, which the kernels follow, and torch's matmuls) or off, restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    def use(enabled):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled

    yield use
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_layer(cell, I, H, dtype, seed):
    torch.manual_seed(seed)
    extra = {"nonlinearity": "relu" if cell == "RNN_RELU" else "tanh"} if cell.startswith("RNN") else {}
    return MODULES[cell](I, H, bidirectional=True, **extra).to(DEVICE, dtype)


def make_case(cell, T, B, I, H, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0], lengths[-1] = 1, T
    case = dict(input=torch.randn(T, B, I, generator=generator, dtype=torch.float64),
                h0=torch.randn(2, B, H, generator=generator, dtype=torch.float64),
                c0=torch.randn(2, B, H, generator=generator, dtype=torch.float64) if cell == "LSTM" else None)
    grads = [torch.randn(T, B, 2 * H, generator=generator, dtype=torch.float64),
             torch.randn(2, B, H, generator=generator, dtype=torch.float64),
             torch.randn(2, B, H, generator=generator, dtype=torch.float64)]
    return case, lengths, grads


def ours(cell, layer, case, lengths, grads, dtype, config=None):
    """Our ops in dtype: output, h_n, and the gradients of input, h0, c0 and every weight."""
    weights = [weight.detach().to(dtype) for weight in layer._flat_weights]
    x, h0 = case["input"].to(DEVICE, dtype), case["h0"].to(DEVICE, dtype)
    c0 = case["c0"].to(DEVICE, dtype) if cell == "LSTM" else torch.empty(0, device=DEVICE, dtype=dtype)
    lengths = lengths.to(DEVICE)
    if config is None:
        output, h_n, c_n, workspace = kernels.forward_op(cell, x, weights, h0, c0, lengths, True)
    else:
        stacked = [torch.stack(weights[kind::4]) for kind in range(4)]
        output, h_n, c_n, workspace = kernels_forward.forward(cell, x, *stacked, h0, c0, lengths, config=config)
    grad_c_n = grads[2].to(DEVICE, dtype) if cell == "LSTM" else torch.empty(0, device=DEVICE, dtype=dtype)
    grad_input, grad_weights, grad_h0, grad_c0 = kernels.backward_op(
        cell, grads[0].to(DEVICE, dtype), grads[1].to(DEVICE, dtype), grad_c_n, x, weights, h0, c0, lengths, output,
        workspace)
    return [output, h_n, grad_input, grad_h0] + ([c_n, grad_c0] if cell == "LSTM" else []) + list(grad_weights)


def torch_run(cell, layer, case, lengths, grads, dtype):
    """torch's own layer (cuDNN on a GPU) in dtype on a PackedSequence: the same list as ours."""
    layer = layer.to(dtype)
    x = case["input"].to(DEVICE, dtype).requires_grad_(True)
    h0 = case["h0"].to(DEVICE, dtype).requires_grad_(True)
    state = h0
    leaves = [x, h0]
    if cell == "LSTM":
        c0 = case["c0"].to(DEVICE, dtype).requires_grad_(True)
        state = (h0, c0)
        leaves.append(c0)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    packed_out, final = layer(packed, state)
    output, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out, total_length=x.shape[0])
    outputs = [output, final[0], final[1]] if cell == "LSTM" else [output, final]
    params = list(layer._flat_weights)
    vjp = torch.autograd.grad(outputs, leaves + params, [g.to(DEVICE, dtype) for g in grads[:len(outputs)]])
    grad_input, grad_h0 = vjp[:2]
    extra = [outputs[2].detach(), vjp[2]] if cell == "LSTM" else []
    return [output.detach(), outputs[1].detach(), grad_input, grad_h0] + extra + list(vjp[len(leaves):])


def check(cell, dtype, config=None, size=SIZE, seed=0):
    """Ours and torch's layer in dtype (TF32 as the flags are) against torch's in fp64: every output
    and gradient within twice torch's error, or FLOOR."""
    T, B, I, H = size
    case, lengths, grads = make_case(cell, T, B, I, H, seed)
    layer = make_layer(cell, I, H, torch.float64, seed)
    expected = torch_run(cell, layer, case, lengths, grads, torch.float64)
    reference_low = torch_run(cell, make_layer(cell, I, H, torch.float64, seed), case, lengths, grads, dtype)
    actual = ours(cell, make_layer(cell, I, H, torch.float64, seed), case, lengths, grads, dtype, config)
    failures = []
    for index, (mine, theirs, exact) in enumerate(zip(actual, reference_low, expected)):
        assert mine.shape == exact.shape and mine.dtype == dtype, index
        bound = max(2 * relative_error(theirs, exact), FLOOR[dtype])
        error = relative_error(mine, exact)
        if error > bound:
            failures.append(f"item {index}: {error:.2e} > {bound:.2e}")
    assert not failures, failures


@pytest.mark.parametrize("name,dtype,use_tf32", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_within_twice_torch(cell, name, dtype, use_tf32, tf32):
    """The launcher's own configuration, lengths from 1 to T."""
    tf32(use_tf32)
    check(cell, dtype)


@pytest.mark.skipif(TINY, reason="the interpreter's launch holds a direction in one program")
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_streamed_within_twice_torch(cell, tf32):
    """W_hh streamed from L2 (as where it does not fit in shared memory), bf16."""
    tf32(False)
    T, B, I, H = SIZE
    props = torch.cuda.get_device_properties(DEVICE)
    config = kernels_config.select_config(cell, B, H, torch.bfloat16, "ieee", props.multi_processor_count, 0)
    assert not config.RESIDENT and config.n_hblocks > 1
    check(cell, torch.bfloat16, config)


@pytest.mark.skipif(TINY, reason="realistic sizes only")
@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("tf32", torch.float32)])
def test_lstm_h1024(name, dtype, tf32):
    """The widest resident LSTM (bf16) and TF32 streamed, H = 1024."""
    tf32(name == "tf32")
    check("LSTM", dtype, size=(32, 64, 256, 1024))


def test_projection_within_twice_torch(tf32):
    """LSTM with proj_size, lengths, bf16 on a GPU (fp32 interpreted)."""
    tf32(False)
    dtype = torch.float32 if TINY else torch.bfloat16
    T, B, I, H = SIZE
    P = H // 2
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0] = T
    torch.manual_seed(7)
    layer64 = torch.nn.LSTM(I, H, proj_size=P, bidirectional=True).to(DEVICE, torch.float64)
    x = torch.randn(T, B, I, generator=generator, dtype=torch.float64).to(DEVICE)
    h0 = torch.randn(2, B, P, generator=generator, dtype=torch.float64).to(DEVICE)
    c0 = torch.randn(2, B, H, generator=generator, dtype=torch.float64).to(DEVICE)
    cotangent = torch.randn(T, B, 2 * P, generator=generator, dtype=torch.float64).to(DEVICE)

    def run_torch(dtype):
        layer = torch.nn.LSTM(I, H, proj_size=P, bidirectional=True).to(DEVICE, dtype)
        layer.load_state_dict(layer64.state_dict())
        xs = x.to(dtype).requires_grad_(True)
        packed = torch.nn.utils.rnn.pack_padded_sequence(xs, lengths, enforce_sorted=False)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(layer(packed, (h0.to(dtype), c0.to(dtype)))[0], total_length=T)
        grads = torch.autograd.grad(out, [xs] + list(layer._flat_weights), cotangent.to(dtype))
        return [out.detach()] + list(grads)

    expected, low = run_torch(torch.float64), run_torch(dtype)
    weights = [weight.detach().to(dtype) for weight in layer64._flat_weights]
    output, h_n, c_n, workspace = kernels.forward_op("LSTM", x.to(dtype), weights, h0.to(dtype), c0.to(dtype),
                                                     lengths.to(DEVICE), True)
    grad_input, grad_weights, _, _ = kernels.backward_op(
        "LSTM", cotangent.to(dtype), torch.zeros_like(h_n), torch.zeros_like(c_n), x.to(dtype), weights, h0.to(dtype),
        c0.to(dtype), lengths.to(DEVICE), output, workspace)
    for index, (mine, theirs, exact) in enumerate(zip([output, grad_input] + grad_weights, low, expected)):
        bound = max(2 * relative_error(theirs, exact), FLOOR[dtype])
        assert relative_error(mine, exact) <= bound, index
