"""Triton kernels of birnn_fast, shipped as birnn_fast.kernels."""
