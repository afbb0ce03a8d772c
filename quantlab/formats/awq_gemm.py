"""The AutoAWQ "gemm" layout (4 bits): ``AWQLinear`` and its ``quantization_config``.

qweight int32 [in, out/8] with the nibble order 0,2,4,6,1,3,5,7 (nibble i of a word holds
column 8*word + AWQ_ORDER[i]); qzeros int32 [n_groups, out/8] likewise; scales float16
[n_groups, out]; ``quantization_config: {quant_method: awq, version: gemm, zero_point}``.
Execution: see :class:`~quantlab.formats.base.DenseDequantLinear`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.base import DenseDequantLinear, LayerFormat, QuantizedWeight
from quantlab.grid import dequantize_matrix

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8*word + AWQ_ORDER[i]


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [in, out] -> int32 [in, out/8] in AutoAWQ's GEMM order."""
    rows, cols = codes.shape
    v = codes.to(torch.int64).view(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    words = (v << (torch.arange(8, device=codes.device) * 4)).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [in, out/8] in AutoAWQ's GEMM order -> codes [in, out] (int64)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = (w.unsqueeze(2) >> (torch.arange(8, device=w.device) * 4)) & 0xF  # nibble i
    out = torch.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib
    return out.reshape(w.shape[0], -1)


class AWQLinear(DenseDequantLinear):
    """A linear layer stored in the AutoAWQ GEMM layout (4-bit), unpacked once at
    construction into a dense ``weight`` buffer (not saved): ``kernel=dense-dequant``.

    qweight int32 [in, out/8], qzeros int32 [n_groups, out/8], scales float16 [n_groups, out]."""

    bits = 4

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = dtype
        ng = 1 if group_size == -1 else in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(ng, out_features // 8, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "scales", torch.zeros(ng, out_features, dtype=torch.float16, device=device)
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

    @classmethod
    def from_codes(cls, codes, scales, zeros, group_size, bias, dtype) -> AWQLinear:
        """codes [out, in], scales/zeros [n_groups, out]."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, group_size, bias is not None, dtype, device=codes.device)
        m.qweight.copy_(pack_awq(codes.t()))
        m.qzeros.copy_(pack_awq(zeros))
        m.scales.copy_(scales.half())
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        m.weight = dequantize_matrix(codes, m.scales, zeros, m.g_idx()).to(dtype)
        return m

    def dequantize(self) -> torch.Tensor:
        codes = unpack_awq(self.qweight).t()
        return dequantize_matrix(codes, self.scales, unpack_awq(self.qzeros), self.g_idx())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, format=awq-gemm, kernel={self.kernel}"
        )


class AWQGemm(LayerFormat):
    name = "awq-gemm"
    description = "AutoAWQ gemm (transformers/vLLM read it), 4 bits, output widths a multiple of 8."
    module_type = AWQLinear

    def check(self, bits: int, sym: bool) -> str | None:
        if bits != 4:
            return (
                f"the AWQ gemm format stores 4-bit weights only (got bits={bits}); use format: "
                "gptq for 2, 3 or 8 bits"
            )
        return None

    def check_layer(self, name: str, in_features: int, out_features: int, bits: int) -> str | None:
        if out_features % 8:
            return (
                f"layer '{name}' has output width {out_features}, not a multiple of 8 as the AWQ "
                "gemm format needs; use format: gptq or skip it"
            )
        return None

    def pack(self, q: QuantizedWeight, bias, dtype, dense: bool = True) -> AWQLinear:
        # the layout has no g_idx: it can only hold groups in column order
        if q.bits != 4 or not torch.equal(q.g_idx.cpu().long(), _static_g_idx(q)):
            raise QuantlabError("the AWQ gemm format holds 4-bit grids with static groups only")
        m = AWQLinear.from_codes(q.codes, q.scales, q.zeros, q.group_size, bias, dtype)
        if not dense:
            m.weight = None
        return m

    def unpack(self, module: AWQLinear) -> QuantizedWeight:
        return QuantizedWeight(
            unpack_awq(module.qweight).t(),
            module.scales,
            unpack_awq(module.qzeros),
            module.g_idx(),
            4,
            module.group_size,
        )

    def empty(self, lin: nn.Linear, qcfg: dict[str, Any], dtype: torch.dtype) -> AWQLinear:
        if qcfg.get("quant_method") != "awq" or qcfg.get("version") != "gemm":
            raise QuantlabError("config.json's quantization_config is not an AWQ gemm one")
        return AWQLinear(
            lin.in_features, lin.out_features, qcfg["group_size"], lin.bias is not None, dtype
        )

    def quantization_config(
        self, bits: int, group_size: int, sym: bool, **extra: Any
    ) -> dict[str, Any]:
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": not sym,
            "version": "gemm",
            "modules_to_not_convert": extra.get("modules_to_not_convert"),
        }


def _static_g_idx(q: QuantizedWeight) -> torch.Tensor:
    in_f = q.codes.shape[1]
    g = in_f if q.group_size == -1 else q.group_size
    return torch.arange(in_f) // g
