"""``w8a8``: INT8 weights and INT8 activations, as vLLM computes them, stored in
compressed-tensors' ``int-quantized`` format (the checkpoint vLLM loads natively).

- weights: one symmetric scale per output channel, ``scale = max|W_row| / 127``, codes
  ``round(W / scale)`` in [-127, 127];
- activations: quantized at run time, one symmetric scale per token, ``max|x_token| / 127``
  (vLLM's dynamic per-token int8);
- the product: int8 x int8 summed in int32 (``torch._int_mm``), then ``acc * s_x * s_w``.

``smoothquant: alpha`` (Xiao et al. 2023) first moves activation outliers into the weights:
per input channel j of the linears fed by an RMSNorm, ``s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha)`` (max|X_j| over the calibration windows, max|W_j| over the column j of
every linear the norm feeds), the norm's weight divided by s and the linears' columns
multiplied by it: the float model computes the same function, and per-token int8 loses less
on the outlier channels. Linears with no norm in front (o_proj, down_proj) stay unsmoothed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.compressed_tensors import int8_quantization_config
from quantlab.quantizers.arch import arch_spec
from quantlab.quantizers.base import (
    WEIGHTS_NAME,
    Backend,
    BackendConfig,
    QuantizeContext,
    Quantized,
    load_quantized,
    quantizable_linears,
    save_weights,
    set_module,
    skip_field,
)

QMAX = 127
#: the smallest scale: an all-zero row or token quantizes to zeros instead of dividing by 0
MIN_SCALE = 1e-10


# --------------------------------------------------------------------------- arithmetic


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x [..., k] -> (codes int8 [..., k], scales float32 [..., 1]);
    x ~= codes * scales. Weights (rows = output channels) and activations (rows = tokens)."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(MIN_SCALE)
    codes = torch.round(x / scale).clamp(-QMAX - 1, QMAX).to(torch.int8)
    return codes, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 product: a int8 [m, k] @ b int8 [k, n] -> int32 [m, n]; ``torch._int_mm``
    (int32 accumulation) where the build and device take it, else :func:`int8_matmul_float64`."""
    try:
        return torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError):  # a device or shape _int_mm does not take
        return int8_matmul_float64(a, b)


def int8_matmul_float64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact fallback: sums in float64, whose 53-bit mantissa holds every such sum exactly
    (|a_i * b_i| <= 2^14, so any k < 2^39). float32 would not: its 24-bit mantissa rounds
    sums past 2^24, which 1040 products of 127 x 127 already reach (hidden sizes are larger)."""
    return (a.double() @ b.double()).round().to(torch.int32)


class W8A8Linear(nn.Module):
    """A linear layer with int8 weights (``weight`` [out, in], ``weight_scale`` [out, 1]:
    compressed-tensors' names) whose input is quantized per token at run time."""

    kernel = "int8-int32acc"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), False) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear) -> W8A8Linear:
        return cls(
            linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype
        )

    @classmethod
    def from_float(cls, linear: nn.Linear) -> W8A8Linear:
        q = cls.like(linear)
        q.weight, q.weight_scale = quantize_rows(linear.weight.detach())
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, self.in_features))  # [tokens, in], [tokens, 1]
        acc = int8_matmul(xq, self.weight.t())  # [tokens, out] int32, exact
        y = acc.float() * xs * self.weight_scale.view(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


# --------------------------------------------------------------------------- SmoothQuant


def norm_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm, the linears it feeds) of every decoder layer whose architecture spec folds
    scales into a norm (a 1-d ``weight`` scaling the normalized input: RMSNorm)."""
    spec = arch_spec(model)
    if not spec.layers:
        return []
    groups = []
    for li in range(len(model.get_submodule(spec.layers))):
        prefix = f"{spec.layers}.{li}."
        for g in spec.scale_groups:
            prev = model.get_submodule(prefix + g.prev)
            w = getattr(prev, "weight", None)
            if isinstance(prev, nn.Linear) or w is None or w.dim() != 1:
                continue
            if getattr(prev, "bias", None) is not None:
                continue  # LayerNorm's bias would need the same division: not folded here
            groups.append((prefix + g.prev, [prefix + n for n in g.linears]))
    return groups


@torch.no_grad()
def activation_maxima(
    model: nn.Module, names: list[str], calibration: torch.Tensor, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of each named module over the calibration windows."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name):
        def collect(module, args):
            m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)

        return collect

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for batch in calibration.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return maxima


def smooth_factors(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), W_j the column j of every
    weight (stacked); clamped away from 0 as the paper's code does."""
    w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp_min(1e-5)
    return (x_max.clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """norm(x) / s feeds linears whose columns are multiplied by s: the same function."""
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))


