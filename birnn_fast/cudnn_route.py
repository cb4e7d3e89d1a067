"""The cuDNN route: ``birnn_fast::forward`` / ``birnn_fast::backward`` (contract: library.py) run by
torch's own RNN (``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu``: cuDNN on CUDA tensors,
torch's CPU RNN on CPU tensors, which is how the tests run this same code without a GPU).

The dispatch (dispatch.py) sends a shape here where cuDNN measured faster than our kernels. Inside
the op, so torch.compile, export and opcheck see the same opaque op, its fake and its formulas,
whichever engine runs it. With ``lengths`` that are not all T, the rows go through a PackedSequence,
as a user of nn.LSTM would run them: outputs 0 at padding, final states at each row's own end.

The backward recomputes the forward under autograd (torch's RNN in training mode) and takes the
VJP of that: exact, and stateless, so the workspace holds nothing of cuDNN's (its reserve space is
opaque and of cuDNN's own size, which the op's fixed workspace shape cannot promise to hold). The
cost of the recompute, one more cuDNN forward per training step, is in what the dispatch table
measures for this route. The workspace is zeros (the contract asks for a deterministic function of
the inputs).
"""
import contextlib
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import library
from .cells import cell_of

_FUNCTIONS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
# cuDNN copies weights that are not one flat buffer into one at every call (a cost the measured
# table includes) and says so: the op's weights are the user's own tensors, which it must not move.
_FLAT_WARNING = "RNN module weights are not part of single contiguous chunk of memory"


def why_not(device, dtype, cell=None, projections=False):
    """The reason torch's RNN cannot run this layer here, or None (CPU always can; on CUDA, cuDNN must
    be there and enabled, as nn.LSTM needs for its own fast path)."""
    if device.type == "cuda" and not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
        return "cuDNN is not available or torch.backends.cudnn.enabled is False"
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"torch's RNN does not take {dtype}"
    return None


def _equal_lengths(lengths, steps):
    """Whether every row runs all ``steps`` (no packing needed); a host sync on CUDA."""
    return bool((lengths == steps).all())


def _run(cell, input, weights, h0, c0, lengths, train):
    """torch's bidirectional layer on the op's arguments: (output (T, B, 2P), h_n, c_n or (0,))."""
    steps = input.shape[0]
    function = getattr(torch._VF, _FUNCTIONS[cell])
    has_cell_state = cell_of(cell).has_cell_state
    packed = None
    if not _equal_lengths(lengths, steps):
        packed = pack_padded_sequence(input, lengths.cpu(), enforce_sorted=False)
        h0, c0 = (state.index_select(1, packed.sorted_indices) if state.dim() == 3 else state for state in (h0, c0))
    hx = (h0, c0) if has_cell_state else h0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _FLAT_WARNING)
        if packed is None:
            result = function(input, hx, weights, True, 1, 0.0, train, True, False)
        else:
            result = function(packed.data, packed.batch_sizes, hx, weights, True, 1, 0.0, train, True)
    output, h_n = result[0], result[1]
    c_n = result[2] if has_cell_state else input.new_empty(0)
    if packed is not None:
        output, _ = pad_packed_sequence(PackedSequence(output, packed.batch_sizes, packed.sorted_indices,
                                                       packed.unsorted_indices), total_length=steps)
        h_n = h_n.index_select(1, packed.unsorted_indices)
        if has_cell_state:
            c_n = c_n.index_select(1, packed.unsorted_indices)
    return output, h_n, c_n


def forward_op(cell, input, weights, h0, c0, lengths, save_workspace):
    """``birnn_fast::forward`` by torch's RNN (inference mode: the backward recomputes)."""
    _, hidden, _ = library.sizes(cell, weights)
    steps, batch = input.shape[:2]
    with torch.autocast(input.device.type, enabled=False), torch.no_grad():
        output, h_n, c_n = _run(cell, input, weights, h0, c0, lengths, train=False)
    shape = library.workspace_shape(cell, steps, batch, hidden) if save_workspace else (0,)
    workspace = input.new_zeros(shape, dtype=library.workspace_dtype(input.dtype))
    return output.contiguous(), h_n.contiguous(), c_n.contiguous(), workspace


def backward_op(cell, grad_output, grad_h_n, grad_c_n, input, weights, h0, c0, lengths, output, workspace,
                output_mask=(True, True, True, True)):
    """``birnn_fast::backward``: the VJP of torch's RNN, recomputed under autograd, for the gradients
    ``output_mask`` asks for (the others come back empty)."""
    has_cell_state = cell_of(cell).has_cell_state
    wanted = [output_mask[0], output_mask[2]] + [output_mask[1]] * len(weights) + [
        has_cell_state and output_mask[3]]
    primals = [tensor.detach().requires_grad_(need) for tensor, need in zip([input, h0, *weights, c0], wanted)]
    with torch.autocast(input.device.type, enabled=False), torch.enable_grad(), _autograd_dispatch():
        outputs = _run(cell, primals[0], primals[2:-1], primals[1], primals[-1], lengths, train=True)
        cotangents = [grad_output, grad_h_n] + ([grad_c_n] if has_cell_state else [])
        targets = [tensor for tensor, need in zip(primals, wanted) if need]
        grads = iter(torch.autograd.grad(outputs[:len(cotangents)], targets, cotangents, allow_unused=True,
                                         materialize_grads=True) if targets else ())
    results = [_own(next(grads), cotangents) if need else torch.zeros_like(tensor)
               for tensor, need in zip(primals, wanted)]
    grad_input, grad_h0, *grad_weights, grad_c0 = results
    if not has_cell_state:
        grad_c0 = c0.new_empty(0)
    return library.masked(output_mask, grad_input, grad_weights, grad_h0, grad_c0)


@contextlib.contextmanager
def _autograd_dispatch():
    """Autograd back on inside an op's kernel, which the dispatcher runs with autograd's keys excluded
    (there even enable_grad records nothing); with ADInplaceOrView too, which a dispatch mode around
    the op (opcheck's, a FLOP counter) excludes as well, and without which the views torch's packed
    RNN takes of its data lose their history."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
            torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView)
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        yield


def _own(grad, cotangents):
    """``grad`` as an op's output must be: contiguous, and no view of an argument (autograd may hand
    back a cotangent itself)."""
    storage = grad.untyped_storage().data_ptr()
    if any(tensor.numel() and tensor.untyped_storage().data_ptr() == storage for tensor in cotangents):
        return grad.clone(memory_format=torch.contiguous_format)
    return grad.contiguous()
