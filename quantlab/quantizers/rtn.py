"""``rtn``: weight-only round-to-nearest quantization, the baseline every method must beat.

Each targeted linear layer's weight is split into groups of ``group_size`` input columns and
rounded to the nearest point of a uniform ``bits``-bit grid (symmetric or with a zero
point). The checkpoint uses the GPTQ v1 tensor layout (:mod:`quantlab.formats.gptq_v1`), so for 2, 3,
4 and 8 bits it is a standard ``quant_method: gptq`` checkpoint (a GPTQ without error
correction); 5-7 bits use the same layout with a ``quant_method: quantlab`` config that only
quantlab loads.

:class:`LayoutBackend` is what RTN, GPTQ and AWQ share: each produces a
:class:`~quantlab.formats.QuantizedWeight` per layer and leaves packing, writing and reading
to its layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, LayerFormat, QuantizedWeight
from quantlab.formats.gptq_v1 import GPTQ_BITS, gptq_quantization_config
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

__all__ = ["GPTQ_BITS", "RTN", "LayoutBackend", "WeightQuantConfig", "check_layers", "gptq_quantization_config",
           "load_packed"]


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


def check_layers(targets: list[tuple[str, nn.Linear]], bits: int, group_size: int,
                 layout: LayerFormat | None = None) -> None:
    """Clear errors for layers whose shape does not fit the group size or the layout
    (GPTQ v1 unless another is given)."""
    if not targets:
        raise QuantlabError("no linear layer is left to quantize: 'skip' excludes them all")
    layout = layout or LAYOUTS["gptq-v1"]
    for name, m in targets:
        if group_size != -1 and m.in_features % group_size:
            fits = [g for g in (16, 32, 64, 128, 256) if m.in_features % g == 0]
            raise QuantlabError(
                f"group_size {group_size} does not divide the input width {m.in_features} of "
                f"layer '{name}'; group sizes that fit: {', '.join(map(str, fits + [-1]))}"
            )
        why = layout.check_layer(name, m.in_features, m.out_features, bits)
        if why:
            raise QuantlabError(why)


def load_packed(ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device,
                layout: LayerFormat | None = None) -> nn.Module:
    """Rebuild a model whose quantized layers are in ``layout`` (GPTQ v1 unless given)."""
    layout = layout or LAYOUTS["gptq-v1"]

    def make(lin: nn.Linear, qcfg: dict) -> nn.Module:
        try:
            return layout.empty(lin, qcfg, dtype)
        except QuantlabError as e:
            raise QuantlabError(f"checkpoint '{ckpt_dir}': {e}") from None

    return load_quantized(ckpt_dir, meta, dtype, device, make)


class LayoutBackend(Backend):
    """A backend whose layers are stored in one of quantlab's layouts: ``save`` and ``load``
    are the layout's, so the method only produces grids (see :meth:`pack`)."""

    Config = WeightQuantConfig
    config: WeightQuantConfig

    def layout(self) -> LayerFormat:
        return LAYOUTS["gptq-v1"]

    @classmethod
    def default_layout(cls, meta: dict) -> LayerFormat:
        """The layout of a checkpoint whose sidecar does not record it."""
        return LAYOUTS["gptq-v1"]

    def pack(self, q: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype,
             dense: bool = True) -> nn.Module:
        return self.layout().pack(q, bias, dtype, dense=dense)

    def quantization_extra(self, model: nn.Module) -> dict[str, Any]:
        """Layout-specific entries of ``quantization_config`` (GPTQ's desc_act...)."""
        return {}

    def save(self, model: nn.Module, out_dir: Path) -> dict:
        save_weights(model, out_dir / WEIGHTS_NAME)
        c = self.config
        return self.layout().quantization_config(c.bits, c.group_size, c.sym, **self.quantization_extra(model))

    @classmethod
    def load(cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
        # the sidecar's layout record was checked by load_checkpoint (name known, same version)
        layout = LAYOUTS[meta["layout"]["name"]] if "layout" in meta else cls.default_layout(meta)
        return load_packed(ckpt_dir, meta, dtype, device, layout)


class RTN(LayoutBackend):
    name = "rtn"
    description = "Weight-only round-to-nearest, 2-8 bits, grouped or per-channel (GPTQ layout)."
    Config = WeightQuantConfig

    def check(self, model: nn.Module) -> None:
        targets = target_linears(model, self.config.skip_list())
        check_not_tied(model, targets)
        check_layers(targets, self.config.bits, self.config.group_size, self.layout())

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
            q = self.pack(QuantizedWeight(codes, scales, zeros, g_idx, c.bits, c.group_size), lin.bias,
                          w.dtype, dense=False)
            err = (q.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
            self.layer_stats[name] = {"weight_rel_error": float(err)}
            set_module(model, name, q)
        return model
