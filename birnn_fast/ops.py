"""The op boundary: schemas of the two ops every backend implements, their fake (shape-only)
kernels, and the autograd Function whose backward calls our own backward op.

The contract (all backends; shapes with T steps, B rows, I inputs, H hidden units, G gates):

``birnn_fast::forward(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths,
save_workspace) -> (output, h_n, c_n, workspace)`` runs one bidirectional layer.

- ``cell``: ``"LSTM"`` (G=4, gates i, f, g, o), ``"GRU"`` (G=3, gates r, z, n) or ``"RNN_TANH"`` /
  ``"RNN_RELU"`` (G=1) -- torch's mode names and torch's formulas.
- ``input``: (T, B, I), contiguous; ``weight_ih``: (2, G*H, I); ``weight_hh``: (2, G*H, H);
  ``bias_ih``, ``bias_hh``: (2, G*H), zeros when the layer has no bias. Index 0 of the leading 2
  is the forward direction, 1 the reverse one.
- ``h0``: (2, B, H); ``c0``: (2, B, H) for LSTM, an empty (0,) tensor for the other cells.
- ``lengths``: (B,) int64 on input's device, 1 <= lengths[b] <= T (checked by the module). Row b
  of the forward direction runs t = 0 .. lengths[b]-1; of the reverse direction t = lengths[b]-1
  down to 0 (step s reads time lengths[b]-1-s).
- ``output``: (T, B, 2*H), [..., :H] forward, [..., H:] reverse; exactly 0 where t >= lengths[b].
- ``h_n``, ``c_n``: each row's state after its own last step (c_n empty (0,) for non-LSTM cells).
- ``workspace``: (T, B, 2, W*H) with W = 5 for LSTM, 4 for GRU, 0 for RNN; what it holds is the
  backend's own business (saved activations for its backward). Its dtype is input's, float32 for
  float16/bfloat16 input. Without ``save_workspace`` (inference: no backward will follow) it is an
  empty (0,) tensor and nothing is saved.

``birnn_fast::backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, bias_hh,
h0, c0, lengths, output, workspace) -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih,
grad_bias_hh, grad_h0, grad_c0)`` is its exact vector-Jacobian product; every gradient has the
shape of its primal (grad_c0 is empty for non-LSTM cells). grad_output, grad_h_n, grad_c_n are
always materialised (zeros where autograd had none).

The schemas are defined here, once for every device, rather than in C++: the Triton (CUDA)
implementation is Python, and the package must keep working when the C++ library is not built.
The C++ library registers only its CPU kernels (TORCH_LIBRARY_IMPL).
"""
import torch

from .reference import GATES, WORKSPACE

torch.library.define(
    "birnn_fast::forward",
    "(str cell, Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, "
    "Tensor h0, Tensor c0, Tensor lengths, bool save_workspace) -> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "birnn_fast::backward",
    "(str cell, Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor weight_ih, "
    "Tensor weight_hh, Tensor bias_hh, Tensor h0, Tensor c0, Tensor lengths, Tensor output, "
    "Tensor workspace) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def workspace_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("birnn_fast::forward")
def _forward_fake(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, save_workspace):
    T, B, _ = input.shape
    H = weight_hh.shape[-1]
    output = input.new_empty(T, B, 2 * H)
    workspace_shape = (T, B, 2, WORKSPACE[cell] * H) if save_workspace else (0,)
    workspace = input.new_empty(workspace_shape, dtype=workspace_dtype(input.dtype))
    return output, h0.new_empty(h0.shape), c0.new_empty(c0.shape), workspace


@torch.library.register_fake("birnn_fast::backward")
def _backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, bias_hh, h0, c0,
                   lengths, output, workspace):
    return (input.new_empty(input.shape), weight_ih.new_empty(weight_ih.shape),
            weight_hh.new_empty(weight_hh.shape), bias_hh.new_empty(bias_hh.shape),
            bias_hh.new_empty(bias_hh.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape))


class BiRNNFunction(torch.autograd.Function):
    """One bidirectional layer through a compiled backend; backward runs that backend's own BPTT op.

    It takes the weights per direction, as the modules hold them, and stacks them for the ops
    itself: no stacking nodes in the autograd graph, and the gradients go back as views."""

    @staticmethod
    def forward(ctx, cell, backend, input, h0, c0, lengths, *weights):
        from .backends import implementation

        forward_op, ctx.backward_op = implementation(backend, input.device)
        weight_ih, weight_hh, bias_ih, bias_hh = _stack_directions(weights)
        output, h_n, c_n, workspace = forward_op(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths,
                                                 True)
        ctx.cell = cell
        ctx.save_for_backward(input, weight_ih, weight_hh, bias_hh, h0, c0, lengths, output, workspace)
        return output, h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        input, weight_ih, weight_hh, bias_hh, h0, c0, lengths, output, workspace = ctx.saved_tensors
        grads = ctx.backward_op(
            ctx.cell,
            _materialize(grad_output, output),
            _materialize(grad_h_n, h0),
            _materialize(grad_c_n, c0),
            input, weight_ih, weight_hh, bias_hh, h0, c0, lengths, output, workspace,
        )
        grad_input, grad_weights, grad_h0 = grads[0], grads[1:5], grads[5]
        grad_c0 = grads[6] if ctx.cell == "LSTM" else None
        return (None, None, grad_input, grad_h0, grad_c0, None,
                *(direction for grad in grad_weights for direction in grad.unbind(0)))


def _materialize(grad, like):
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _stack_directions(weights):
    """(w_ih_fwd, w_ih_rev, w_hh_fwd, ..., b_hh_rev) -> the ops' (2, ...) weight_ih, weight_hh, bias_ih, bias_hh."""
    return [torch.stack(weights[i:i + 2]) for i in range(0, 8, 2)]


def birnn_layer(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, backend=None):
    """One bidirectional layer of ``cell`` (see the module docstring for shapes).

    input: (T, B, I); weight_ih: (2, G*H, I); weight_hh: (2, G*H, H); bias_ih, bias_hh: (2, G*H),
    each stacked (forward direction first) or a pair (forward, reverse) of per-direction tensors;
    h0: (2, B, H); c0: (2, B, H) for LSTM, else an empty tensor; lengths: (B,) int64.
    Returns output (T, B, 2*H), h_n (2, B, H), c_n (2, B, H) or empty.
    ``backend`` defaults to ``backends.select(input.device, input.dtype)``.
    """
    from . import backends, reference

    if backend is None:
        backend = backends.select(input.device, input.dtype)
    weights = [direction.contiguous() for weight in (weight_ih, weight_hh, bias_ih, bias_hh)
               for direction in (weight.unbind(0) if isinstance(weight, torch.Tensor) else weight)]
    input, h0, c0 = input.contiguous(), h0.contiguous(), c0.contiguous()
    lengths = lengths.to(input.device, torch.int64)
    if backend == "reference":
        return reference.birnn_layer(cell, input, *_stack_directions(weights), h0, c0, lengths)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (input, h0, c0, *weights)):
        return BiRNNFunction.apply(cell, backend, input, h0, c0, lengths, *weights)
    forward_op, _ = backends.implementation(backend, input.device)
    return forward_op(cell, input, *_stack_directions(weights), h0, c0, lengths, False)[:3]
