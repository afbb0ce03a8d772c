"""What a method hands to a format, and the interface every checkpoint layout implements.

A method (RTN, GPTQ, AWQ) chooses a grid per linear layer: integer ``codes``, ``scales``,
``zeros`` and the group of every input column (``g_idx``) -- a :class:`QuantizedWeight`. A
format packs that grid into tensors (or blocks), writes and reads them; it knows nothing of
how the grid was chosen, and a method knows nothing of bit orders. This is the split of
compressed-tensors' compressors and of gpt-fast's ``create_quantized_state_dict`` /
``convert_for_runtime``.

Two kinds of format exist:

- a *layout* (:class:`LayerFormat`) is a module type whose persistent buffers are a
  checkpoint's tensors (GPTQ v1, AutoAWQ gemm): the quantized model holds its layers in a
  layout, ``model.safetensors`` stores them, the same layout reads them back;
- a *file* format (GGUF) is written from any layout's layers (:meth:`LayerFormat.unpack`
  gives it the grid back) into a file another engine runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.grid import dequantize_matrix


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier parameter (tied weights): a file
    stores each tensor once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue  # e.g. the dtype entry of torch.ao's packed parameters
        plain = type(t.data if isinstance(t, nn.Parameter) else t) is torch.Tensor
        # wrapper tensor subclasses (torchao) have no storage of their own: compare objects
        key = t.data_ptr() if plain and t.device.type != "meta" else id(t)
        if key in seen and t.numel():
            tied.add(name)
        else:
            seen[key] = name
    return tied


@dataclass(frozen=True)
class GridSpec:
    """The grids a method will put its layers on, known from its options before any work, for
    exports that store grids as they are (GGUF blocks): the code widths, symmetric (fixed zero
    point) or not, the group size (-1: one group per output channel), and whether a layer's
    groups follow a permuted column order (GPTQ's act_order without static groups), which
    block formats cannot hold."""

    widths: frozenset[int]
    sym: bool
    group_size: int
    permuted_groups: bool = False


@dataclass(frozen=True)
class QuantizedWeight:
    """One layer's grid as a method chose it, in the original column order.

    codes [out, in] integers in [0, 2**bits); scales [n_groups, out] (float16-representable
    values); zeros [n_groups, out] integers (floats for HQQ's grid, whose zero points are
    optimised real numbers); g_idx [in] the group of each input column;
    ``group_size`` as configured (-1: one group per output channel)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The dense weight [out, in] in float32 that the grid encodes."""
        return dequantize_matrix(self.codes, self.scales, self.zeros, self.g_idx)


class DenseDequantLinear(nn.Module):
    """Execution shared by the layouts: the codes are unpacked once into a dense ``weight``
    buffer (not saved) and ``forward`` is ``F.linear``. Subclasses hold the packed buffers and
    implement :meth:`dequantize`.

    On CPU this is the fastest path PyTorch offers for these layouts (no int4 GEMM kernel reads
    them as stored), so speed equals the float model's and the saving is on disk and in transfer;
    the results table labels it ``kernel=dense-dequant``. While a quantizer works, the layers it
    has finished with hold only their packed buffers (``weight`` is None, see
    :func:`drop_dense_weights`) and dequantize in each forward: quantizing never holds a dense
    copy of the weights beside the float model's."""

    kernel = "dense-dequant"
    weight: torch.Tensor | None
    #: dtype of the dense weight and of the computation
    compute_dtype: torch.dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        #: a kernel that reads the packed weights (quantlab.formats.kernels), set at load
        self.fast = None

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the dense weight from the packed buffers (after loading a state dict)."""
        self.weight = self.dequantize().to(self.compute_dtype)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight [out, in]: the unpacked buffer, or dequantized now when the
        layer holds only its packed form."""
        return self.weight if self.weight is not None else self.dequantize().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast
        if fast is not None and (
            fast.max_tokens is None or x.numel() <= fast.max_tokens * x.shape[-1]
        ):
            y = fast(x)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dense_weight(), self.bias)


def drop_dense_weights(module: nn.Module) -> None:
    """Free the dense weights of the packed layers inside ``module`` (they keep working,
    dequantizing in each forward); quantizers call it on each decoder layer they finish."""
    for m in module.modules():
        if isinstance(m, DenseDequantLinear):
            m.weight = None


class LayerFormat(ABC):
    """A checkpoint layout of quantized linear layers (see the module docstring)."""

    #: registry key, also written into the checkpoint sidecar
    name: ClassVar[str]
    #: changes whenever the same grid would be written differently
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    #: the module type whose buffers are this layout's tensors
    module_type: ClassVar[type[DenseDequantLinear]]

    @abstractmethod
    def check(self, bits: int, sym: bool) -> str | None:
        """Why this layout cannot hold a ``bits``-bit grid (``None``: it can)."""

    @abstractmethod
    def check_layer(self, name: str, in_features: int, out_features: int, bits: int) -> str | None:
        """Why a layer of this shape cannot be stored (``None``: it can)."""

    @abstractmethod
    def pack(
        self, q: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype, dense: bool = True
    ) -> DenseDequantLinear:
        """The layer holding ``q`` (with ``dense`` off it keeps only its packed buffers)."""

    @abstractmethod
    def unpack(self, module: DenseDequantLinear) -> QuantizedWeight:
        """The grid a layer of this layout holds (exact inverse of :meth:`pack`)."""

    @abstractmethod
    def empty(self, lin: nn.Linear, qcfg: dict[str, Any], dtype: torch.dtype) -> DenseDequantLinear:
        """An empty layer the shape of ``lin`` for a checkpoint's ``quantization_config``."""

    @abstractmethod
    def quantization_config(
        self, bits: int, group_size: int, sym: bool, **extra: Any
    ) -> dict[str, Any]:
        """The ``quantization_config`` for ``config.json`` (what the ecosystem's loaders read)."""
