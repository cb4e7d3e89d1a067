"""The plainest masked bidirectional recurrence in pure PyTorch, a loop over time.

It is the oracle of every test and the fallback backend when nothing compiled can run, and it is
differentiated by autograd to any order: the ops' double backward recomputes through it.
``birnn_layer`` takes the weights stacked per kind (2, ...), ``forward_op`` / ``backward_op`` the
arguments of ``birnn_fast::forward`` / ``birnn_fast::backward`` (see ``library.py``).
"""
import contextlib

import torch

from . import library
from .cells import CELLS, cell_of


def cell_step(cell, gates_x, h, c, weight_hh, bias_hh, weight_hr=None):
    """One step of ``cell`` from the input projection ``gates_x`` (B, G*H) and state h (B, P),
    c (B, H); an LSTM with projections maps its hidden state through ``weight_hr`` (P, H)."""
    gates_h = torch.addmm(bias_hh, h, weight_hh.t())
    if cell == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if weight_hr is None else h @ weight_hr.t()), c
    if cell == "GRU":
        x_r, x_z, x_n = gates_x.chunk(3, dim=-1)
        h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, c
    if cell == "RNN_TANH":
        return torch.tanh(gates_x + gates_h), c
    if cell == "RNN_RELU":
        return torch.relu(gates_x + gates_h), c
    raise ValueError(f"unknown cell {cell!r}; expected one of {sorted(CELLS)}")


def reverse_padded(x, lengths):
    """Reverse the first lengths[b] steps of every row b of x (T, B, ...); padding stays put."""
    T = x.shape[0]
    t = torch.arange(T, device=x.device)[:, None]
    lengths = lengths.to(x.device)[None, :]
    index = torch.where(t < lengths, lengths - 1 - t, t)  # [T, B]
    return x.gather(0, index.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x))


def birnn_layer(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, weight_hr=None):
    """One bidirectional layer.

    input: (T, B, I); weight_ih (2, G*H, I), weight_hh (2, G*H, P), bias_ih, bias_hh (2, G*H),
    weight_hr (2, P, H) or None (P = H); h0: (2, B, P); c0: (2, B, H) for LSTM, else (0,);
    lengths: (B,). Returns (output (T, B, 2P), h_n (2, B, P), c_n (2, B, H) or (0,)).
    """
    T = input.shape[0]
    lengths = lengths.to(input.device)
    active = torch.arange(T, device=input.device)[:, None, None] < lengths[None, :, None]  # [T, B, 1]
    outputs, h_n, c_n = [], [], []
    for direction in (0, 1):
        gates_x = input @ weight_ih[direction].t() + bias_ih[direction]
        if direction == 1:
            gates_x = reverse_padded(gates_x, lengths)
        h = h0[direction]
        c = c0[direction] if cell == "LSTM" else None
        projection = None if weight_hr is None else weight_hr[direction]
        steps = []
        for s in range(T):
            h_new, c_new = cell_step(cell, gates_x[s], h, c, weight_hh[direction], bias_hh[direction], projection)
            h = torch.where(active[s], h_new, h)
            if c is not None:
                c = torch.where(active[s], c_new, c)
            steps.append(torch.where(active[s], h, 0.0))
        out = torch.stack(steps)
        outputs.append(reverse_padded(out, lengths) if direction == 1 else out)
        h_n.append(h)
        c_n.append(c)
    c_n = torch.stack(c_n) if cell == "LSTM" else input.new_empty(0)
    return torch.cat(outputs, dim=-1), torch.stack(h_n), c_n


def stack_directions(weights):
    """The ops' per-direction ``weights`` (8, or 10 with projections) -> the kinds stacked (2, ...):
    weight_ih, weight_hh, bias_ih, bias_hh, weight_hr (None without projections)."""
    per_direction = len(weights) // 2
    stacked = [torch.stack([weights[kind], weights[per_direction + kind]]) for kind in range(per_direction)]
    return stacked if per_direction == 5 else stacked + [None]


def layer(cell, input, weights, h0, c0, lengths):
    """``birnn_layer`` on the ops' arguments: (output, h_n, c_n)."""
    weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = stack_directions(weights)
    return birnn_layer(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, weight_hr)


def forward_op(cell, input, weights, h0, c0, lengths, save_workspace):
    """``birnn_fast::forward``. ``backward_op`` recomputes what it needs, so the workspace holds zeros."""
    output, h_n, c_n = layer(cell, input, weights, h0, c0, lengths)
    hidden = weights[1].shape[0] // cell_of(cell).gates
    shape = (input.shape[0], input.shape[1], 2, cell_of(cell).saved * hidden) if save_workspace else (0,)
    dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    return output, h_n, c_n, input.new_zeros(shape, dtype=dtype)


def vjp(cell, grads, input, weights, h0, c0, lengths, create_graph=False):
    """The vector-Jacobian product of ``layer`` at (input, weights, h0, c0) for ``grads`` =
    (grad_output, grad_h_n, grad_c_n), by autograd through a recompute: (grad_input,
    grad_weights, grad_h0, grad_c0). With ``create_graph`` the result is differentiable in the
    primals and in ``grads`` (those that require grad); it is detached otherwise."""
    has_cell_state = cell_of(cell).has_cell_state

    def leaf(tensor):
        # A view of its own for every argument, even one tensor passed twice (h0 as c0): autograd.grad
        # then gives each the gradient through its own use only.
        return tensor.view_as(tensor) if create_graph and tensor.requires_grad else tensor.detach().requires_grad_()

    primals = [leaf(tensor) for tensor in (input, h0, *weights)] + ([leaf(c0)] if has_cell_state else [])
    with torch.enable_grad():
        outputs = layer(cell, primals[0], primals[2:2 + len(weights)], primals[1],
                        primals[-1] if has_cell_state else c0, lengths)
        count = 3 if has_cell_state else 2
        result = torch.autograd.grad(outputs[:count], primals, grads[:count], create_graph=create_graph,
                                     allow_unused=True, materialize_grads=True)
    grad_input, grad_h0, grad_weights = result[0], result[1], list(result[2:2 + len(weights)])
    grad_c0 = result[-1] if has_cell_state else torch.zeros_like(c0)
    return grad_input, grad_weights, grad_h0, grad_c0


def backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace,
                output_mask=(True, True, True, True)):
    """``birnn_fast::backward``, by autograd through a recompute (``output`` and ``workspace`` unused);
    every gradient is computed, those ``output_mask`` does not ask for are then dropped."""
    with _autograd_dispatch():
        grads = vjp(cell, (grad_output, grad_h_n, grad_c_n), input, weights, h0, c0, lengths)
    # Autograd may hand back views of grad_output; an op's outputs are its own, contiguous tensors.
    grad_input, grad_weights, grad_h0, grad_c0 = (
        [own(grad) for grad in result] if isinstance(result, list) else own(result) for result in grads)
    return library.masked(output_mask, grad_input, grad_weights, grad_h0, grad_c0)


def own(tensor):
    return tensor.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _autograd_dispatch():
    """Autograd back on inside an op's kernel, which the dispatcher runs with autograd's dispatch
    keys excluded (there even enable_grad records nothing)."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
            torch._C.DispatchKey.AutogradNestedTensor)
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        yield