# --------------------------------------------------------------------------- backend


class W8A8Config(BackendConfig):
    smoothquant: float | None = Field(
        None,
        ge=0,
        le=1,
        description="SmoothQuant's migration strength alpha in [0, 1] (0.5 is the paper's "
        "default), or null: no smoothing. Per input channel j of the linears an RMSNorm feeds "
        "(q/k/v, gate/up), s_j = max|X_j|^alpha / max|W_j|^(1-alpha) from the calibration "
        "windows, folded into the norm's weight; needs calibration.",
    )
    skip: list[str] | Literal["auto"] = skip_field()

    def table_fields(self) -> dict[str, Any]:
        return {"bits": 8}


class W8A8(Backend):
    name = "w8a8"
    description = (
        "INT8 weights per channel, INT8 activations per token (dynamic), optional SmoothQuant; "
        "compressed-tensors int-quantized checkpoints (vLLM's W8A8)."
    )
    Config = W8A8Config
    replaces_only = False  # smoothquant also rescales the norms in front of the linears

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.smoothquant is not None

    def check(self, model: nn.Module) -> None:
        quantizable_linears(model, self.config.skip_list())
        if self.config.smoothquant is not None and not norm_groups(model):
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise QuantlabError(
                f"w8a8 smoothquant: a '{kind}' model has no norm quantlab can fold smoothing "
                "factors into (known: llama, mistral, qwen2, qwen3); set smoothquant: null"
            )

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        self.check(model)
        if self.config.smoothquant is not None:
            if calibration is None:
                raise QuantlabError("w8a8 smoothquant needs calibration data")
            self._smooth(model, calibration, out)
        with out.stage("quantize"):
            for name, lin in quantizable_linears(model, self.config.skip_list()):
                set_module(model, name, W8A8Linear.from_float(lin))
        return model

    def _smooth(self, model: nn.Module, calibration: torch.Tensor, out: Quantized) -> None:
        from quantlab.log import log

        groups = norm_groups(model)
        with out.stage("activation statistics"):
            x_max = activation_maxima(model, [lins[0] for _, lins in groups], calibration)
        smoothed = set()
        with out.stage("smoothing"):
            for norm, names in groups:
                linears = [model.get_submodule(n) for n in names]
                s = smooth_factors(
                    x_max[names[0]], [lin.weight for lin in linears], self.config.smoothquant
                )
                fold_smoothing(model.get_submodule(norm), linears, s)
                smoothed.update(names)
                for n in names:
                    out.layer_stats[n] = {
                        "smooth_min": float(s.min()),
                        "smooth_max": float(s.max()),
                    }
        targets = [n for n, _ in quantizable_linears(model, self.config.skip_list())]
        left = sorted({n.rsplit(".", 1)[-1] for n in targets if n not in smoothed})
        log(
            f"w8a8: smoothquant alpha {self.config.smoothquant} folded into {len(groups)} norms "
            f"({len(smoothed)} linears); no norm in front, left unsmoothed: {', '.join(left)}"
        )

    def quantized_modules(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, W8A8Linear)]

    def save(self, quantized: Quantized, out_dir: Path) -> dict:
        model = quantized.model
        save_weights(model, Path(out_dir) / WEIGHTS_NAME)
        floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return int8_quantization_config(floats)

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        return load_quantized(ckpt_dir, meta, dtype, device, lambda lin, _: W8A8Linear.like(lin))
