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
from pydantic import Field, field_validator, model_validator
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

__all__ = ["GPTQ_BITS", "RTN", "LayoutBackend", "RTNConfig", "WeightQuantConfig", "check_layers",
           "check_group_size", "gptq_quantization_config", "input_mean_squares", "load_packed", "search_clip"]


#: widths ``bits: auto`` chooses from by default: the GPTQ format's, which gptqmodel, vLLM and
#: transformers load (5-7 bits are quantlab-only; add them to bits_choices for RTN)
AUTO_CHOICES = (2, 3, 4, 8)


def check_group_size(v: int) -> int:
    """A group size option: a positive number of input columns, or -1 (one group per channel)."""
    if v != -1 and v < 1:
        raise ValueError(f"group_size must be a positive number of columns or -1 (per channel), got {v}")
    return v


class WeightQuantConfig(BackendConfig):
    """Options shared by the weight-only integer backends."""

    bits: int | Literal["auto"] = Field(
        4, description="Bits per weight code (2-8), or 'auto': a width per layer chosen under bits_budget "
        "(docs/methods.md, \"Bit allocation\").")
    bits_budget: float | None = Field(
        None, gt=0, description="bits: auto: the average stored bits per weight of the quantized linears "
        "(codes, scales, zeros and group index, as the results table's bits_per_weight counts them).")
    bits_choices: list[int] = Field(
        default_factory=lambda: list(AUTO_CHOICES), description="bits: auto: the widths a layer may get.")
    module_bits: dict[str, int] = Field(
        default_factory=dict, description="Widths of particular layers (name or glob pattern -> bits), over "
        "'bits'; bits: auto fills it with the chosen allocation (recipe.yaml shows it resolved).")
    group_size: int = Field(
        128, description="Input columns per scale/zero group; -1 for one group per output "
        "channel. Must divide every quantized layer's input width.")
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
            raise ValueError("bits: auto needs bits_budget (average stored bits per weight, e.g. 4.3)")
        if self.bits != "auto" and self.bits_budget is not None:
            raise ValueError("bits_budget applies to bits: auto; set bits: auto or remove bits_budget")
        if self.bits == "auto" and self.skip == "auto":
            raise ValueError("choose either skip: auto (which layers stay float) or bits: auto (a width per layer), "
                             "not both")
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


