"""Fast bidirectional RNN layers for PyTorch."""
