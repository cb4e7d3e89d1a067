"""The element-wise math of the four cells, on [BB, BH] fp32 tiles: the only place where the cells
differ (as csrc/cpu/cells.h for the C++ kernels). The kernels run the recurrence once for all cells
and call these with the step's pre-activations (forward) or saved activations (backward).

Forward: the gates' pre-activations are x_g + (W_hh h)_g (+ b_hh_g), GRU's n gate kept in its two
parts, since r multiplies W_hn h + b_hn as a whole. Backward: ``dh`` is the gradient reaching the
step's h (from the output and from the next step), ``dc`` the one reaching its c; the results are the
gradients of the pre-activations through W_ih and through W_hh (they differ only in GRU's n gate),
and what reaches the previous state other than through W_hh.
"""
import triton
import triton.language as tl

from .common import sigmoid, tanh


@triton.jit
def lstm_forward(pre_i, pre_f, pre_g, pre_o, c_prev):
    """-> i, f, g, o (activated), c, h."""
    b_i = sigmoid(pre_i)
    b_f = sigmoid(pre_f)
    b_g = tanh(pre_g)
    b_o = sigmoid(pre_o)
    b_c = b_f * c_prev + b_i * b_g
    return b_i, b_f, b_g, b_o, b_c, b_o * tanh(b_c)


@triton.jit
def gru_forward(pre_r, pre_z, x_n, hidden_n, h_prev):
    """hidden_n = W_hn h + b_hn -> r, z, n, h."""
    b_r = sigmoid(pre_r)
    b_z = sigmoid(pre_z)
    b_n = tanh(x_n + b_r * hidden_n)
    return b_r, b_z, b_n, (1.0 - b_z) * b_n + b_z * h_prev


@triton.jit
def elman_forward(pre, RELU: tl.constexpr):
    """-> h."""
    if RELU:
        h = tl.where(pre < 0.0, 0.0, pre)  # keeps a NaN, as torch.relu (tl.maximum drops it)
    else:
        h = tanh(pre)
    return h


@triton.jit
def lstm_backward(dh, dc, b_i, b_f, b_g, b_o, b_c, c_prev):
    """-> d_i, d_f, d_g, d_o (pre-activations, through W_ih and W_hh alike), dc_prev."""
    b_tc = tanh(b_c)
    b_dc = dc + dh * b_o * (1.0 - b_tc * b_tc)
    d_i = b_dc * b_g * b_i * (1.0 - b_i)
    d_f = b_dc * c_prev * b_f * (1.0 - b_f)
    d_g = b_dc * b_i * (1.0 - b_g * b_g)
    d_o = dh * b_tc * b_o * (1.0 - b_o)
    return d_i, d_f, d_g, d_o, b_dc * b_f


@triton.jit
def gru_backward(dh, b_r, b_z, b_n, hidden_n, h_prev):
    """-> d_r, d_z, d_n (through W_ih), d_n * r (n's part through W_hh), dh_prev other than through W_hh."""
    b_dn = dh * (1.0 - b_z) * (1.0 - b_n * b_n)
    d_r = b_dn * hidden_n * b_r * (1.0 - b_r)
    d_z = dh * (h_prev - b_n) * b_z * (1.0 - b_z)
    return d_r, d_z, b_dn, b_dn * b_r, dh * b_z


@triton.jit
def elman_backward(dh, b_h, RELU: tl.constexpr):
    """h = act(pre) -> d_pre."""
    if RELU:
        d = tl.where(b_h > 0, dh, 0.0)
    else:
        d = dh * (1.0 - b_h * b_h)
    return d
