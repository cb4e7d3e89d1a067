"""The op boundary: the autograd Function whose backward calls our own backward op, and the
functional entry point ``birnn_layer``. The ops' contract and schemas: ``library.py``.
"""
import torch

from . import backends, onnx, reference


class BiRNNFunction(torch.autograd.Function):
    """One bidirectional layer through a compiled backend; backward runs that backend's own BPTT op.

    It takes the 8 parameters of the layer as separate inputs, so that each gets its gradient
    straight from the backward op."""

    @staticmethod
    def forward(ctx, cell, backend, input, h0, c0, lengths, *weights):
        forward_op, ctx.backward_op = backends.implementation(backend, input.device)
        output, h_n, c_n, workspace = forward_op(cell, input, weights, h0, c0, lengths, True)
        ctx.cell = cell
        ctx.save_for_backward(input, h0, c0, lengths, output, workspace, *weights)
        return output, h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        input, h0, c0, lengths, output, workspace, *weights = ctx.saved_tensors
        grad_input, grad_weights, grad_h0, grad_c0 = ctx.backward_op(
            ctx.cell,
            _materialize(grad_output, output),
            _materialize(grad_h_n, h0),
            _materialize(grad_c_n, c0),
            input, weights, h0, c0, lengths, output, workspace,
        )
        return (None, None, grad_input, grad_h0, grad_c0 if ctx.cell == "LSTM" else None, None, *grad_weights)


def _materialize(grad, like):
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def stack_directions(weights):
    """The 8 per-direction parameters (``weights`` of the ops) -> stacked (2, ...) weight_ih,
    weight_hh, bias_ih, bias_hh, forward direction first: the layout of the reference and of the
    Triton kernels."""
    return [torch.stack(weights[kind::4]) for kind in range(4)]


def birnn_layer(cell, input, weights, h0, c0, lengths, backend=None):
    """One bidirectional layer of ``cell`` (see the module docstring for shapes).

    input: (T, B, I); weights: the 8 parameters in nn.LSTM's order (weight_ih, weight_hh, bias_ih,
    bias_hh of the forward direction, then of the reverse one; zeros for absent biases);
    h0: (2, B, H); c0: (2, B, H) for LSTM, else an empty tensor; lengths: (B,) int64.
    Returns output (T, B, 2*H), h_n (2, B, H), c_n (2, B, H) or empty.
    ``backend`` defaults to ``backends.select(input.device, input.dtype)``.
    """
    if onnx.exporting():
        return onnx.birnn_layer(cell, input, weights, h0, c0, lengths)
    if len(weights) != 8:
        raise ValueError(f"birnn_layer: expected the 8 parameters of a bidirectional layer, got {len(weights)}")
    if backend is None:
        backend = backends.select(input.device, input.dtype)
    weights = [weight.contiguous() for weight in weights]
    input, h0, c0 = input.contiguous(), h0.contiguous(), c0.contiguous()
    lengths = lengths.to(input.device, torch.int64)
    if backend == "reference":
        return reference.birnn_layer(cell, input, *stack_directions(weights), h0, c0, lengths)
    needs_grad = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (input, h0, c0, *weights))
    forward_op, _ = backends.implementation(backend, input.device)
    if forward_op is torch.ops.birnn_fast.forward:
        # One op call in every grad mode (its autograd is registered below), so that a jit trace,
        # which replays the call under no_grad to check itself, records the same graph; for the
        # same reason a trace always saves the workspace its backward may need.
        return forward_op(cell, input, weights, h0, c0, lengths, needs_grad or torch.jit.is_tracing())[:3]
    if needs_grad:
        return BiRNNFunction.apply(cell, backend, input, h0, c0, lengths, *weights)
    return forward_op(cell, input, weights, h0, c0, lengths, False)[:3]


def _setup_context(ctx, inputs, output):
    cell, input, weights, h0, c0, lengths, _ = inputs
    ctx.cell = cell
    ctx.save_for_backward(input, h0, c0, lengths, output[0], output[3], *weights)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
    input, h0, c0, lengths, output, workspace, *weights = ctx.saved_tensors
    grad_input, grad_weights, grad_h0, grad_c0 = torch.ops.birnn_fast.backward(
        ctx.cell, _materialize(grad_output, output), _materialize(grad_h_n, h0), _materialize(grad_c_n, c0),
        input, weights, h0, c0, lengths, output, workspace,
    )
    return None, grad_input, grad_weights, grad_h0, grad_c0 if ctx.cell == "LSTM" else None, None, None


torch.library.register_autograd("birnn_fast::forward", _backward, setup_context=_setup_context)
