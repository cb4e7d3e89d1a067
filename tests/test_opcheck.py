"""torch.library.opcheck on both ops (schema, fake kernel, AOT dispatch, autograd registration), on
CPU, for every cell, with and without requires_grad, with lengths and with projections: through the
kernels registered for CPU (the C++ ones) and through the reference standing in for them."""
import contextlib

import pytest
import torch

from birnn_fast import backends
from birnn_fast.cells import CELLS

from conftest import REFERENCE_KERNELS, cpu_kernels, require

B, I, H, P = 3, 3, 5, 2
LENGTHS = {4: [4, 1, 3], 2: [2, 1, 2]}  # steps -> lengths, each with 1 and T


def weights_of(cell, projections, dtype, requires_grad):
    gates = CELLS[cell].gates
    hidden_out = P if projections else H
    shapes = [(gates * H, I), (gates * H, hidden_out), (gates * H,), (gates * H,)] + ([(P, H)] if projections else [])
    return [torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for shape in shapes * 2]


def forward_args(cell, projections, dtype, requires_grad, save_workspace=True, T=4):
    hidden_out = P if projections else H
    c0 = (torch.randn(2, B, H, dtype=dtype, requires_grad=requires_grad) if CELLS[cell].has_cell_state
          else torch.empty(0, dtype=dtype))
    return (cell, torch.randn(T, B, I, dtype=dtype, requires_grad=requires_grad),
            weights_of(cell, projections, dtype, requires_grad),
            torch.randn(2, B, hidden_out, dtype=dtype, requires_grad=requires_grad), c0,
            torch.tensor(LENGTHS[T]), save_workspace)


def backward_args(cell, projections, dtype, requires_grad, T=4):
    cell, input, weights, h0, c0, lengths, _ = forward_args(cell, projections, dtype, requires_grad, T=T)
    with torch.no_grad():
        output, h_n, c_n, workspace = torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths, True)
    grads = [torch.randn_like(t).requires_grad_(requires_grad) for t in (output, h_n)]
    grads.append(torch.randn_like(c_n).requires_grad_(requires_grad and CELLS[cell].has_cell_state))
    return (cell, *grads, input, weights, h0, c0, lengths, output, workspace)


def cpp_limits(cell, projections, dtype):
    """The C++ kernels' known gaps (the cpu branch closes them), as strict xfails: when one closes,
    the test passes, and the xfail fails until its condition (backends' tables) is updated."""
    if dtype not in backends._DTYPES["cpu"]:
        return pytest.mark.xfail(strict=True, reason=f"the C++ kernels do not take {dtype} yet")
    if projections and not backends._PROJECTIONS["cpu"]:
        return pytest.mark.xfail(strict=True, reason="the C++ kernels do not take projections yet")
    return None


CASES = [(cell, False, torch.float64) for cell in CELLS] + [("LSTM", True, torch.float64)]
CASES += [(cell, False, torch.float32) for cell in ("LSTM", "GRU")] + [("GRU", False, torch.bfloat16)]


def ids(case):
    cell, projections, dtype = case
    return f"{cell}{'-proj' if projections else ''}-{str(dtype)[6:]}"


@pytest.mark.parametrize("kernels", ["cpp", "reference"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_opcheck(request, kernels, requires_grad, op, case):
    cell, projections, dtype = case
    if dtype == torch.bfloat16 and (requires_grad or op == "backward"):
        pytest.skip("opcheck compares gradients exactly; bfloat16 round-offs differ between eager and traced")
    double_backward = op == "backward" and requires_grad
    if double_backward and (kernels == "cpp" or dtype != torch.float64):
        pytest.skip("backward's formula (a recompute through the reference) is the same whatever the kernels and "
                    "dtype; checked once per cell, in float64 (tracing it is the slow part of this file)")
    if kernels == "cpp":
        require("cpu", torch.float64)
        mark = cpp_limits(cell, projections, dtype)
        if mark is not None:
            request.applymarker(mark)
        context = contextlib.nullcontext()
    else:
        context = cpu_kernels(*REFERENCE_KERNELS)
    with context:
        if op == "forward":
            args = forward_args(cell, projections, dtype, requires_grad)
        else:
            # Tracing the double backward unrolls the recompute over time: two steps keep it short.
            args = backward_args(cell, projections, dtype, requires_grad, T=2 if double_backward else 4)
        torch.library.opcheck(getattr(torch.ops.birnn_fast, op).default, args)


def test_opcheck_forward_without_workspace_then_backward():
    """A forward run by hand without save_workspace on inputs that require grad still differentiates:
    its formula runs the forward again, with."""
    require("cpu", torch.float64)
    args = forward_args("LSTM", False, torch.float64, True, save_workspace=False)
    torch.library.opcheck(torch.ops.birnn_fast.forward.default, args)


MASKS = [(False, True, True, True), (True, False, True, True), (False, False, True, False), (True, True, False, False)]


@pytest.mark.parametrize("kernels", ["cpp", "reference"])
@pytest.mark.parametrize("output_mask", MASKS, ids=lambda mask: "".join("1" if m else "0" for m in mask))
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_opcheck_backward_output_mask(kernels, output_mask, cell):
    """backward's output_mask: what it leaves out comes back empty, in eager and traced runs alike."""
    if kernels == "cpp":
        require("cpu", torch.float64)
    with contextlib.nullcontext() if kernels == "cpp" else cpu_kernels(*REFERENCE_KERNELS):
        args = backward_args(cell, False, torch.float64, False) + (list(output_mask),)
        torch.library.opcheck(torch.ops.birnn_fast.backward.default, args)
        grad_input, grad_weights, grad_h0, grad_c0 = torch.ops.birnn_fast.backward(*args)
        full = torch.ops.birnn_fast.backward(*args[:-1])
        for wanted, got, expected in zip(output_mask, (grad_input, grad_weights, grad_h0, grad_c0), full):
            for one, other in zip(*(([got], [expected]) if isinstance(got, torch.Tensor) else (got, expected))):
                if wanted:
                    assert torch.equal(one, other)
                else:
                    assert one.shape == (0,)


def test_opcheck_double_backward_output_mask():
    """The double backward through a masked backward: the gradients left out carry nothing back."""
    args = backward_args("LSTM", False, torch.float64, True, T=2) + ([False, True, True, False],)
    with cpu_kernels(*REFERENCE_KERNELS):
        torch.library.opcheck(torch.ops.birnn_fast.backward.default, args)