def mixed_quantization_config(layout: LayerFormat, widths: dict[str, int], group_size: int, sym: bool,
                              extra: dict[str, Any]) -> dict[str, Any]:
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

    def pack(self, q: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype,
             dense: bool = True) -> nn.Module:
        return self.layout().pack(q, bias, dtype, dense=dense)

    def quantization_extra(self, model: nn.Module) -> dict[str, Any]:
        """Layout-specific entries of ``quantization_config`` (GPTQ's desc_act...)."""
        return {}

    def save(self, model: nn.Module, out_dir: Path) -> dict:
        save_weights(model, out_dir / WEIGHTS_NAME)
        c = self.config
        widths = {n: model.get_submodule(n).bits for n in self.quantized_modules(model)}
        if not widths or len(set(widths.values())) == 1:
            bits = next(iter(widths.values()), c.bits if c.bits != "auto" else max(c.bits_choices))
            return self.layout().quantization_config(bits, c.group_size, c.sym, **self.quantization_extra(model))
        return mixed_quantization_config(self.layout(), widths, c.group_size, c.sym, self.quantization_extra(model))

    @classmethod
    def load(cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
        # the sidecar's layout record was checked by load_checkpoint (name known, same version)
        layout = LAYOUTS[meta["layout"]["name"]] if "layout" in meta else cls.default_layout(meta)
        return load_packed(ckpt_dir, meta, dtype, device, layout)


def check_allocation(config: WeightQuantConfig, model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> None:
    """bits: auto: a budget the widths cannot meet on this model's layers is an error naming
    the feasible range, before any work (the model may be on the meta device)."""
    if not config.allocating():
        return
    from quantlab.allocation import check_budget, fused_units

    names = [n for n, _ in targets]
    shapes = {n: (m.in_features, m.out_features) for n, m in targets}
    check_budget(config.bits_budget, config.bits_choices, config.group_size, shapes, fused_units(model, names))


class RTNConfig(WeightQuantConfig):
    scale_search: Literal["none", "mse", "importance"] = Field(
        "none", description="How each group's range is chosen before rounding: 'none' (its min and max), "
        "'mse' (the clipping of the range that minimises the group's squared weight error) or 'importance' "
        "(the same, each input column's error weighted by the mean square of that input over the calibration "
        "text, the diagonal of X^T X: llama.cpp's imatrix idea; needs calibration). Same checkpoint layout.")
    search_grid: int = Field(20, ge=2, le=200, description="Clipping ratios tried: 1, 1 - 1/n, ... down to "
                             "1 - max_shrink.")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="Largest fraction by which the search shrinks a "
                              "group's range.")


def search_clip(w: torch.Tensor, importance: torch.Tensor | None, bits: int, group_size: int, sym: bool,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) bound on |w| minimising sum_j importance_j * (w_j - q(w)_j)^2 over the
    group's columns (importance None: plain squared error); returns W clamped to its bounds.
    Bound 1 (no clipping) is a candidate, so the result is never worse than plain rounding by
    this measure."""
    from quantlab.quantizers.awq import clip_search

    in_f = w.shape[1]
    g = in_f if group_size == -1 else group_size
    imp = torch.ones(in_f, device=w.device) if importance is None else importance.float().to(w.device)
    ib = imp.view(1, in_f // g, g)
    best_max = clip_search(w, bits, group_size, sym, lambda dq: (dq * dq * ib).sum(dim=2),
                           steps=max(1, int(max_shrink * n_grid)) + 1, n_grid=n_grid)
    bound = best_max.repeat_interleave(g, dim=1)
    return torch.clamp(w.float(), -bound, bound).to(w.dtype)


@torch.no_grad()
def input_mean_squares(model: nn.Module, names: list[str], calibration: torch.Tensor,
                       batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Mean square of every input column of each named linear over the calibration windows
    (one pass of the float model; the diagonal of X^T X / tokens)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def add(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return add

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i:i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


class RTN(LayoutBackend):
    name = "rtn"
    description = ("Weight-only round-to-nearest, 2-8 bits, grouped or per-channel (GPTQ layout); optionally "
                   "with a clipping search weighted by input importance.")
    Config = RTNConfig
    config: RTNConfig

    def __init__(self, config: WeightQuantConfig | None = None):
        # the shared options alone (WeightQuantConfig) are RTN's with its defaults
        if config is not None and not isinstance(config, RTNConfig):
            config = RTNConfig(**config.model_dump())
        super().__init__(config)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        # bits: auto measures each layer's sensitivity on calibration windows
        return self.config.scale_search == "importance" or self.config.allocating()

    def check(self, model: nn.Module) -> None:
        targets = target_linears(model, self.config.skip_list())
        check_not_tied(model, targets)
        for bits in self.config.widths():
            check_layers(targets, bits, self.config.group_size, self.layout())
        check_allocation(self.config, model, targets)

    @torch.no_grad()
    def quantize(self, model: nn.Module, calibration: torch.Tensor | None) -> nn.Module:
        c = self.config
        names = [name for name, _ in target_linears(model, c.skip_list())]
        importance = {}
        if c.scale_search == "importance":
            if calibration is None:
                raise QuantlabError("rtn with scale_search: importance needs calibration data")
            with self.stage("input statistics"):
                importance = input_mean_squares(model, names, calibration)
        # by name, not holding the float layers: each is freed once its quantized copy is in
        for name in tqdm(names, desc="rtn: layers", unit="layer", leave=False, disable=None):
            lin = model.get_submodule(name)
            w = lin.weight.data
            if c.scale_search != "none":
                with self.stage("clip search"):
                    w = search_clip(w, importance.get(name), c.bits_for(name), c.group_size, c.sym, c.search_grid,
                                    c.max_shrink)
            bits = c.bits_for(name)
            codes, scales, zeros = quantize_matrix(w, bits, c.group_size, c.sym)
            g = w.shape[1] if c.group_size == -1 else c.group_size
            g_idx = torch.arange(w.shape[1], device=w.device) // g
            q = self.pack(QuantizedWeight(codes, scales, zeros, g_idx, bits, c.group_size), lin.bias,
                          w.dtype, dense=False)
            w = lin.weight.data  # the error against the float weight, not the clipped one
            err = (q.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
            self.layer_stats[name] = {"weight_rel_error": float(err)}
            set_module(model, name, q)
        return model
