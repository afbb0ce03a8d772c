"""The HQQ layout: a grid whose zero points are floats.

HQQ (Badri & Shaji 2023) optimises each group's zero point as a real number, which the
GPTQ and AWQ layouts (integer zero points packed beside the codes) cannot hold. Persistent
buffers:

  qweight int32 [in * bits / 32, out]  codes packed LSB-first along the input dim (as GPTQ v1)
  scales  float16 [n_groups, out]
  zeros   float16 [n_groups, out]      the zero point in code units: w = (code - zero) * scale
  bias    [out] (optional)

Groups are contiguous runs of ``group_size`` input columns (HQQ has no act-order), so no
group index is stored. ``quantization_config: {quant_method: quantlab, format: hqq, ...}``:
only quantlab loads it. The hqq library's own files differ (its bit packing, and metadata
dictionaries it saves with ``torch.save``, a pickle quantlab never loads). torch's int4
kernel takes float zero points as they are (``eval.kernel: int4pack``), and GGUF's Q4_1
(``q * d + m``) holds them too. Execution: :class:`~quantlab.formats.base.DenseDequantLinear`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.base import DenseDequantLinear, LayerFormat, QuantizedWeight
from quantlab.formats.packing import pack_rows, pack_unit, unpack_rows
from quantlab.grid import dequantize_matrix

HQQ_BITS = (2, 3, 4, 8)


class HQQLinear(DenseDequantLinear):
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
            "scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer(
            "zeros", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device)
        )
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

    def g_idx(self) -> torch.Tensor:
        g = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.qweight.device) // g

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.qweight, self.bits, self.in_features).t()

    def dequantize(self) -> torch.Tensor:
        return dequantize_matrix(self.codes(), self.scales, self.zeros.float(), self.g_idx())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}"
        )


class HQQ(LayerFormat):
    name = "hqq"
    description = (
        "HQQ grid: float zero points in float16, codes packed as GPTQ v1; loads in quantlab only."
    )
    module_type = HQQLinear

    def check(self, bits: int, sym: bool) -> str | None:
        return (
            None
            if bits in HQQ_BITS
            else f"the HQQ layout holds {', '.join(map(str, HQQ_BITS))} bits, not {bits}"
        )

    def check_layer(self, name: str, in_features: int, out_features: int, bits: int) -> str | None:
        unit = pack_unit(bits)
        if in_features % unit:
            return (
                f"layer '{name}' has input width {in_features}, which {bits}-bit codes cannot pack "
                f"into whole 32-bit words (needs a multiple of {unit}); add it to 'skip'"
            )
        return None

    def pack(self, q: QuantizedWeight, bias, dtype, dense: bool = True) -> HQQLinear:
        out_f, in_f = q.codes.shape
        g = in_f if q.group_size == -1 else q.group_size
        if not torch.equal(q.g_idx.long().cpu(), torch.arange(in_f) // g):
            raise QuantlabError("the HQQ layout stores contiguous groups only (no act-order)")
        m = HQQLinear(
            in_f, out_f, q.bits, q.group_size, bias is not None, dtype, device=q.codes.device
        )
        m.qweight.copy_(pack_rows(q.codes.t(), q.bits))
        m.scales.copy_(q.scales.half())
        m.zeros.copy_(q.zeros.half())
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        m.weight = m.dequantize().to(dtype) if dense else None
        return m

    def unpack(self, module: HQQLinear) -> QuantizedWeight:
        return QuantizedWeight(
            module.codes(),
            module.scales,
            module.zeros.float(),
            module.g_idx(),
            module.bits,
            module.group_size,
        )

    def empty(self, lin: nn.Linear, qcfg: dict[str, Any], dtype: torch.dtype) -> HQQLinear:
        bits, group_size = qcfg.get("bits"), qcfg.get("group_size")
        if bits is None or group_size is None:
            raise QuantlabError("config.json has no quantization_config with bits and group_size")
        return HQQLinear(
            lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, dtype
        )

    def quantization_config(
        self, bits: int, group_size: int, sym: bool, **extra: Any
    ) -> dict[str, Any]:
        return {
            "quant_method": "quantlab",
            "format": "hqq",
            "bits": bits,
            "group_size": group_size,
            "zero_point": "float16",
            **extra,
        }
