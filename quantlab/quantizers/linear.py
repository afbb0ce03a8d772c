"""Kept so that ``from quantlab.quantizers.linear import PackedLinear`` keeps working: the
packed layer types live with their layouts in :mod:`quantlab.formats`."""

from quantlab.formats.base import DenseDequantLinear, drop_dense_weights
from quantlab.formats.gptq_v1 import PackedLinear

__all__ = ["DenseDequantLinear", "PackedLinear", "drop_dense_weights"]
