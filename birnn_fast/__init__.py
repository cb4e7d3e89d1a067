"""Fast bidirectional RNN layers for PyTorch: drop-ins for nn.LSTM / nn.GRU / nn.RNN with
bidirectional=True, run by fused Triton (GPU) and C++ (CPU) kernels, with per-row ``lengths=``;
``convert`` / ``revert`` swap them into / out of an existing model; ``engine_info`` says which
engine runs a layer of a given shape on a GPU, and why."""
from .convert import convert, revert
from .dispatch import engine_info
from .modules import FastBiGRU, FastBiLSTM, FastBiRNN
from .ops import birnn_layer

__version__ = "0.1.0"
__all__ = ["FastBiLSTM", "FastBiGRU", "FastBiRNN", "birnn_layer", "convert", "revert", "engine_info", "__version__"]
