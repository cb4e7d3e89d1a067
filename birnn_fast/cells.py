"""The four cells: the one table that modules, ops, reference and kernels read.

``mode`` is torch's name (``nn.RNNBase.mode``). Per hidden unit and direction a cell has ``gates``
rows in weight_ih / weight_hh (torch's gate order, ``gate_names``) and saves ``saved`` fp32-or-input
activations for its backward (the ops' workspace); only the LSTM has a cell state and a projection.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    mode: str
    gates: int
    saved: int
    has_cell_state: bool
    gate_names: tuple
    index: int  # a small integer for kernels that specialise on the cell (Triton constexpr)


CELLS = {
    "LSTM": Cell("LSTM", 4, 5, True, ("i", "f", "g", "o"), 0),
    "GRU": Cell("GRU", 3, 4, False, ("r", "z", "n"), 1),
    "RNN_TANH": Cell("RNN_TANH", 1, 0, False, ("h",), 2),
    "RNN_RELU": Cell("RNN_RELU", 1, 0, False, ("h",), 3),
}


def cell_of(mode):
    """The Cell of torch's mode name, or a ValueError listing the names."""
    try:
        return CELLS[mode]
    except KeyError:
        raise ValueError(f"unknown cell {mode!r}; expected one of {sorted(CELLS)}") from None
