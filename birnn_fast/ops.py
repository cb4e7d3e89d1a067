"""The op boundary: the ops' autograd formulas and autocast rule, registered on the ops with
torch.library (so that autograd, torch.compile, opcheck and every caller of ``torch.ops.birnn_fast``
see them), and the functional entry point ``birnn_layer``. The contract and schemas: ``library.py``.

- forward's formula calls the backward op: each backend's own BPTT kernel, asked (``output_mask``)
  only for the gradients autograd needs.
- backward's formula (the double backward) differentiates the reference through a recompute:
  exact to any order, and slow; it runs only when a graph of the backward is being built
  (``create_graph=True``). It takes forward's ``output`` and ``workspace`` as what the contract
  says they are, functions of the primals, so they get no gradient of their own.
- under ``torch.autocast``, forward is a lower-precision op as torch's fused RNN ops are
  (``mkldnn_rnn_layer`` on CPU, ``_cudnn_rnn`` on CUDA): floating input, weights, h0 and c0 but
  float64 are cast to the autocast dtype, and the outputs come back in it.
"""
import torch

from . import backends, library, onnx, reference
from .cells import cell_of


class _Forward(torch.autograd.Function):
    """forward's autograd formula; the weights come as separate arguments, each to get its gradient."""

    @staticmethod
    def forward(ctx, cell, input, h0, c0, lengths, save_workspace, *weights):
        with torch._C._AutoDispatchBelowAutograd():
            output, h_n, c_n, workspace = torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths,
                                                                       save_workspace)
        ctx.cell = cell
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, h0, c0, lengths, output, workspace, *weights)
        return output, h_n, c_n, workspace

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _):
        input, h0, c0, lengths, output, workspace, *weights = ctx.saved_tensors
        if workspace.dim() != 4:
            # Called without save_workspace (by hand, on inputs that require grad): run it again with.
            with torch._C._AutoDispatchBelowAutograd():
                output, _, _, workspace = torch.ops.birnn_fast.forward(ctx.cell, input, weights, h0, c0, lengths,
                                                                       True)
        # Only what autograd will use: a first layer's input or a frozen layer's weights that need no
        # gradient cost their products nothing.
        needs = ctx.needs_input_grad
        output_mask = [needs[1], any(needs[6:]), needs[2], needs[3] and cell_of(ctx.cell).has_cell_state]
        grad_input, grad_weights, grad_h0, grad_c0 = _backward(
            ctx.cell, _materialize(grad_output, output), _materialize(grad_h_n, h0), _materialize(grad_c_n, c0),
            input, weights, h0, c0, lengths, output, workspace, output_mask,
        )
        grad_input, grad_h0, grad_c0 = (grad if wanted else None for grad, wanted in
                                        zip((grad_input, grad_h0, grad_c0), (needs[1], needs[2], output_mask[3])))
        grad_weights = [grad if wanted else None for grad, wanted in zip(grad_weights, needs[6:])]
        return None, grad_input, grad_h0, grad_c0, None, None, *grad_weights


def _materialize(grad, like):
    return torch.zeros_like(like) if grad is None else grad.contiguous()


class _Backward(torch.autograd.Function):
    """backward's autograd formula (the double backward)."""

    @staticmethod
    def forward(ctx, cell, grad_output, grad_h_n, grad_c_n, input, h0, c0, lengths, output, workspace, output_mask,
                *weights):
        with torch._C._AutoDispatchBelowAutograd():
            grad_input, grad_weights, grad_h0, grad_c0 = torch.ops.birnn_fast.backward(
                cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace, output_mask)
        ctx.cell = cell
        ctx.output_mask = output_mask
        ctx.save_for_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, lengths, *weights)
        return grad_input, grad_h0, grad_c0, *grad_weights

    @staticmethod
    def backward(ctx, grad_grad_input, grad_grad_h0, grad_grad_c0, *grad_grad_weights):
        grad_output, grad_h_n, grad_c_n, input, h0, c0, lengths, *weights = ctx.saved_tensors
        has_cell_state = cell_of(ctx.cell).has_cell_state
        create_graph = torch.is_grad_enabled()

        def leaf(tensor):
            return tensor.view_as(tensor) if create_graph and tensor.requires_grad else tensor.detach().requires_grad_()

        grads = [leaf(grad_output), leaf(grad_h_n)] + ([leaf(grad_c_n)] if has_cell_state else [])
        primals = [leaf(input), leaf(h0)] + [leaf(w) for w in weights] + ([leaf(c0)] if has_cell_state else [])
        with torch.enable_grad():
            grad_input, grad_weights, grad_h0, grad_c0 = reference.vjp(
                ctx.cell, grads, primals[0], primals[2:2 + len(weights)], primals[1],
                primals[-1] if has_cell_state else c0, lengths, create_graph=True)
            mask = ctx.output_mask
            first = [grad_input, grad_h0, *grad_weights] + ([grad_c0] if has_cell_state else [])
            cotangents = [grad_grad_input, grad_grad_h0, *grad_grad_weights] + ([grad_grad_c0] if has_cell_state else [])
            wanted = [mask[0], mask[2]] + [mask[1]] * len(weights) + ([mask[3]] if has_cell_state else [])
            # The outputs the mask left out were empty: nothing flows back through them.
            first, cotangents = ([value for value, keep in zip(values, wanted) if keep]
                                 for values in (first, cotangents))
            second = torch.autograd.grad(first, grads + primals, cotangents, create_graph=create_graph,
                                         allow_unused=True, materialize_grads=True)
        count = len(grads)
        grad_grads, grad_primals = second[:count], second[count:]
        return (None, grad_grads[0], grad_grads[1], grad_grads[2] if has_cell_state else None,
                grad_primals[0], grad_primals[1], grad_primals[-1] if has_cell_state else None,
                None, None, None, None, *grad_primals[2:2 + len(weights)])


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _backward(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace,
              output_mask=(True, True, True, True)):
    output_mask = list(output_mask)
    if _needs_grad(grad_output, grad_h_n, grad_c_n, input, h0, c0, *weights):
        grad_input, grad_h0, grad_c0, *grad_weights = _Backward.apply(
            cell, grad_output, grad_h_n, grad_c_n, input, h0, c0, lengths, output, workspace, output_mask, *weights)
        return grad_input, grad_weights, grad_h0, grad_c0
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.birnn_fast.backward(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0,
                                             lengths, output, workspace, output_mask)


