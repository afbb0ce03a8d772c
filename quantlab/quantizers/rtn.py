"""``rtn``: weight-only round-to-nearest quantization, the baseline every method must beat.

Each targeted linear layer's weight is split into groups of ``group_size`` input columns and
rounded to the nearest point of a uniform ``bits``-bit grid (symmetric or with a zero
point). The checkpoint uses the GPTQ v1 tensor layout (:mod:`quantlab.formats.gptq_v1`), so
for 2, 3, 4 and 8 bits it is a standard ``quant_method: gptq`` checkpoint (a GPTQ without error
correction); 5-7 bits use the same layout with a ``quant_method: quantlab`` config that only
quantlab loads.

What RTN shares with GPTQ, AWQ and HQQ (options, layer checks, the layout-backed backend) lives
in :mod:`quantlab.quantizers.weightonly`.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.formats import QuantizedWeight
from quantlab.grid import clip_search, quantize_matrix
from quantlab.quantizers.base import (
    QuantizeContext,
    Quantized,
    check_not_tied,
    set_module,
    target_linears,
)
from quantlab.quantizers.weightonly import (
    LayoutBackend,
    WeightQuantConfig,
    check_allocation,
    check_layers,
)


class RTNConfig(WeightQuantConfig):
    scale_search: Literal["none", "mse", "importance"] = Field(
        "none",
        description="How each group's range is chosen before rounding: 'none' (its min and max), "
        "'mse' (the clipping of the range that minimises the group's squared weight error) or "
        "'importance' (the same, each input column's error weighted by the mean square of that "
        "input over the calibration text, the diagonal of X^T X: llama.cpp's imatrix idea; needs "
        "calibration). Same checkpoint layout.",
    )
    search_grid: int = Field(
        20,
        ge=2,
        le=200,
        description="Clipping ratios tried: 1, 1 - 1/n, ... down to 1 - max_shrink.",
    )
    max_shrink: float = Field(
        0.5, gt=0, lt=1, description="Largest fraction by which the search shrinks a group's range."
    )


def search_clip(
    w: torch.Tensor,
    importance: torch.Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Per (row, group) bound on |w| minimising sum_j importance_j * (w_j - q(w)_j)^2 over the
    group's columns (importance None: plain squared error); returns W clamped to its bounds.
    Bound 1 (no clipping) is a candidate, so the result is never worse than plain rounding by
    this measure."""
    in_f = w.shape[1]
    g = in_f if group_size == -1 else group_size
    imp = (
        torch.ones(in_f, device=w.device) if importance is None else importance.float().to(w.device)
    )
    ib = imp.view(1, in_f // g, g)
    best_max = clip_search(
        w,
        bits,
        group_size,
        sym,
        lambda dq: (dq * dq * ib).sum(dim=2),
        steps=max(1, int(max_shrink * n_grid)) + 1,
        n_grid=n_grid,
    )
    bound = best_max.repeat_interleave(g, dim=1)
    return torch.clamp(w.float(), -bound, bound).to(w.dtype)


@torch.no_grad()
def input_mean_squares(
    model: nn.Module, names: list[str], calibration: torch.Tensor, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Mean square of every input column of each named linear over the calibration windows
    (one pass of the float model; the diagonal of X^T X / tokens)."""
    with column_mean_squares({n: model.get_submodule(n) for n in names}) as means:
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i : i + batch_size], use_cache=False)
    return means


@contextlib.contextmanager
def column_mean_squares(modules: dict[str, nn.Module]):
    """While open, sum x² per input column of each module's inputs (batch by batch, in
    order); on exit the yielded dict holds each module's mean over every token seen."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    means: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield means
    finally:
        for h in handles:
            h.remove()
    means.update({n: sums[n] / counts[n] for n in modules})


class RTN(LayoutBackend):
    name = "rtn"
    description = (
        "Weight-only round-to-nearest, 2-8 bits, grouped or per-channel (GPTQ layout); optionally "
        "with a clipping search weighted by input importance."
    )
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
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        c = self.config
        names = [name for name, _ in target_linears(model, c.skip_list())]
        importance = {}
        if c.scale_search == "importance":
            if calibration is None:
                raise QuantlabError("rtn with scale_search: importance needs calibration data")
            with out.stage("input statistics"):
                importance = input_mean_squares(model, names, calibration)
        # by name, not holding the float layers: each is freed once its quantized copy is in
        for name in tqdm(names, desc="rtn: layers", unit="layer", leave=False, disable=None):
            lin = model.get_submodule(name)
            w = lin.weight.data
            if c.scale_search != "none":
                with out.stage("clip search"):
                    w = search_clip(
                        w,
                        importance.get(name),
                        c.bits_for(name),
                        c.group_size,
                        c.sym,
                        c.search_grid,
                        c.max_shrink,
                    )
            bits = c.bits_for(name)
            codes, scales, zeros = quantize_matrix(w, bits, c.group_size, c.sym)
            g = w.shape[1] if c.group_size == -1 else c.group_size
            g_idx = torch.arange(w.shape[1], device=w.device) // g
            q = self.pack(
                QuantizedWeight(codes, scales, zeros, g_idx, bits, c.group_size),
                lin.bias,
                w.dtype,
                dense=False,
            )
            w = lin.weight.data  # the error against the float weight, not the clipped one
            err = (q.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
            out.layer_stats[name] = {"weight_rel_error": float(err)}
            set_module(model, name, q)
        return model
