import contextlib
import os
import re
import warnings

import pytest
import torch

# Triton decides at import time whether kernels are interpreted: without a GPU, the Triton
# backend is tested on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from birnn_fast import backends, library, reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


# The existing tests `make test-wheel` also runs against the installed wheel (marker "wheel", beside
# tests/test_wheel.py): every public path once on each backend, the interpreted Triton ones (slow)
# at their smallest.
WHEEL_TESTS = re.compile("|".join([
    r"test_modules\.py::test_matches_torch\[(.*-(cpu|reference)|1-True-False-dtype0-.*-triton)\]",
    r"test_modules\.py::test_lengths_match_packed_sequence\[.*(cpu|reference|False-LSTM-triton)\]",
    r"test_modules\.py::test_inference_without_grad_matches_torch\[.*(cpu|reference|LSTM-triton)\]",
    r"test_modules\.py::test_projections_match_torch\[.*(cpu|reference)\]",
    r"test_modules\.py::test_empty_batch_as_torch\[False-",
    r"test_compile\.py::test_lstm_aot_eager\[1-hx-lengths\]",
]))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if WHEEL_TESTS.search(item.nodeid):
            item.add_marker(pytest.mark.wheel)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def unfrozen_backend_flags():
    """Importing torch.testing._internal.common_utils (test_module_info does) freezes torch.backends'
    flags for the whole process (disable_global_flags); other tests set them, as users do."""
    with getattr(torch.backends, "__allow_nonbracketed_mutation")():
        yield


def interpreted_triton(dtype):
    """The Triton kernels module for CPU tensors through the interpreter, or a pytest skip."""
    if DEVICE.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter runs CPU tensors only, without a GPU")
    if dtype not in backends._DTYPES["triton"]:
        pytest.skip(f"the triton backend does not take {dtype}")
    try:
        from birnn_fast import kernels
    except ImportError as error:
        pytest.skip(f"Triton kernels are unavailable: {error}")
    return kernels


@contextlib.contextmanager
def cpu_kernels(forward, backward):
    """The ops' CPU kernels replaced by ``forward`` / ``backward`` (functions with the ops'
    signatures) for the duration; the dispatcher restores the registered ones after."""
    lib = torch.library.Library(library.NAMESPACE, "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Warning only once for all operators")
            lib.impl("forward", forward, "CPU")
            lib.impl("backward", backward, "CPU")
        yield
    finally:
        lib._destroy()


REFERENCE_KERNELS = (reference.forward_op, reference.backward_op)


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
    """use(backend, dtype) forces a backend for the test. "triton" without a GPU runs the Triton
    kernels through the interpreter on CPU tensors, as the ops' CPU kernels in the C++ ones' place."""
    with contextlib.ExitStack() as stack:
        def use(backend, dtype=torch.float64):
            if backend == "triton" and DEVICE.type == "cpu":
                kernels = interpreted_triton(dtype)
                stack.enter_context(cpu_kernels(kernels.forward_op, kernels.backward_op))
                monkeypatch.setitem(backends._load_errors, "cpu", None)
                monkeypatch.setitem(backends._DTYPES, "cpu", backends._DTYPES["triton"])
                monkeypatch.setattr(backends, "_selected", {})
                backend = "cpu"
            require(backend, dtype)
            monkeypatch.setenv("BIRNN_FAST_BACKEND", backend)
        yield use


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g} > {TOLERANCE[dtype]:g}"
