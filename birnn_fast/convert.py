"""One call that moves an existing model onto the fast layers, and its inverse.

``convert(model)`` turns every bidirectional ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` inside ``model``
into ``FastBiLSTM`` / ``FastBiGRU`` / ``FastBiRNN``; ``revert(model)`` turns them back. Both work in
place, by changing each layer's class: the fast layers subclass ``nn.RNNBase`` as torch's do and keep
no state of their own, so a layer's attributes (constructor arguments, training mode), its Parameter
objects (values, device, dtype, requires_grad, optimizer state keyed by them), its hooks and their
handles, and every reference to it elsewhere in the model stay exactly what they were. The
state_dict's keys and values do not change, so checkpoints load before and after.
"""
import logging
import warnings

from torch import nn

from .modules import FastBiGRU, FastBiLSTM, FastBiRNN

__all__ = ["convert", "revert"]

_logger = logging.getLogger(__name__)

# cell name -> (torch class, fast class)
_PAIRS = {"LSTM": (nn.LSTM, FastBiLSTM), "GRU": (nn.GRU, FastBiGRU), "RNN": (nn.RNN, FastBiRNN)}
_TORCH_CLASSES = frozenset(torch_class for torch_class, _ in _PAIRS.values())


def _check_cells(cells):
    if isinstance(cells, str):
        cells = (cells,)
    unknown = [cell for cell in cells if cell not in _PAIRS]
    if unknown:
        raise ValueError(f"cells must be a subset of {tuple(_PAIRS)}, got {tuple(cells)!r}")
    return tuple(cells)


def _why_not_faithful(module, base):
    """Why swapping ``module``'s class would change what it computes, or None."""
    if type(module) is not base:
        base_name = ("nn." if base in _TORCH_CLASSES else "birnn_fast.") + base.__name__
        if type(module).__name__ == f"Parametrized{base.__name__}":
            return "its weights are parametrized (torch.nn.utils.parametrize)"
        return (f"it is a {type(module).__module__}.{type(module).__qualname__}, a subclass of {base_name} "
                f"whose methods may compute something else")
    if "forward" in vars(module):
        return "its forward was replaced on the instance"
    return None


def _swap(module, pairs, action, return_names):
    """Swap the class of every submodule of ``module`` (itself included) whose class is a key of
    ``pairs`` for its value; warn about and skip the subclasses of a key (and overridden forwards)."""
    names = []
    # named_modules lists a module shared by two parents once: swapping it once converts both.
    for name, child in module.named_modules():
        for source, target in pairs.items():
            if not isinstance(child, source) or (source in _TORCH_CLASSES and not child.bidirectional):
                continue
            reason = _why_not_faithful(child, source)
            label = name or "the module itself"
            if reason is not None:
                warnings.warn(f"birnn_fast.{action}: left `{label}` ({type(child).__name__}) as it is: {reason}",
                              stacklevel=3)
                break
            child.__class__ = target
            names.append(name)
            break
    if names:
        _logger.info("birnn_fast.%s: %d layer(s): %s", action, len(names), ", ".join(n or "<root>" for n in names))
    return (module, names) if return_names else module


def convert(module, *, cells=("LSTM", "GRU", "RNN"), return_names=False):
    """Replace every bidirectional ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in ``module`` (at any depth,
    ``module`` itself included) by ``FastBiLSTM`` / ``FastBiGRU`` / ``FastBiRNN``, in place.

    Each layer keeps its constructor arguments (``num_layers``, ``bias``, ``batch_first``,
    ``dropout``, ``nonlinearity``, ``proj_size``), its Parameter objects, training mode and hooks:
    its class is what changes. Unidirectional layers, and cells not named in ``cells``, stay torch's.
    What cannot be converted faithfully (a subclass of ``nn.LSTM`` and friends, parametrized weights,
    a forward replaced on the instance) is left as it is, with a warning naming it.

    The converted layers take what torch's take (PackedSequence, padded input, hx or not) plus
    ``lengths=``. ``isinstance(layer, nn.LSTM)`` is False afterwards: FastBi* subclass ``nn.RNNBase``.

    Args:
        module: an ``nn.Module`` (changed in place: ``copy.deepcopy`` it first to keep the original).
        cells: which of ``"LSTM"``, ``"GRU"``, ``"RNN"`` to convert.
        return_names: also return the qualified names (as ``named_modules`` gives them, ``""`` for
            ``module`` itself) of the layers converted.

    Returns:
        ``module``, or ``(module, names)`` with ``return_names=True``.
    """
    pairs = {_PAIRS[cell][0]: _PAIRS[cell][1] for cell in _check_cells(cells)}
    return _swap(module, pairs, "convert", return_names)


def revert(module, *, return_names=False):
    """The inverse of ``convert``: every ``FastBiLSTM`` / ``FastBiGRU`` / ``FastBiRNN`` in ``module``
    (converted or built as one) becomes ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN(bidirectional=True)``
    in place, with the same Parameter objects, state_dict, training mode and hooks, e.g. to ship a
    model that does not need birnn_fast. Returns ``module`` (and the names, with ``return_names``)."""
    pairs = {fast_class: torch_class for torch_class, fast_class in _PAIRS.values()}
    return _swap(module, pairs, "revert", return_names)
