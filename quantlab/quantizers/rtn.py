"""``rtn``: weight-only round-to-nearest quantization, the baseline every method must beat.

Each targeted linear layer's weight is split into groups of ``group_size`` input columns and
rounded to the nearest point of a uniform ``bits``-bit grid (symmetric or with a zero
point). The checkpoint uses the GPTQ v1 tensor layout, so for 2, 3, 4 and 8 bits it is a
standard ``quant_method: gptq`` checkpoint (a GPTQ without error correction); 5-7 bits use
the same layout with a ``quant_method: quantlab`` config that only quantlab loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.quantizers.base import (
    WEIGHTS_NAME,
    Backend,
    BackendConfig,
    check_not_tied,
    load_quantized,
    save_weights,
    set_module,
    skip_field,
    target_linears,
)
from quantlab.quantizers.grid import quantize_matrix
from quantlab.quantizers.linear import PackedLinear
from quantlab.quantizers.packing import pack_unit

GPTQ_BITS = (2, 3, 4, 8)


class WeightQuantConfig(BackendConfig):
    """Options shared by the weight-only integer backends."""

    bits: int = Field(4, ge=2, le=8, description="Bits per weight code (2-8).")
    group_size: int = Field(
        128, description="Input columns per scale/zero group; -1 for one group per output "
        "channel. Must divide every quantized layer's input width.")
    sym: bool = Field(True, description="Symmetric grid (fixed zero point) or asymmetric.")
    skip: list[str] | Literal["auto"] = skip_field()

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"group_size must be a positive number of columns or -1 (per channel), got {v}")
        return v

    def table_fields(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}


def check_layers(targets: list[tuple[str, nn.Linear]], bits: int, group_size: int) -> None:
    """Clear errors for layers whose shape does not fit the group size or the bit packing."""
    if not targets:
        raise QuantlabError("no linear layer is left to quantize: 'skip' excludes them all")
    unit = pack_unit(bits)
    for name, m in targets:
        if group_size != -1 and m.in_features % group_size:
            fits = [g for g in (16, 32, 64, 128, 256) if m.in_features % g == 0]
            raise QuantlabError(
                f"group_size {group_size} does not divide the input width {m.in_features} of "
                f"layer '{name}'; group sizes that fit: {', '.join(map(str, fits + [-1]))}"
            )
        for what, n in (("input", m.in_features), ("output", m.out_features)):
            if n % unit:
                raise QuantlabError(
                    f"layer '{name}' has {what} width {n}, which {bits}-bit codes cannot pack "
                    f"into whole 32-bit words (needs a multiple of {unit}); add it to 'skip'"
                )


def gptq_quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool = False) -> dict:
    """The ``quantization_config`` of a GPTQ v1 checkpoint (what transformers/gptqmodel read)."""
    if bits not in GPTQ_BITS:
        # No GPTQ loader packs 5-7 bits; say so instead of pretending to be loadable.
        return {"quant_method": "quantlab", "format": "gptq-v1-bitstream", "bits": bits,
                "group_size": group_size, "sym": sym, "desc_act": desc_act}
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "checkpoint_format": "gptq", "pack_dtype": "int32"}


def load_packed(ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Rebuild a model whose quantized layers are :class:`PackedLinear` (GPTQ v1 layout)."""

    def make(lin: nn.Linear, qcfg: dict) -> nn.Module:
        bits, group_size = qcfg.get("bits"), qcfg.get("group_size")
        if bits is None or group_size is None:
            raise QuantlabError(f"checkpoint '{ckpt_dir}': config.json has no quantization_config "
                                "with bits and group_size")
        return PackedLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, dtype)

    return load_quantized(ckpt_dir, meta, dtype, device, make)


class RTN(Backend):
    name = "rtn"
    description = "Weight-only round-to-nearest, 2-8 bits, grouped or per-channel (GPTQ layout)."
    Config = WeightQuantConfig

    def check(self, model: nn.Module) -> None:
        targets = target_linears(model, self.config.skip_list())
        check_not_tied(model, targets)
        check_layers(targets, self.config.bits, self.config.group_size)

    @torch.no_grad()
    def quantize(self, model: nn.Module, calibration: torch.Tensor | None) -> nn.Module:
        c = self.config
        names = [name for name, _ in target_linears(model, c.skip_list())]
        # by name, not holding the float layers: each is freed once its quantized copy is in
        for name in tqdm(names, desc="rtn: layers", unit="layer", leave=False, disable=None):
            lin = model.get_submodule(name)
            w = lin.weight.data
            codes, scales, zeros = quantize_matrix(w, c.bits, c.group_size, c.sym)
            g = w.shape[1] if c.group_size == -1 else c.group_size
            g_idx = torch.arange(w.shape[1], device=w.device) // g
            q = PackedLinear.from_codes(codes, scales, zeros, g_idx, c.bits, c.group_size,
                                        lin.bias, dtype=w.dtype, dense=False)
            err = (q.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
            self.layer_stats[name] = {"weight_rel_error": float(err)}
            set_module(model, name, q)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> dict:
        save_weights(model, out_dir / WEIGHTS_NAME)
        c = self.config
        return gptq_quantization_config(c.bits, c.group_size, c.sym)

    @classmethod
    def load(cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return load_packed(ckpt_dir, meta, dtype, device)
