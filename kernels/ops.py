"""The ops' Triton implementations: ``birnn_fast::forward`` / ``birnn_fast::backward`` (contract:
birnn_fast/library.py) on the launchers' stacked layout (forward.py, backward.py)."""
import torch

from .backward import backward
from .forward import forward


def forward_op(cell, input, weights, h0, c0, lengths, save_workspace):
    """``birnn_fast::forward``: weights per direction, in nn.LSTM's order."""
    return forward(cell, input, *_stack(weights), h0, c0, lengths, save_workspace)


def backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace):
    """``birnn_fast::backward``; gradients per direction, as ``weights``."""
    weight_ih, weight_hh, _, bias_hh = _stack(weights)
    grad_input, *grad_stacked, grad_h0, grad_c0 = backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                                           weight_hh, bias_hh, h0, c0, lengths, output, workspace)
    return grad_input, [grad[d] for d in range(2) for grad in grad_stacked], grad_h0, grad_c0


def _stack(weights):
    """8 parameters, nn.LSTM's order (weight_ih, weight_hh, bias_ih, bias_hh per direction) -> each kind (2, ...)."""
    return [torch.stack(weights[kind::4]) for kind in range(4)]
