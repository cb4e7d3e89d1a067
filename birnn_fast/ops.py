"""The op boundary: schemas of the two ops every backend implements, their fake (shape-only)
kernels, and the autograd Function whose backward calls our own backward op.

The contract (all backends; shapes with T steps, B rows, I inputs, H hidden units, G gates):

``birnn_fast::forward(cell, input, weights, h0, c0, lengths, save_workspace) -> (output, h_n, c_n,
workspace)`` runs one bidirectional layer.

- ``cell``: ``"LSTM"`` (G=4, gates i, f, g, o), ``"GRU"`` (G=3, gates r, z, n) or ``"RNN_TANH"`` /
  ``"RNN_RELU"`` (G=1) -- torch's mode names and torch's formulas.
- ``input``: (T, B, I), contiguous.
- ``weights``: the layer's 8 parameters in nn.LSTM's ``_flat_weights`` order, forward direction
  first: weight_ih (G*H, I), weight_hh (G*H, H), bias_ih (G*H), bias_hh (G*H), then the same four
  of the reverse direction; contiguous; zeros for the biases of a layer without bias. The
  parameters go in as they are: nothing is stacked or copied per call.
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

``birnn_fast::backward(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output,
workspace) -> (grad_input, grad_weights, grad_h0, grad_c0)`` is its exact vector-Jacobian product;
``grad_weights`` is a list of 8 in the order of ``weights``, and every gradient has the shape of its
primal (grad_c0 is empty for non-LSTM cells). grad_output, grad_h_n, grad_c_n are always
materialised (zeros where autograd had none).

The schemas are defined here, once for every device, rather than in C++: the Triton (CUDA)
implementation is Python, and the package must keep working when the C++ library is not built.
The C++ library registers only its CPU kernels (TORCH_LIBRARY_IMPL).
"""
import torch

from . import backends, reference
from .reference import WORKSPACE

torch.library.define(
    "birnn_fast::forward",
    "(str cell, Tensor input, Tensor[] weights, Tensor h0, Tensor c0, Tensor lengths, bool save_workspace) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "birnn_fast::backward",
    "(str cell, Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor[] weights, "
    "Tensor h0, Tensor c0, Tensor lengths, Tensor output, Tensor workspace) -> (Tensor, Tensor[], Tensor, Tensor)",
)


def workspace_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("birnn_fast::forward")
def _forward_fake(cell, input, weights, h0, c0, lengths, save_workspace):
    T, B, _ = input.shape
    H = weights[1].shape[-1]
    output = input.new_empty(T, B, 2 * H)
    workspace_shape = (T, B, 2, WORKSPACE[cell] * H) if save_workspace else (0,)
    workspace = input.new_empty(workspace_shape, dtype=workspace_dtype(input.dtype))
    return output, h0.new_empty(h0.shape), c0.new_empty(c0.shape), workspace


@torch.library.register_fake("birnn_fast::backward")
def _backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace):
    return (input.new_empty(input.shape), [weight.new_empty(weight.shape) for weight in weights],
            h0.new_empty(h0.shape), c0.new_empty(c0.shape))


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
    if len(weights) != 8:
        raise ValueError(f"birnn_layer: expected the 8 parameters of a bidirectional layer, got {len(weights)}")
    if backend is None:
        backend = backends.select(input.device, input.dtype)
    weights = [weight.contiguous() for weight in weights]
    input, h0, c0 = input.contiguous(), h0.contiguous(), c0.contiguous()
    lengths = lengths.to(input.device, torch.int64)
    if backend == "reference":
        return reference.birnn_layer(cell, input, *stack_directions(weights), h0, c0, lengths)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (input, h0, c0, *weights)):
        return BiRNNFunction.apply(cell, backend, input, h0, c0, lengths, *weights)
    forward_op, _ = backends.implementation(backend, input.device)
    return forward_op(cell, input, weights, h0, c0, lengths, False)[:3]