def _forward_autograd(cell, input, weights, h0, c0, lengths, save_workspace):
    if _needs_grad(input, h0, c0, *weights):
        return _Forward.apply(cell, input, h0, c0, lengths, save_workspace, *weights)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths, save_workspace)


# Registered by hand rather than with torch.library.register_autograd, whose generic wrapper
# (pytree over the weight list, per-call metadata) costs several times the kernels of a small layer.
torch.library.impl(library.FORWARD, "Autograd", _forward_autograd)
torch.library.impl(library.BACKWARD, "Autograd", _backward)
# Batched gradients (gradcheck's check_batched_grad vmaps the backward with torch's legacy vmap,
# whose generic fallback cannot take the ops' tensor lists): the reference's backward, a VJP by
# autograd, runs on the batched cotangents through the batching rules of torch's own ops.
torch.library.impl(library.BACKWARD, "Batched", reference.backward_op)


def _autocast(device_type, input, weights, h0, c0):
    """input, weights, h0, c0 in the autocast dtype of ``device_type`` when autocast is on there
    and input is of a dtype it casts (floating, not float64); unchanged otherwise."""
    if not (torch.is_autocast_enabled(device_type) and input.is_floating_point() and input.dtype != torch.float64):
        return input, weights, h0, c0
    dtype = torch.get_autocast_dtype(device_type)

    def cast(tensor):
        eligible = tensor.is_floating_point() and tensor.dtype != torch.float64 and tensor.device.type == device_type
        return tensor.to(dtype) if eligible else tensor

    return cast(input), [cast(weight) for weight in weights], cast(h0), cast(c0)


def _autocast_kernel(device_type):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autocast" + device_type.upper()))

    def forward(cell, input, weights, h0, c0, lengths, save_workspace):
        input, weights, h0, c0 = _autocast(device_type, input, weights, h0, c0)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths, save_workspace)

    return forward


for _device_type in ("cpu", "cuda"):
    torch.library.impl(library.FORWARD, "Autocast" + _device_type.upper(), _autocast_kernel(_device_type))


def birnn_layer(cell, input, weights, h0, c0, lengths, backend=None):
    """One bidirectional layer of ``cell`` (``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ``"RNN_RELU"``).

    input: (T, B, I); weights: the layer's 8 parameters in nn.LSTM's order (weight_ih, weight_hh,
    bias_ih, bias_hh of the forward direction, then of the reverse one; zeros for absent biases),
    or 10 for an LSTM with projections (weight_hr (P, H) after each direction's four);
    h0: (2, B, P) (P = proj_size, else H); c0: (2, B, H) for LSTM, else an empty tensor;
    lengths: (B,) integers in [1, T].
    Returns output (T, B, 2*P), h_n (2, B, P), c_n (2, B, H) (empty but for LSTM), in the
    autocast dtype under torch.autocast.
    ``backend`` defaults to ``backends.select(input.device, input.dtype, projections)``.
    """
    if len(weights) not in (8, 10):
        raise ValueError(f"birnn_layer: expected the 8 (or, with projections, 10) parameters of a "
                         f"bidirectional layer, got {len(weights)}")
    if input.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if onnx.exporting():
        return onnx.birnn_layer(cell, input, weights, h0, c0, lengths)
    if input.device.type == "meta":
        # Shapes only, as nn.LSTM on the meta device: the ops' fake kernels are their Meta kernels.
        return torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths.to("meta", torch.int64),
                                            False)[:3]
    input, weights, h0, c0 = _autocast(input.device.type, input, weights, h0, c0)
    if backend is None:
        backend = backends.select(input.device, input.dtype, len(weights) == 10)
    lengths = lengths.to(input.device, torch.int64)
    if backend == "reference" or (input.shape[1] == 0 and backend != "cpu"):
        # No rows: the C++ kernels take B = 0; the Triton ones are not known to.
        return reference.layer(cell, input, weights, h0, c0, lengths)
    weights = [weight.contiguous() for weight in weights]
    input, h0, c0 = input.contiguous(), h0.contiguous(), c0.contiguous()
    # A jit trace replays the call under no_grad to check itself, and a traced module may later
    # be used for backward: while tracing, the workspace is always saved, so both records agree.
    save_workspace = _needs_grad(input, h0, c0, *weights) or torch.jit.is_tracing()
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # Tracers see the op, opaque, with its fake and its registered formula.
        return torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths, save_workspace)[:3]
    # Eager: what the op's Autograd kernel would do, without the round trip through it.
    if save_workspace:
        return _Forward.apply(cell, input, h0, c0, lengths, True, *weights)[:3]
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.birnn_fast.forward(cell, input, weights, h0, c0, lengths, False)[:3]
