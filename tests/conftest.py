import os

import pytest
import torch

# Triton decides at import time whether kernels are interpreted: without a GPU, the Triton
# backend is tested on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from birnn_fast import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def require(backend, dtype=torch.float64, device=DEVICE):
    """Skip where the backend cannot run here, except that in CI the C++ backend must be built."""
    reason = backends.why_not(backend, device, dtype)
    if reason is None:
        return
    if backend == "cpu" and device.type == "cpu" and os.environ.get("CI"):
        pytest.fail(f"the cpu backend must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every torch.empty (C++ at::empty too) is NaN-filled, so an element a kernel leaves unwritten fails."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def use_backend(monkeypatch):
    def use(backend, dtype=torch.float64):
        require(backend, dtype)
        monkeypatch.setenv("BIRNN_FAST_BACKEND", backend)
    return use


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g} > {TOLERANCE[dtype]:g}"
