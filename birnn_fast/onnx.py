"""ONNX export: while ``torch.onnx.export`` (the dynamo exporter) traces a model, every bidirectional
layer becomes one of ONNX's own ``LSTM`` / ``GRU`` / ``RNN`` operators with
``direction="bidirectional"``, instead of the ``birnn_fast::forward`` op that no ONNX runtime knows.

The layer is emitted from the traced forward itself with ``torch.onnx.ops.symbolic_multi_out``
(torch's public API for exactly this), so a plain ``torch.onnx.export(model, (x,))`` needs nothing
from the user: ``ops.birnn_layer`` asks ``exporting()`` and hands the layer here. The weights are
regrouped into ONNX's layout by ordinary tensor ops on the parameters, which the exporter's
optimiser folds into the initializers (up to its size limit; ONNX Runtime folds the rest when it
loads the model).

An LSTM with projections (10 weights) cannot be ONNX's LSTM: the projected state h_t = W_hr
(o * tanh c_t) is what the next step multiplies by R, so the projection sits inside the recurrence
and no MatMul after the operator reproduces it. It is exported as an ONNX ``Scan`` per direction
whose body is the LSTM step with its projection, through torch's ``scan`` higher-order op.

ONNX's layout of one layer (num_directions = 2, forward first, as ours):
W (2, G*H, I), R (2, G*H, H), B (2, 2*G*H) = [Wb, Rb], sequence_lens (B,) int32,
initial_h (2, B, H), initial_c (2, B, H); Y (T, 2, B, H), Y_h (2, B, H), Y_c (2, B, H).
"""
import torch
import torch.onnx.ops  # at import, not inside a traced call: exporting() runs in every forward
from torch._higher_order_ops.scan import scan

from .cells import cell_of
from .library import sizes

# ONNX's gate order, written in torch's gate names (cells.CELLS): LSTM i, o, f, c(= torch's g);
# GRU z, r, h (= torch's n). ONNX's GRU with linear_before_reset=1 is torch's formula
# n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
_ONNX_GATES = {"LSTM": ("i", "o", "f", "g"), "GRU": ("z", "r", "n"), "RNN_TANH": ("h",), "RNN_RELU": ("h",)}
_ONNX_OPS = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
_ACTIVATIONS = {"RNN_TANH": "Tanh", "RNN_RELU": "Relu"}


def exporting():
    """True while the dynamo ONNX exporter traces the model (not under the TorchScript exporter,
    whose jit trace cannot hold the symbolic op)."""
    return torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing()


def _onnx_gate_order(cell, tensor):
    """Rows of ``tensor`` (G*H, ...) regrouped from torch's gate order into ONNX's."""
    names = cell_of(cell).gate_names
    if len(names) == 1:
        return tensor
    # Slices, not chunk: the exporter's optimiser folds Slice and Concat of an initializer, not Split.
    rows = tensor.shape[0] // len(names)
    return torch.cat([tensor[names.index(name) * rows:(names.index(name) + 1) * rows] for name in _ONNX_GATES[cell]])


def birnn_layer(cell, input, weights, h0, c0, lengths):
    """One bidirectional layer as one ONNX operator; the arguments and results of
    ``birnn_fast::forward`` without the workspace (see library.py).

    input: (T, B, I); weights: the 8 (10 for an LSTM with projections) parameters in nn.LSTM's
    order; h0: (2, B, P); c0: (2, B, H) for LSTM, else empty; lengths: (B,) int64.
    Returns output (T, B, 2P), h_n (2, B, P), c_n (2, B, H) or empty; P = proj_size or H.
    """
    if len(weights) == 10:
        return _projected_lstm(input, weights, h0, c0, lengths)
    _, hidden, _ = sizes(cell, weights)
    directions = (weights[:4], weights[4:])
    W = torch.stack([_onnx_gate_order(cell, weight_ih) for weight_ih, _, _, _ in directions])
    R = torch.stack([_onnx_gate_order(cell, weight_hh) for _, weight_hh, _, _ in directions])
    B = torch.stack([torch.cat([_onnx_gate_order(cell, bias_ih), _onnx_gate_order(cell, bias_hh)])
                     for _, _, bias_ih, bias_hh in directions])
    inputs = [input, W, R, B, lengths.to(torch.int32), h0]
    attributes = {"direction": "bidirectional", "hidden_size": hidden}
    steps, batch = input.shape[0], input.shape[1]
    shapes = [(steps, 2, batch, hidden), (2, batch, hidden)]
    if cell == "LSTM":
        inputs.append(c0)
        shapes.append((2, batch, hidden))
    elif cell == "GRU":
        attributes["linear_before_reset"] = 1
    else:
        attributes["activations"] = [_ACTIVATIONS[cell]] * 2
    outputs = torch.onnx.ops.symbolic_multi_out(
        _ONNX_OPS[cell], inputs, attributes, dtypes=[input.dtype] * len(shapes), shapes=shapes)
    # Y (T, 2, B, H) -> (T, B, 2H), forward direction first as ours.
    output = outputs[0].transpose(1, 2).flatten(2)
    c_n = outputs[2] if cell == "LSTM" else input.new_empty(0)
    return output, outputs[1], c_n


def _projected_lstm(input, weights, h0, c0, lengths):
    """An LSTM layer with projections (weight_hr (P, H) after each direction's four weights) as one
    ONNX Scan per direction. A row's reverse direction starts at its own last step because the
    state stays h0 / c0 through the padded steps, which the reversed scan visits first."""
    steps = input.shape[0]
    active = (torch.arange(steps, device=input.device)[:, None] < lengths[None, :])[..., None]  # [T, B, 1]
    outputs, h_n, c_n = [], [], []
    for direction in (0, 1):
        weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = weights[5 * direction:5 * direction + 5]
        gates_x = input @ weight_ih.t() + (bias_ih + bias_hh)  # [T, B, 4H]: one MatMul for all steps

        def step(carry, xs, weight_hh=weight_hh, weight_hr=weight_hr):
            h, c = carry
            gates, valid = xs
            i, f, g, o = (gates + h @ weight_hh.t()).chunk(4, dim=-1)
            c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_next = (torch.sigmoid(o) * torch.tanh(c_next)) @ weight_hr.t()
            h, c = torch.where(valid, h_next, h), torch.where(valid, c_next, c)
            return (h, c), torch.where(valid, h, torch.zeros_like(h))

        (h, c), output = scan(step, (h0[direction], c0[direction]), (gates_x, active), reverse=direction == 1)
        outputs.append(output)
        h_n.append(h)
        c_n.append(c)
    return torch.cat(outputs, dim=-1), torch.stack(h_n), torch.stack(c_n)
