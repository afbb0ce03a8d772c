"""The GPTQ v1 layout: ``PackedLinear`` and the ``quantization_config`` loaders read.

Persistent buffers (what the checkpoint holds, GPTQ names and dtypes):
  qweight int32 [in * bits / 32, out]  codes packed LSB-first along the input dim
  qzeros  int32 [n_groups, out * bits / 32]  zero points minus one (GPTQ "v1" convention)
  scales  float16 [n_groups, out]
  g_idx   int32 [in]  group of each input column
  bias    [out] (optional)

For 2, 3, 4 and 8 bits it is a standard ``quant_method: gptq`` checkpoint (transformers and
gptqmodel load it); 5-7 bits use the same layout with a ``quant_method: quantlab`` config that
only quantlab loads. Execution: see :class:`~quantlab.formats.base.DenseDequantLinear`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.base import DenseDequantLinear, LayerFormat, QuantizedWeight
from quantlab.formats.packing import pack_cols, pack_rows, pack_unit, unpack_cols, unpack_rows
from quantlab.grid import dequantize_matrix

GPTQ_BITS = (2, 3, 4, 8)


class PackedLinear(DenseDequantLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.compute_dtype = dtype
        n_groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer(
            "qweight",
            torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device),
        )
        self.register_buffer(
            "qzeros",
            torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32, device=device),
        )
        self.register_buffer(
            "scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.register_buffer(
            "weight",
            torch.empty(out_features, in_features, dtype=dtype, device=device),
            persistent=False,
        )

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        dense: bool = True,
    ) -> PackedLinear:
        """Build from codes [out, in], scales/zeros [n_groups, out] and g_idx [in]; with
        ``dense`` off the layer keeps only its packed buffers (quantizers, see above)."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bits, group_size, bias is not None, dtype, device=codes.device)
        maxq = 2**bits - 1
        m.qweight.copy_(pack_rows(codes.t(), bits))
        # v1 convention: store zero - 1, wrapped into `bits` bits (a zero of 0 is stored as maxq)
        m.qzeros.copy_(pack_cols((zeros - 1) & maxq, bits))
        m.scales.copy_(scales.half())
        m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        # the codes are at hand: no need to unpack what was just packed
        m.weight = dequantize_matrix(codes, m.scales, zeros, g_idx).to(dtype) if dense else None
        return m

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.qweight, self.bits, self.in_features).t()

    def zeros(self) -> torch.Tensor:
        return (unpack_cols(self.qzeros, self.bits, self.out_features) + 1) & (2**self.bits - 1)

    def dequantize(self) -> torch.Tensor:
        """The dense weight [out, in] in float32 that the packed tensors encode."""
        return dequantize_matrix(self.codes(), self.scales, self.zeros(), self.g_idx)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}"
        )


def gptq_quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool = False) -> dict:
    """The ``quantization_config`` of a GPTQ v1 checkpoint (what transformers/gptqmodel read)."""
    if bits not in GPTQ_BITS:
        # No GPTQ loader packs 5-7 bits; say so instead of pretending to be loadable.
        return {
            "quant_method": "quantlab",
            "format": "gptq-v1-bitstream",
            "bits": bits,
            "group_size": group_size,
            "sym": sym,
            "desc_act": desc_act,
        }
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
    }


class GPTQv1(LayerFormat):
    name = "gptq-v1"
    description = (
        "GPTQ v1 (AutoGPTQ/gptqmodel/transformers), 2-8 bits; 5-7 bits load in quantlab only."
    )
    module_type = PackedLinear

    def check(self, bits: int, sym: bool) -> str | None:
        return None if 1 <= bits <= 8 else f"the GPTQ v1 layout packs 1-8 bits, not {bits}"

    def check_layer(self, name: str, in_features: int, out_features: int, bits: int) -> str | None:
        unit = pack_unit(bits)
        for what, n in (("input", in_features), ("output", out_features)):
            if n % unit:
                return (
                    f"layer '{name}' has {what} width {n}, which {bits}-bit codes cannot pack "
                    f"into whole 32-bit words (needs a multiple of {unit}); add it to 'skip'"
                )
        return None

    def pack(self, q: QuantizedWeight, bias, dtype, dense: bool = True) -> PackedLinear:
        return PackedLinear.from_codes(
            q.codes,
            q.scales,
            q.zeros,
            q.g_idx,
            q.bits,
            q.group_size,
            bias,
            dtype=dtype,
            dense=dense,
        )

    def unpack(self, module: PackedLinear) -> QuantizedWeight:
        return QuantizedWeight(
            module.codes(),
            module.scales,
            module.zeros(),
            module.g_idx.long(),
            module.bits,
            module.group_size,
        )

    def empty(self, lin: nn.Linear, qcfg: dict[str, Any], dtype: torch.dtype) -> PackedLinear:
        bits, group_size = qcfg.get("bits"), qcfg.get("group_size")
        if bits is None or group_size is None:
            raise QuantlabError("config.json has no quantization_config with bits and group_size")
        return PackedLinear(
            lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, dtype
        )

    def quantization_config(
        self, bits: int, group_size: int, sym: bool, **extra: Any
    ) -> dict[str, Any]:
        return gptq_quantization_config(
            bits, group_size, sym, desc_act=bool(extra.get("desc_act", False))
        )
