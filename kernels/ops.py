"""The ops' Triton implementations: ``birnn_fast::forward`` / ``birnn_fast::backward`` (contract:
birnn_fast/library.py) on the launchers' stacked layout (forward.py, backward.py)."""
import torch

from birnn_fast.library import masked

from .backward import backward
from .forward import forward


def forward_op(cell, input, weights, h0, c0, lengths, save_workspace):
    """``birnn_fast::forward``: weights per direction, in nn.LSTM's order (8, or 10 with weight_hr)."""
    weight_ih, weight_hh, bias_ih, bias_hh, *weight_hr = _stack(weights)
    return forward(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, save_workspace,
                   weight_hr=weight_hr[0] if weight_hr else None)


def backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace,
                output_mask=(True, True, True, True)):
    """``birnn_fast::backward``; gradients per direction, as ``weights``. Every gradient is computed
    (the kernel's products do not take the mask yet), those ``output_mask`` does not ask for are
    then dropped."""
    weight_ih, weight_hh, _, bias_hh, *weight_hr = _stack(weights)
    grad_input, *grads = backward(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, bias_hh,
                                  h0, c0, lengths, output, workspace, weight_hr=weight_hr[0] if weight_hr else None)
    grad_h0, grad_c0 = grads[4:6]
    stacked = grads[:4] + grads[6:]  # weight_ih, weight_hh, bias_ih, bias_hh (, weight_hr)
    return masked(output_mask, grad_input, [grad[d] for d in range(2) for grad in stacked], grad_h0, grad_c0)


def _stack(weights):
    """The parameters of both directions, nn.LSTM's order (weight_ih, weight_hh, bias_ih, bias_hh and,
    with projections, weight_hr per direction) -> each kind stacked (2, ...)."""
    if len(weights) not in (8, 10):
        raise ValueError(f"Expected the 8 or 10 parameters of a bidirectional layer, got {len(weights)}")
    kinds = len(weights) // 2
    return [torch.stack(weights[kind::kinds]) for kind in range(kinds)]
