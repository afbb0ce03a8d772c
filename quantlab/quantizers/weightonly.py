"""What the weight-only integer backends (RTN, GPTQ, AWQ, HQQ) share: their options
(:class:`WeightQuantConfig`), the checks of a model's layers against a group size and a layout,
and :class:`LayoutBackend`, a backend whose layers are stored in one of quantlab's layouts
(:mod:`quantlab.formats`): the method produces a :class:`~quantlab.formats.QuantizedWeight` per
layer and leaves packing, writing and reading to the layout.

Methods import this module; it imports formats and the backend interface, never a method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, GridSpec, LayerFormat, QuantizedWeight
from quantlab.formats.gptq_v1 import GPTQ_BITS
from quantlab.quantizers.base import (
    WEIGHTS_NAME,
    Backend,
    BackendConfig,
    Quantized,
    load_quantized,
    save_weights,
    skip_field,
)

#: widths ``bits: auto`` chooses from by default: the GPTQ format's, which gptqmodel, vLLM and
#: transformers load (5-7 bits are quantlab-only; add them to bits_choices for RTN)
AUTO_CHOICES = (2, 3, 4, 8)


def check_group_size(v: int) -> int:
    """A group size option: a positive number of input columns, or -1 (one group per channel)."""
    if v != -1 and v < 1:
        raise ValueError(
            f"group_size must be a positive number of columns or -1 (per channel), got {v}"
        )
    return v


class WeightQuantConfig(BackendConfig):
    """Options shared by the weight-only integer backends."""

    bits: int | Literal["auto"] = Field(
        4,
        description="Bits per weight code (2-8), or 'auto': a width per layer chosen under "
        "bits_budget "
        '(docs/methods.md, "Bit allocation").',
    )
    bits_budget: float | None = Field(
        None,
        gt=0,
        description="bits: auto: the average stored bits per weight of the quantized linears "
        "(codes, scales, zeros and group index, as the results table's bits_per_weight counts "
        "them).",
    )
    bits_choices: list[int] = Field(
        default_factory=lambda: list(AUTO_CHOICES),
        description="bits: auto: the widths a layer may get.",
    )
    module_bits: dict[str, int] = Field(
        default_factory=dict,
        description="Widths of particular layers (name or glob pattern -> bits), over "
        "'bits'; bits: auto fills it with the chosen allocation (recipe.yaml shows it resolved).",
    )
    group_size: int = Field(
        128,
        description="Input columns per scale/zero group; -1 for one group per output "
        "channel. Must divide every quantized layer's input width.",
    )
    sym: bool = Field(True, description="Symmetric grid (fixed zero point) or asymmetric.")
    skip: list[str] | Literal["auto"] = skip_field()

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, v):
        if v != "auto" and not 2 <= v <= 8:
            raise ValueError(f"bits must be 2-8 or 'auto', not {v}")
        return v

    @field_validator("bits_choices")
    @classmethod
    def _choices(cls, v: list[int]) -> list[int]:
        if not v or any(not 2 <= b <= 8 for b in v):
            raise ValueError(f"bits_choices must be widths of 2-8 bits, not {v}")
        return sorted(set(v))

    @field_validator("module_bits")
    @classmethod
    def _module_bits(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: b for k, b in v.items() if not 2 <= b <= 8}
        if bad:
            raise ValueError(f"module_bits widths must be 2-8 bits: {bad}")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.bits == "auto" and self.bits_budget is None:
            raise ValueError(
                "bits: auto needs bits_budget (average stored bits per weight, e.g. 4.3)"
            )
        if self.bits != "auto" and self.bits_budget is not None:
            raise ValueError(
                "bits_budget applies to bits: auto; set bits: auto or remove bits_budget"
            )
        if self.bits == "auto" and self.skip == "auto":
            raise ValueError(
                "choose either skip: auto (which layers stay float) or bits: auto (a width per "
                "layer), not both"
            )
        return self

    def allocating(self) -> bool:
        """bits: auto whose allocation is still to be chosen."""
        return self.bits == "auto" and not self.module_bits

    def bits_for(self, name: str) -> int:
        """The width of layer ``name``: module_bits (exact name, then the first matching
        pattern), else bits."""
        from fnmatch import fnmatchcase

        if name in self.module_bits:
            return self.module_bits[name]
        for pattern, b in self.module_bits.items():
            if fnmatchcase(name, pattern):
                return b
        if self.bits == "auto":
            raise QuantlabError(f"layer '{name}' has no width: bits: auto was not allocated")
        return self.bits

    def widths(self) -> list[int]:
        """Every width a layer may get."""
        base = self.bits_choices if self.bits == "auto" else [self.bits]
        return sorted(set(base) | set(self.module_bits.values()))

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return check_group_size(v)

    def table_fields(self) -> dict[str, Any]:
        # several widths: the results table reports the mean code width of the layers
        mixed = self.bits == "auto" or bool(self.module_bits)
        return {"bits": None if mixed else self.bits, "group_size": self.group_size}


def check_layers(
    targets: list[tuple[str, nn.Linear]],
    bits: int,
    group_size: int,
    layout: LayerFormat | None = None,
) -> None:
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


def load_packed(
    ckpt_dir: Path,
    meta: dict,
    dtype: torch.dtype,
    device: torch.device,
    layout: LayerFormat | None = None,
) -> nn.Module:
    """Rebuild a model whose quantized layers are in ``layout`` (GPTQ v1 unless given)."""
    layout = layout or LAYOUTS["gptq-v1"]

    def make(lin: nn.Linear, qcfg: dict) -> nn.Module:
        try:
            return layout.empty(lin, qcfg, dtype)
        except QuantlabError as e:
            raise QuantlabError(f"checkpoint '{ckpt_dir}': {e}") from None

    return load_quantized(ckpt_dir, meta, dtype, device, make)


def mixed_quantization_config(
    layout: LayerFormat, widths: dict[str, int], group_size: int, sym: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    """Layers of several widths: the most common width as ``bits`` and gptqmodel's ``dynamic``
    per-module overrides (``{"+:^NAME$": {"bits": b}}``) for the others. With a 5-7-bit layer
    the config says ``quant_method: quantlab`` (no GPTQ loader packs those widths)."""
    import re
    from collections import Counter

    base = Counter(widths.values()).most_common(1)[0][0]
    odd = [b for b in widths.values() if b not in GPTQ_BITS]
    qcfg = layout.quantization_config(odd[0] if odd else base, group_size, sym, **extra)
    qcfg["bits"] = base
    qcfg["dynamic"] = {f"+:^{re.escape(n)}$": {"bits": b} for n, b in widths.items() if b != base}
    return qcfg


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

    def grid(self) -> GridSpec:
        c = self.config
        widths = c.widths() if hasattr(c, "widths") else [c.bits]
        return GridSpec(frozenset(widths), c.sym, c.group_size)

    def pack(
        self, q: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype, dense: bool = True
    ) -> nn.Module:
        return self.layout().pack(q, bias, dtype, dense=dense)

    def quantization_extra(self, model: nn.Module) -> dict[str, Any]:
        """Layout-specific entries of ``quantization_config`` (GPTQ's desc_act...)."""
        return {}

    def save(self, quantized: Quantized, out_dir: Path) -> dict:
        model = quantized.model
        save_weights(model, out_dir / WEIGHTS_NAME)
        c = self.config
        widths = {n: model.get_submodule(n).bits for n in self.quantized_modules(model)}
        if not widths or len(set(widths.values())) == 1:
            bits = next(iter(widths.values()), c.bits if c.bits != "auto" else max(c.bits_choices))
            return self.layout().quantization_config(
                bits, c.group_size, c.sym, **self.quantization_extra(model)
            )
        return mixed_quantization_config(
            self.layout(), widths, c.group_size, c.sym, self.quantization_extra(model)
        )

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        # the sidecar's layout record was checked by load_checkpoint (name known, same version)
        layout = LAYOUTS[meta["layout"]["name"]] if "layout" in meta else cls.default_layout(meta)
        return load_packed(ckpt_dir, meta, dtype, device, layout)


def check_allocation(
    config: WeightQuantConfig, model: nn.Module, targets: list[tuple[str, nn.Linear]]
) -> None:
    """bits: auto: a budget the widths cannot meet on this model's layers is an error naming
    the feasible range, before any work (the model may be on the meta device)."""
    if not config.allocating():
        return
    from quantlab.allocation import check_budget, fused_units

    names = [n for n, _ in targets]
    shapes = {n: (m.in_features, m.out_features) for n, m in targets}
    check_budget(
        config.bits_budget,
        config.bits_choices,
        config.group_size,
        shapes,
        fused_units(model, names),
    )
