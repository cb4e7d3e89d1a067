"""The op library: the schemas of the two ops every backend implements, and their fake (shape-only)
kernels. A leaf: it imports only the cells table. Backends register their kernels under these
schemas when their module is imported (``birnn_fast._C`` for CPU, ``birnn_fast.kernels`` for CUDA).

The contract (every backend; T steps, B rows, I inputs, H hidden units, G gates, P = proj_size or H):

``birnn_fast::forward(cell, input, weights, h0, c0, lengths, save_workspace) -> (output, h_n, c_n,
workspace)`` runs one bidirectional layer.

- ``cell``: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"`` (``cells.CELLS``), torch's mode
  names, gate orders and formulas.
- ``input``: (T, B, I), T >= 1, B >= 0.
- ``weights``: the layer's parameters in nn.LSTM's ``_flat_weights`` order, forward direction first:
  per direction weight_ih (G*H, I), weight_hh (G*H, P), bias_ih (G*H), bias_hh (G*H), and for an
  LSTM with projections weight_hr (P, H): 8 or 10 tensors. Zeros stand in for the biases of a layer
  without bias. H = weight_hh.size(0) / G and P = weight_hh.size(1).
- ``h0``: (2, B, P); ``c0``: (2, B, H) for LSTM, an empty (0,) tensor for the other cells.
- input, weights, h0 and c0 share one floating dtype and device.
- ``lengths``: (B,) int64, 1 <= lengths[b] <= T. Row b of the forward direction runs
  t = 0 .. lengths[b]-1; of the reverse direction t = lengths[b]-1 down to 0.
- ``output``: (T, B, 2*P), [..., :P] forward, [..., P:] reverse; exactly 0 where t >= lengths[b].
- ``h_n`` (2, B, P), ``c_n`` (2, B, H) (empty (0,) for non-LSTM cells): each row's state after its
  own last step.
- ``workspace``: with ``save_workspace``, (T, B, 2, W*H) with W = ``cells.CELLS[cell].saved``, of
  dtype float32 for float16 / bfloat16 input, else input's; what it holds is the backend's own
  business (saved activations for its backward), but every element is a deterministic function of
  the inputs (what a backend does not use is 0), so that eager and traced runs agree. Without
  ``save_workspace`` (no backward will follow) it is an empty (0,) tensor.

``birnn_fast::backward(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths,
output, workspace, output_mask=[True, True, True, True]) -> (grad_input, grad_weights, grad_h0,
grad_c0)`` is the exact vector-Jacobian product of forward (as a function of input, weights, h0, c0),
given forward's own output and workspace. ``grad_weights`` is a list in the order of ``weights``;
every gradient has the shape and dtype of its primal (grad_c0 is empty for non-LSTM cells).
grad_output, grad_h_n and grad_c_n are always materialised (zeros where autograd had none).
``output_mask`` says which of (grad_input, grad_weights, grad_h0, grad_c0) the caller needs, as in
torch's ``_cudnn_rnn_backward``: one not asked for comes back as an empty (0,) tensor (grad_weights:
one per weight), and a backend may skip its work (the CPU one skips the products of grad_input, a
sixth of a training step's, for a first layer whose input needs no gradient, and those of the
weight gradients for a frozen layer).

The schemas live here, in Python, rather than in C++: the Triton (CUDA) implementation is Python,
and the package must keep working when the C++ library is not built.
"""
import torch

from .cells import cell_of

NAMESPACE = "birnn_fast"
FORWARD = f"{NAMESPACE}::forward"
BACKWARD = f"{NAMESPACE}::backward"

torch.library.define(
    FORWARD,
    "(str cell, Tensor input, Tensor[] weights, Tensor h0, Tensor c0, Tensor lengths, bool save_workspace) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    BACKWARD,
    "(str cell, Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor[] weights, "
    "Tensor h0, Tensor c0, Tensor lengths, Tensor output, Tensor workspace, "
    "bool[4] output_mask=[True, True, True, True]) -> (Tensor, Tensor[], Tensor, Tensor)",
)


def workspace_dtype(dtype):
    """The workspace's dtype for input of ``dtype``: half precisions save in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sizes(cell, weights):
    """(G, H, P) of a layer from its ``weights`` (see the contract above)."""
    gates = cell_of(cell).gates
    weight_hh = weights[1]
    return gates, weight_hh.shape[0] // gates, weight_hh.shape[1]


def workspace_shape(cell, steps, batch, hidden):
    return (steps, batch, 2, cell_of(cell).saved * hidden)


def _check_devices(input, named):
    """One device for all: a tensor on another (the meta device above all, whose kernels are these
    fake ones) would otherwise pick this kernel for CPU tensors, and its uninitialised outputs."""
    for name, tensor in named:
        if tensor.device != input.device:
            raise RuntimeError(f"birnn_fast: expected {name} on {input.device} (input's device), got {tensor.device}")


@torch.library.register_fake(FORWARD)
def _forward_fake(cell, input, weights, h0, c0, lengths, save_workspace):
    _check_devices(input, [(f"weights[{k}]", weight) for k, weight in enumerate(weights)] + [("h0", h0), ("c0", c0)])
    T, B, _ = input.shape
    _, H, P = sizes(cell, weights)
    output = input.new_empty(T, B, 2 * P)
    shape = workspace_shape(cell, T, B, H) if save_workspace else (0,)
    workspace = input.new_empty(shape, dtype=workspace_dtype(input.dtype))
    return output, h0.new_empty(h0.shape), c0.new_empty(c0.shape), workspace


def masked(output_mask, grad_input, grad_weights, grad_h0, grad_c0):
    """The backward's results with those ``output_mask`` does not ask for replaced by empty (0,) tensors."""
    if len(output_mask) != 4:
        # The message the C++ kernels' argument parsing gives.
        raise RuntimeError(f"Tried to convert a List with {len(output_mask)} elements to a fixed-size array of size 4")

    def keep(wanted, grad):
        return grad if wanted else grad.new_empty(0)

    return (keep(output_mask[0], grad_input), [keep(output_mask[1], grad) for grad in grad_weights],
            keep(output_mask[2], grad_h0), keep(output_mask[3], grad_c0))


@torch.library.register_fake(BACKWARD)
def _backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace,
                   output_mask=(True, True, True, True)):
    _check_devices(input, [(f"weights[{k}]", weight) for k, weight in enumerate(weights)] + [
        ("h0", h0), ("c0", c0), ("grad_output", grad_output), ("grad_h_n", grad_h_n), ("grad_c_n", grad_c_n),
        ("output", output), ("workspace", workspace)])
    return masked(output_mask, input.new_empty(input.shape), [weight.new_empty(weight.shape) for weight in weights],
                  h0.new_empty(h0.shape), c0.new_empty(c0.shape))
