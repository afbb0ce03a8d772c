"""``hqq``: Half-Quadratic Quantization (Badri & Shaji 2023), calibration-free.

Each group's scale starts from its min-max range; HQQ then optimises the group's zero point
(a real number) to minimise the lp-norm (p < 1) of the weight error by half-quadratic
splitting: a proximal shrinkage step on the error, then the zero point in closed form, for
a few iterations. No calibration data, no Hessian: a per-layer cost comparable to RTN's.

The optimiser is torchao's (``optimize_weights_proximal_legacy``, the solver torchao's own
``Int4WeightOnlyConfig(int4_choose_qparams_algorithm="hqq")`` runs; torchao is the
``[torchao]`` extra, wheels only); the starting grid is set up here as HQQ sets it up. The
hqq library itself was not used: its sdist runs a CUDA extension build from ``egg_info`` and
saves metadata with ``torch.save``. torchao's public HQQ path packs 4 bits only and for its
own kernels, so quantlab calls the optimiser and stores the grid in its own layout
(:mod:`quantlab.formats.hqq`, float zero points), for 2, 3, 4 and 8 bits. Scales and zero
points are rounded to float16 (what the checkpoint stores) before the codes are taken, so
the model scored after reload is the one quantized.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, LayerFormat, QuantizedWeight
from quantlab.formats.hqq import HQQ_BITS
from quantlab.quantizers.base import (
    BackendConfig,
    QuantizeContext,
    Quantized,
    check_not_tied,
    set_module,
    skip_field,
    target_linears,
)
from quantlab.quantizers.weightonly import LayoutBackend, check_group_size, check_layers

__all__ = ["HQQBackend", "HQQConfig", "hqq_grid"]


class HQQConfig(BackendConfig):
    bits: int = Field(4, description="Bits per weight code: 2, 3, 4 or 8.")
    group_size: int = Field(
        64,
        description="Input columns per scale/zero group (HQQ's default 64); -1 for one "
        "group per output channel. Must divide every quantized layer's input width.",
    )
    sym: Literal[False] = Field(
        False, description="Always false: HQQ's zero points are optimised real numbers."
    )
    optimize: bool = Field(
        True,
        description="Run the half-quadratic optimiser (false: the min-max grid with a "
        "float zero point, HQQ's starting point).",
    )
    iters: int = Field(
        20,
        ge=1,
        le=1000,
        description="Optimiser iterations (it stops early once the error stops falling).",
    )
    lp_norm: float = Field(
        0.7,
        gt=0,
        le=1,
        description="p of the lp-norm error HQQ minimises (p < 1 favours "
        "fitting most weights exactly and letting outliers go).",
    )
    round_zero: bool | None = Field(
        None,
        description="Round each group's starting zero point to an integer "
        "(null: HQQ's default, 4 bits only). Without it no code maps to exactly 0, which "
        "costs much at 3 bits on the demo model (docs/methods.md).",
    )
    skip: list[str] | Literal["auto"] = skip_field()

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in HQQ_BITS:
            raise ValueError(
                f"bits must be one of {', '.join(map(str, HQQ_BITS))} (HQQ's widths), not {v}"
            )
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return check_group_size(v)

    def table_fields(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}


def _optimizer():
    """torchao's HQQ proximal solver (MissingDependencyError naming the extra without torchao)."""
    import importlib

    from quantlab.quantizers.int8 import _torchao

    _torchao("hqq")  # imports torchao quietly, or names the extra
    qp = importlib.import_module("torchao.quantization.quant_primitives")
    fn = getattr(qp, "optimize_weights_proximal_legacy", None)
    if fn is None:  # renamed or removed in another torchao release
        raise QuantlabError(
            "this torchao has no optimize_weights_proximal_legacy (quantlab uses torchao "
            "0.12-0.18's HQQ optimiser); pip install 'torchao>=0.12,<0.19' torch==2.13.0"
        )
    return fn


@torch.no_grad()
def hqq_grid(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    optimize: bool = True,
    iters: int = 20,
    lp_norm: float = 0.7,
    round_zero: bool | None = None,
) -> QuantizedWeight:
    """HQQ's grid of W [out, in]: codes, float16 scales and float zero points [n_groups, out].

    The start is HQQ's: each group's min-max range, its zero point rounded to an integer for 4
    bits only (``round_zero`` None; the hqq library's and torchao's default), then torchao's
    proximal solver moves the zero point."""
    proximal = _optimizer()
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    maxq = 2**bits - 1
    wg = w.float().reshape(-1, g)  # row r = (output o, group j), as HQQ's axis=1
    lo, hi = wg.min(dim=1, keepdim=True).values, wg.max(dim=1, keepdim=True).values
    inv = (maxq / (hi - lo)).clamp(max=2e4)  # HQQ's inverse scale (clamped for float16)
    zero = -lo * inv
    if bits == 4 if round_zero is None else round_zero:
        zero = torch.round(zero)
    if optimize:
        params = {
            "lp_norm": lp_norm,
            "beta": 1e1,
            "kappa": 1.01,
            "iters": iters,
            "early_stop": True,
        }
        _, inv, zero = proximal(
            tensor=wg,
            scale=inv,
            zero=zero,
            min_max=[0, maxq],
            axis=1,
            device=str(w.device),
            dtype=torch.float32,
            opt_params=params,
        )
    # [out, n_groups] -> the stored float16 values; codes taken against exactly those
    scales = (1.0 / inv).reshape(out_f, in_f // g).half().float()
    zeros = zero.reshape(out_f, in_f // g).half().float()
    g_idx = torch.arange(in_f, device=w.device) // g
    q = (
        torch.round(w.float() / scales[:, g_idx] + zeros[:, g_idx])
        .clamp(0, 2**bits - 1)
        .to(torch.int64)
    )
    return QuantizedWeight(
        q, scales.t().contiguous(), zeros.t().contiguous(), g_idx, bits, group_size
    )


class HQQBackend(LayoutBackend):
    name = "hqq"
    description = (
        "Half-Quadratic Quantization (torchao's optimiser): calibration-free, float zero points, "
        "2/3/4/8 bits (quantlab's hqq layout)."
    )
    Config = HQQConfig
    config: HQQConfig  # type: ignore[assignment]
    extra = "torchao"

    def layout(self) -> LayerFormat:
        return LAYOUTS["hqq"]

    @classmethod
    def default_layout(cls, meta: dict) -> LayerFormat:
        return LAYOUTS["hqq"]

    def check_dependencies(self) -> None:
        _optimizer()

    def check(self, model: nn.Module) -> None:
        targets = target_linears(model, self.config.skip_list())
        check_not_tied(model, targets)
        check_layers(targets, self.config.bits, self.config.group_size, self.layout())
        _optimizer()

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
        for name in tqdm(names, desc="hqq: layers", unit="layer", leave=False, disable=None):
            lin = model.get_submodule(name)
            w = lin.weight.data
            with out.stage("hqq optimiser"):
                grid = hqq_grid(
                    w, c.bits, c.group_size, c.optimize, c.iters, c.lp_norm, c.round_zero
                )
            q = self.pack(grid, lin.bias, w.dtype, dense=False)
            err = (q.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
            out.layer_stats[name] = {"weight_rel_error": float(err)}
            set_module(model, name, q)
        return model
