"""Backend registry: name -> "module:Class", imported only when used.

``import quantlab`` never imports an optional heavy dependency; a backend's module imports
its library inside the methods that need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from quantlab.errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from quantlab.quantizers.base import Backend

BACKENDS: dict[str, str] = {
    "none": "quantlab.quantizers.none:NoQuant",
    "rtn": "quantlab.quantizers.rtn:RTN",
    "gptq": "quantlab.quantizers.gptq:GPTQ",
    "awq": "quantlab.quantizers.awq:AWQ",
    "hqq": "quantlab.quantizers.hqq:HQQBackend",
    "int8-dynamic": "quantlab.quantizers.int8:Int8Dynamic",
    "int8-weight-only": "quantlab.quantizers.int8:Int8WeightOnly",
    "bnb": "quantlab.quantizers.bnb:Bnb",
    "quanto": "quantlab.quantizers.quanto:Quanto",
    "llamacpp": "quantlab.quantizers.llamacpp:LlamaCpp",
    "ggml": "quantlab.quantizers.ggml:Ggml",
    "w8a8": "quantlab.quantizers.w8a8:W8A8",
}


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def get_backend(name: str, where: str = "backend") -> type[Backend]:
    """Return the backend class registered as ``name`` or raise a "did you mean" error."""
    target = BACKENDS.get(name)
    if target is None:
        raise RecipeError(
            f"{where}: unknown backend '{name}'{did_you_mean(name, BACKENDS)}; "
            f"available: {', '.join(backend_names())}"
        )
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
