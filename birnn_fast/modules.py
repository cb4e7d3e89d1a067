"""Drop-in replacements for ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with ``bidirectional=True``.

They subclass ``nn.RNNBase``, so parameter names, shapes, initialisation, argument checks and
error messages are torch's own, and ``load_state_dict`` works both ways. What they add is
``forward(input, hx=None, lengths=None)``: padded batches with per-row lengths, no PackedSequence
needed, run by the fused kernels of ``birnn_fast.ops``.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import birnn_layer
from .cells import CELLS


def _check_lengths(lengths, steps, batch):
    """lengths as a CPU int64 tensor of `batch` values in [1, steps], or a ValueError naming it."""
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"lengths must be a 1-D integer tensor or a list of ints, got {lengths!r}") from error
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.numel() != batch:
        raise ValueError(
            f"lengths must be 1-D with one entry per batch element: expected shape ({batch},), "
            f"got {tuple(lengths.shape)}"
        )
    lengths = lengths.to("cpu", torch.int64)
    if torch.compiler.is_compiling() or batch == 0:
        # Values are data: a traced graph cannot branch on them. The kernels check them instead.
        return lengths
    if int(lengths.min()) <= 0:
        raise ValueError(f"lengths must be >= 1 (zero-length sequences are not supported), got {lengths.tolist()}")
    if int(lengths.max()) > steps:
        raise ValueError(f"lengths must be <= the input's sequence length {steps}, got {lengths.tolist()}")
    return lengths


def _reject_proj_size(proj_size):
    if proj_size is not None:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class _FastBiRNNBase(nn.RNNBase):
    """The forward pass shared by the three cells; subclasses only name the mode."""

    def __init__(self, mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                 bidirectional, proj_size=0, device=None, dtype=None):
        if not bidirectional:
            raise ValueError(
                f"{type(self).__name__} is bidirectional only (bidirectional=False was given); "
                f"use torch.nn.{type(self).__name__[len('FastBi'):]} for a unidirectional layer"
            )
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         True, proj_size, device=device, dtype=dtype)

    @property
    def _torch_name(self):
        return "RNN" if self.mode.startswith("RNN") else self.mode

    def _check_hx_dims(self, hx, batched):
        expected = 3 if batched else 2
        if all(h.dim() == expected for h in hx):
            return
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if self.mode == "LSTM":
            got = f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {expected}-D but got {got}")
        raise RuntimeError(f"For {kind} input, hx should also be {expected}-D but got {hx[0].dim()}-D tensor")

    def _layer_weights(self, layer, like):
        """The layer's parameters in the ops' order (nn.LSTM's): weight_ih, weight_hh, bias_ih,
        bias_hh (zeros for absent biases), and weight_hr with projections, of the forward
        direction, then of the reverse one: 8 or 10 tensors."""
        per_direction = (4 if self.bias else 2) + (1 if self.proj_size > 0 else 0)
        first = 2 * layer * per_direction
        # Looked up by name on every call (nn.RNNBase's _flat_weights cache is for cuDNN; keeping it
        # fresh costs a walk over all parameters per call). The _parameters dict is the fast path;
        # getattr finds what a parametrization or a plain attribute put in a parameter's place.
        names = self._flat_weights_names[first:first + 2 * per_direction]
        weights = [self._parameters.get(name) for name in names]
        if any(weight is None for weight in weights):
            weights = [getattr(self, name) for name in names]
        if not self.bias:
            zeros = like.new_zeros(CELLS[self.mode].gates * self.hidden_size)
            forward, reverse = weights[:per_direction], weights[per_direction:]
            weights = [*forward[:2], zeros, zeros, *forward[2:], *reverse[:2], zeros, zeros, *reverse[2:]]
        return weights

    def _run(self, input, h0, c0, lengths):
        """Time-major input (T, B, I), h0 (2L, B, P), c0 (2L, B, H) (None but for LSTM), CPU lengths
        -> output, h_n, c_n (None but for LSTM)."""
        lengths = lengths.to(input.device, non_blocking=True)
        no_cell_state = input.new_empty(0)
        if self.num_layers == 1:
            output, h_n, c_n = birnn_layer(self.mode, input, self._layer_weights(0, input), h0,
                                           no_cell_state if c0 is None else c0, lengths)
            return output, h_n, None if c0 is None else c_n
        output, h_n, c_n = input, [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                output = F.dropout(output, self.dropout, training=True)
            states = slice(2 * layer, 2 * layer + 2)
            output, h, c = birnn_layer(self.mode, output, self._layer_weights(layer, input), h0[states],
                                       no_cell_state if c0 is None else c0[states], lengths)
            h_n.append(h)
            c_n.append(c)
        return output, torch.cat(h_n), None if c0 is None else torch.cat(c_n)

    def _check_devices(self, input, hx):
        """torch's messages (from _VF.lstm and friends) for parameters or states on another device
        than the input; the ops check each tensor again."""
        parameter = self._parameters.get(self._flat_weights_names[0])
        if parameter is not None and parameter.device != input.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {parameter.device}")
        for state in hx:
            if state.device != input.device:
                raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                                   f"{input.device} and hidden tensor at {state.device}")

    def _as_torch_returns(self, output, h_n, c_n, state_dtype, packed):
        """Under CPU autocast, the dtypes nn.* returns. The layers compute in the autocast dtype
        (the ops' rule), as torch's one fused CPU RNN op, mkldnn_rnn_layer (a dense LSTM without
        projections), does; everywhere else torch's RNNs are a decomposition that autocast reaches
        only at its matmuls, and whose state updates promote to the dtype of the given state
        (c0 for an LSTM: c = f * c + i * g, h = o * tanh(c), then a matmul with weight_hr;
        h0 for a GRU: (1 - z) * n + z * h; nothing for tanh(...) or relu(...))."""
        low = output.dtype
        state = torch.promote_types(state_dtype, low) if state_dtype.is_floating_point else low
        if self.mode == "GRU":
            return output.to(state), h_n.to(state), c_n
        if self.mode == "LSTM" and (packed or self.proj_size > 0):
            hidden = low if self.proj_size > 0 else state
            return output.to(hidden), h_n.to(hidden), c_n.to(state)
        return output, h_n, c_n

    def _forward(self, input, hx, lengths):
        """hx and the result's hidden state are tuples: (h,) or (h, c)."""
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths must not be given with a PackedSequence input, which carries its own lengths")
            checked, batch_sizes = input.data, input.batch_sizes
            padded, lengths = pad_packed_sequence(input)
            batched = True
        else:
            if input.dim() not in (2, 3):
                tensor = " tensor" if self.mode.startswith("RNN") else ""
                raise ValueError(f"{self._torch_name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                self._check_hx_dims(hx, batched)
                if not batched:
                    hx = tuple(h.unsqueeze(1) for h in hx)
            checked, batch_sizes = input, None
            padded = input.transpose(0, 1) if self.batch_first else input
        steps, batch = padded.shape[0], padded.shape[1]
        if hx is None:
            # Two tensors, never one twice: torch.compile takes no input aliased with another.
            hx = (padded.new_zeros(2 * self.num_layers, batch, self.proj_size or self.hidden_size),)
            if is_lstm:
                hx += (padded.new_zeros(2 * self.num_layers, batch, self.hidden_size),)
        self.check_forward_args(checked, hx if is_lstm else hx[0], batch_sizes)
        self._check_devices(padded, hx)
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if lengths is None:
            lengths = torch.full((batch,), steps, dtype=torch.int64)
        else:
            lengths = _check_lengths(lengths, steps, batch)

        output, h_n, c_n = self._run(padded, hx[0], hx[1] if is_lstm else None, lengths)
        if torch.is_autocast_enabled("cpu") and padded.device.type == "cpu":
            output, h_n, c_n = self._as_torch_returns(output, h_n, c_n, hx[-1].dtype, packed)

        if packed:
            order = input.sorted_indices
            sorted_output = output if order is None else output.index_select(1, order)
            data = pack_padded_sequence(sorted_output, lengths[order.cpu()] if order is not None else lengths).data
            output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        else:
            if self.batch_first:
                output = output.transpose(0, 1)
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
        return output, (h_n, c_n) if is_lstm else (h_n,)


class FastBiLSTM(_FastBiRNNBase):
    """Drop-in for ``nn.LSTM(..., bidirectional=True)``.

    forward(input, hx=None, lengths=None) -> (output, (h_n, c_n))
      input: (T, B, I), (B, T, I) if batch_first, (T, I) unbatched, or a PackedSequence.
      hx: (h0, c0), h0 (2*num_layers, B, P), c0 (2*num_layers, B, H), with P = proj_size if
        proj_size > 0 else H; zeros if None.
      lengths: (B,) integers in [1, T] (tensor on any device, or a list): row b is valid for
        t < lengths[b]; outputs at padded steps are 0 and h_n, c_n are each row's final state.
      output: (T, B, 2*P) like input's layout (a PackedSequence for a PackedSequence input).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=True, proj_size=0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device=device, dtype=dtype)

    def get_expected_cell_size(self, input, batch_sizes):
        mini_batch = int(batch_sizes[0]) if batch_sizes is not None else input.size(0 if self.batch_first else 1)
        return (2 * self.num_layers, mini_batch, self.hidden_size)

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def forward(self, input, hx=None, lengths=None):
        return self._forward(input, tuple(hx) if hx is not None else None, lengths)


class FastBiGRU(_FastBiRNNBase):
    """Drop-in for ``nn.GRU(..., bidirectional=True)``; torch's gate order (r, z, n) and formula.

    forward(input, hx=None, lengths=None) -> (output, h_n); shapes as ``FastBiLSTM`` with hx = h0.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=True, device=None, dtype=None, proj_size=None):
        _reject_proj_size(proj_size)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)

    def forward(self, input, hx=None, lengths=None):
        output, (h_n,) = self._forward(input, (hx,) if hx is not None else None, lengths)
        return output, h_n


class FastBiRNN(_FastBiRNNBase):
    """Drop-in for ``nn.RNN(..., bidirectional=True)`` with ``nonlinearity='tanh'`` or ``'relu'``.

    forward(input, hx=None, lengths=None) -> (output, h_n); shapes as ``FastBiLSTM`` with hx = h0.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=True, device=None, dtype=None, proj_size=None):
        _reject_proj_size(proj_size)
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype)

    def forward(self, input, hx=None, lengths=None):
        output, (h_n,) = self._forward(input, (hx,) if hx is not None else None, lengths)
        return output, h_n
