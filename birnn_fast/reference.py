"""The plainest masked bidirectional recurrence in pure PyTorch, a loop over time.

It is the oracle of every test and the fallback backend when nothing compiled can run: it takes
the arguments of ``birnn_fast::forward`` (see ``ops.py``) and is differentiated by autograd.
"""
import torch

from .cells import CELLS


def cell_step(cell, gates_x, h, c, weight_hh, bias_hh):
    """One step of ``cell`` from the input projection ``gates_x`` (B, G*H) and state h, c (B, H)."""
    gates_h = h @ weight_hh.t() + bias_hh
    if cell == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
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


def birnn_layer(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths):
    """One bidirectional layer: returns (output (T, B, 2H), h_n (2, B, H), c_n (2, B, H) or (0,))."""
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
        steps = []
        for s in range(T):
            h_new, c_new = cell_step(cell, gates_x[s], h, c, weight_hh[direction], bias_hh[direction])
            h = torch.where(active[s], h_new, h)
            if c is not None:
                c = torch.where(active[s], c_new, c)
            steps.append(torch.where(active[s], h, torch.zeros_like(h)))
        out = torch.stack(steps)
        outputs.append(reverse_padded(out, lengths) if direction == 1 else out)
        h_n.append(h)
        c_n.append(c)
    c_n = torch.stack(c_n) if cell == "LSTM" else input.new_empty(0)
    return torch.cat(outputs, dim=-1), torch.stack(h_n), c_n
