"""Temporary: formats/gguf.py still imports the grid from here (its next change moves it)."""

from quantlab.grid import dequantize_matrix, quantize_matrix  # noqa: F401
