"""Kept so that ``from quantlab.quantizers.packing import ...`` keeps working: GPTQ's bit
packing lives with its layout in :mod:`quantlab.formats.packing`."""

from quantlab.formats.packing import pack_cols, pack_rows, pack_unit, unpack_cols, unpack_rows

__all__ = ["pack_cols", "pack_rows", "pack_unit", "unpack_cols", "unpack_rows"]
