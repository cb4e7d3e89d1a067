"""Every product of a layer follows cuDNN's RNN fp32 rule, as nn.LSTM's does: the launchers' cuBLAS
products (input projection, dX, weight gradients) run in ``kernels.config.fp32_precision()``, not in
``torch.backends.cuda.matmul``'s, and the user's matmul flag is left as it was.

On the CPU the launchers run with the Triton interpreter, and a dispatch mode records the matmul
flag each of their products sees. The ``gpu`` test compares our error with cuDNN's own under each
setting (``make gpu-check``).
"""
import os
import threading

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton")
from birnn_fast import kernels  # noqa: E402
from birnn_fast.kernels import config as kernels_config  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}
matmul = torch.backends.cuda.matmul


class MatmulPrecisionSeen(TorchDispatchMode):
    """Records torch's CUDA matmul fp32 precision at every matrix product dispatched under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.seen.append(kernels_config._matmul_precision())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def flags():
    """cuDNN's RNN rule and the matmul rule set by the test (new API), restored after."""
    saved = torch.backends.cudnn.rnn.fp32_precision, matmul.fp32_precision
    yield
    torch.backends.cudnn.rnn.fp32_precision, matmul.fp32_precision = saved


def layer_args(cell="LSTM", T=4, B=3, I=5, H=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    G = kernels_config.GATES[cell]

    def randn(*shape):
        return (torch.randn(*shape, generator=generator) * 0.4).to(DEVICE, dtype)

    weights = [randn(G * H, I), randn(G * H, H), randn(G * H), randn(G * H)] * 2
    c0 = randn(2, B, H) if cell == "LSTM" else torch.empty(0, device=DEVICE, dtype=dtype)
    lengths = torch.tensor([T, 1, T - 1][:B], device=DEVICE)
    return randn(T, B, I), weights, randn(2, B, H), c0, lengths


def run_layer(cell="LSTM", proj=False):
    x, weights, h0, c0, lengths = layer_args(cell)
    if proj:
        H, P = 8, 3
        generator = torch.Generator().manual_seed(1)
        hr = [torch.randn(P, H, generator=generator).to(DEVICE) * 0.4 for _ in range(2)]
        weights = weights[:4] + [hr[0]] + weights[4:] + [hr[1]]
        weights[1], weights[6] = weights[1][:, :P].contiguous(), weights[6][:, :P].contiguous()
        h0 = h0[..., :P].contiguous()
    output, h_n, c_n, workspace = kernels.forward_op(cell, x, weights, h0, c0, lengths, True)
    grads = kernels.backward_op(cell, torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), x,
                                weights, h0, c0, lengths, output, workspace)
    return output, grads


@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
@pytest.mark.parametrize("rnn,user", [("tf32", "ieee"), ("ieee", "tf32"), ("tf32", "tf32"), ("ieee", "none")])
def test_launcher_products_follow_cudnn_rnn_rule(rnn, user, proj, flags):
    """Every product of forward and backward sees cuDNN's RNN rule; the user's flag comes back as set."""
    if os.environ.get("TRITON_INTERPRET") != "1" and DEVICE.type == "cpu":
        pytest.skip("the Triton interpreter runs CPU tensors only")
    torch.backends.cudnn.rnn.fp32_precision = rnn
    matmul.fp32_precision = user
    with MatmulPrecisionSeen() as mode:
        run_layer(proj=proj)
    # input projection, dX, dW_ih and dW_hh at least; with projections their products too.
    assert len(mode.seen) >= 4
    assert set(mode.seen) == {rnn}, mode.seen
    assert matmul.fp32_precision == user


def test_legacy_flag_readable_after(flags):
    """A user of the legacy API reads ``allow_tf32`` after a call as before (mixing the two APIs would
    make torch raise on that read)."""
    matmul.allow_tf32 = True
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    run_layer()
    assert matmul.allow_tf32 is True


def test_restored_when_the_layer_raises(flags):
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    matmul.fp32_precision = "ieee"
    x, weights, h0, c0, lengths = layer_args()
    with pytest.raises(ValueError):
        kernels.forward_op("LSTM", x, weights, h0[:, :2], c0, lengths, True)
    assert matmul.fp32_precision == "ieee"


def test_threads_restore_once_the_last_leaves(flags):
    """Launchers in several threads: inside, every one sees the RNN rule; after all leave, the user's."""
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    matmul.fp32_precision = "ieee"
    inside, release = threading.Barrier(3), threading.Event()
    seen = []

    def worker():
        with kernels_config.rnn_gemm_precision():
            inside.wait()
            seen.append(kernels_config._matmul_precision())
            release.wait()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait()
    assert matmul.fp32_precision == "tf32"
    release.set()
    for thread in threads:
        thread.join()
    assert seen == ["tf32", "tf32"]
    assert matmul.fp32_precision == "ieee"


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rnn,user", [("tf32", "ieee"), ("ieee", "tf32")])
def test_error_as_cudnn_under_each_rule(rnn, user, flags):
    """fp32 LSTM, H = 512 (large products): ours and cuDNN's error against fp64, both under the same
    rules. Under ("ieee" RNN, "tf32" matmul) both must be fp32-exact (a TF32 product in ours would show
    at ~1e-4); under ("tf32", "ieee") ours within twice cuDNN's."""
    torch.backends.cudnn.rnn.fp32_precision = rnn
    matmul.fp32_precision = user
    torch.manual_seed(0)
    T, B, H = 64, 32, 512
    reference = torch.nn.LSTM(H, H, bidirectional=True).to(DEVICE, torch.float64)
    layer = torch.nn.LSTM(H, H, bidirectional=True).to(DEVICE)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(T, B, H, device=DEVICE, dtype=torch.float64)
    cotangent = torch.randn(T, B, 2 * H, device=DEVICE, dtype=torch.float64)

    def run(module, ours):
        inputs = x.to(module.weight_hh_l0.dtype).requires_grad_(True)
        weights = [weight.detach() for weight in module._flat_weights]
        if ours:
            h0 = inputs.new_zeros(2, B, H)
            lengths = torch.full((B,), T, device=DEVICE)
            output, _, _, workspace = kernels.forward_op("LSTM", inputs.detach(), weights, h0, h0, lengths, True)
            grads = kernels.backward_op("LSTM", cotangent.float(), h0, h0, inputs.detach(), weights, h0, h0,
                                        lengths, output, workspace)
            return [output, grads[0], *grads[1]]
        output = module(inputs)[0]
        grads = torch.autograd.grad(output, [inputs] + list(module._flat_weights), cotangent.to(output.dtype))
        return [output.detach(), *grads]

    exact = run(reference, False)
    theirs = run(layer, False)
    mine = run(layer, True)
    for index, (a, b, e) in enumerate(zip(mine, theirs, exact)):
        error, cudnn_error = relative_error(a, e), relative_error(b, e)
        bound = 1e-5 if rnn == "ieee" else max(2 * cudnn_error, 1e-5)
        assert error <= bound, (index, error, cudnn_error)
