"""Formats: how a method's grid is packed, written and read, apart from how it was chosen.

See :mod:`quantlab.formats.base` for the interface. The registry:

- ``LAYOUTS``: the checkpoint layouts a quantized model holds its layers in and
  ``model.safetensors`` stores (``gptq-v1``, ``awq-gemm``, ``hqq``). A backend names its layout
  (:meth:`~quantlab.quantizers.base.Backend.layout`); the checkpoint sidecar records it with
  its version, and loading checks both.
- GGUF (:mod:`quantlab.formats.gguf`), the file format: written from any layout's layers
  (through :func:`unpack_layer`) for llama.cpp; a recipe method's ``export: [native, gguf]``.

Adding a layout is one class here; every method that produces a grid it can hold, and GGUF
export, work with it without change.
"""

from __future__ import annotations

from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.awq_gemm import AWQGemm
from quantlab.formats.base import (
    DenseDequantLinear,
    GridSpec,
    LayerFormat,
    QuantizedWeight,
    drop_dense_weights,
)
from quantlab.formats.gptq_v1 import GPTQv1
from quantlab.formats.hqq import HQQ

LAYOUTS: dict[str, LayerFormat] = {f.name: f for f in (GPTQv1(), AWQGemm(), HQQ())}

__all__ = [
    "LAYOUTS",
    "DenseDequantLinear",
    "GridSpec",
    "LayerFormat",
    "QuantizedWeight",
    "drop_dense_weights",
    "get_layout",
    "layout_of",
    "unpack_layer",
]


def get_layout(name: str) -> LayerFormat:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise QuantlabError(
            f"unknown checkpoint layout '{name}'; quantlab reads {', '.join(sorted(LAYOUTS))} "
            "(a checkpoint from a newer quantlab?)"
        ) from None


def layout_of(module: nn.Module | None) -> LayerFormat | None:
    """The layout whose module type ``module`` is (None for any other module)."""
    return next((f for f in LAYOUTS.values() if type(module) is f.module_type), None)


def unpack_layer(module: nn.Module | None) -> QuantizedWeight | None:
    """The grid a packed layer holds, whatever its layout (None for any other module)."""
    fmt = layout_of(module)
    return None if fmt is None else fmt.unpack(module)
