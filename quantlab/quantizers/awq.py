"""``awq``: AWQ (Lin et al., 2023), quantlab's own implementation in pure PyTorch.

For each group of linears that read the same input (q/k/v after the attention norm, gate/up
after the MLP norm, down after up, o after v when their widths match), a per-input-channel
scale s is searched on a grid: s = mean|x|^a / mean|w|^(1-a) ("duo scaling", or mean|x|^a
alone), a in {0, 1/n, ..., (n-1)/n}, plus s = 1 (no scaling), normalised so that
max(s) * min(s) = 1. Each candidate is scored by the squared error of the linears' outputs
when W * s is quantized and the input is x / s; the best is folded into the model (the
preceding norm's weight or linear's output rows divided by s, the linears' columns
multiplied by s), which leaves the float model's function unchanged. Then, optionally,
each weight group's clipping range is searched (shrinking max|w| by up to ``max_shrink``),
q/k excepted as in the reference implementation. Finally every linear is quantized
round-to-nearest with zero points.

Departures from the reference code, for CPU speed: the search objective is the outputs of
the scaled linears themselves (not of the whole attention or MLP block), and it is computed
exactly from the inputs' second moment Sigma = X^T X / t (mean squared output error of a
weight error dW = sum((dW Sigma) * dW) / out) over a seeded random subset of
``search_tokens`` calibration tokens, instead of a matmul over the tokens per candidate;
mean|x| uses every token. The clipping search scores each group on its diagonal block of Sigma.

Checkpoints: the AutoAWQ "gemm" layout (:mod:`quantlab.formats.awq_gemm`, 4 bits); or, with
``format: gptq`` (any of 2/3/4/8 bits), the GPTQ v1 layout (:mod:`quantlab.formats.gptq_v1`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, LayerFormat, QuantizedWeight, drop_dense_weights
from quantlab.formats.gptq_v1 import GPTQ_BITS
from quantlab.grid import clip_search, fake_quant, quantize_matrix
from quantlab.quantizers.arch import arch_spec, decoder_layers
from quantlab.quantizers.base import (
    QuantizeContext,
    Quantized,
    check_not_tied,
    set_module,
    target_linears,
)
from quantlab.quantizers.sequential import first_layer_inputs, input_hooks, layer_output, run_layer
from quantlab.quantizers.weightonly import (
    LayoutBackend,
    WeightQuantConfig,
    check_allocation,
    check_layers,
)

# --------------------------------------------------------------------------- algorithm core


def awq_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int, duo_scaling: bool):
    """The scale vectors AWQ tries, identity first: list of [in] tensors."""
    cands = [torch.ones_like(x_mean)]
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4) if duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        cands.append(s)
    return cands


def gram(x: torch.Tensor) -> torch.Tensor:
    """Second moment of inputs x [t, in]: X^T X / t [in, in]. The mean squared output error
    of any weight error dW is then sum((dW @ gram) * dW) / out, without touching x again."""
    x = x.float()
    return x.t() @ x / x.shape[0]


def output_mse(dw: torch.Tensor, sigma: torch.Tensor) -> float:
    """mean over tokens and outputs of (x @ dW^T)^2, from the input second moment."""
    return float(((dw @ sigma) * dw).sum() / dw.shape[0])


def awq_search_scales(
    w: torch.Tensor,
    sigma: torch.Tensor,
    x_mean: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    duo_scaling: bool = True,
):
    """Best input-channel scales for the linears stacked in W [out, in] whose inputs have
    second moment ``sigma`` [in, in] (see :func:`gram`) and mean |x| ``x_mean`` [in].

    The objective of a candidate s is the mean squared error of the linears' outputs when the
    weights are W * s quantized and the inputs x / s. Returns (scales [in], losses
    [n_grid + 1]); losses[0] is no scaling, and the returned scales are those of the smallest
    loss, so they are never worse than no scaling."""
    w = w.float()
    g = w.shape[1] if group_size == -1 else group_size
    wn = w.abs().view(w.shape[0], -1, g)
    w_mean = (wn / wn.amax(dim=2, keepdim=True).clamp(min=1e-12)).view_as(w).mean(dim=0)
    losses, best, best_loss = [], None, float("inf")
    for s in awq_candidates(x_mean.float(), w_mean, n_grid, duo_scaling):
        wq = fake_quant(w * s, bits, group_size, sym) / s
        loss = output_mse(wq - w, sigma)
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = s, loss
    return best, torch.tensor(losses)


def awq_search_clip(
    w: torch.Tensor,
    sigma: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Per (row, group) clipping bound of W [out, in] minimising that group's share of the
    output error, (dW_g) Sigma_gg (dW_g)^T with Sigma_gg the group's diagonal block of the
    input second moment ``sigma``. Returns max_val [out, n_groups]."""
    in_f = w.shape[1]
    g = in_f if group_size == -1 else group_size
    blocks = torch.stack(
        [sigma[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(in_f // g)]
    )  # [ng, g, g]
    return clip_search(
        w,
        bits,
        group_size,
        sym,
        lambda dq: torch.einsum("ong,ngh,onh->on", dq, blocks, dq),
        steps=max(1, int(max_shrink * n_grid)),
        n_grid=n_grid,
    )


# --------------------------------------------------------------------------- backend


class AWQConfig(WeightQuantConfig):
    version = 1
    sym: bool = Field(
        False, description="Symmetric grid; AWQ's default is asymmetric (zero_point: true)."
    )
    n_grid: int = Field(20, ge=1, le=200, description="Grid points of the scale search.")
    duo_scaling: bool = Field(True, description="s = mean|x|^a / mean|w|^(1-a) (else mean|x|^a).")
    clip: bool = Field(True, description="Search each weight group's clipping range after scaling.")
    clip_grid: int = Field(20, ge=1, description="Grid points of the clipping search.")
    max_shrink: float = Field(
        0.5, gt=0, lt=1, description="Largest fraction by which clipping shrinks max|w|."
    )
    search_tokens: int = Field(
        8192,
        ge=64,
        description="Calibration tokens (seeded random subset) whose input "
        "second moment the scale and clipping searches score on.",
    )
    seed: int = Field(0, description="Seed of the token subsets.")
    batch_size: int = Field(8, ge=1, description="Calibration windows per forward pass.")
    next_inputs: Literal["float", "quantized"] = Field(
        "float",
        description="What the next layer is calibrated on: 'float', this layer's float outputs "
        "from the statistics pass (one pass per layer, as the reference AutoAWQ does), or 'quantized', "
        "its outputs after quantization (a second pass per layer, ~1.6x the time; errors propagate as "
        "at inference).",
    )
    format: Literal["gemm", "gptq"] = Field(
        "gemm",
        description="Checkpoint layout: 'gemm' (AutoAWQ, 4 bits only) or 'gptq' (GPTQ v1, 2/3/4/8 bits).",
    )

    @model_validator(mode="after")
    def _format_bits(self) -> AWQConfig:
        if self.format == "gemm" and self.widths() != [4]:
            raise ValueError(
                f"the AWQ gemm format stores 4-bit weights only (got widths {self.widths()}); use "
                "format: gptq for 2, 3 or 8 bits or for several widths (bits: auto, module_bits)"
            )
        why = LAYOUTS["awq-gemm"].check(4, self.sym) if self.format == "gemm" else None
        if why:
            raise ValueError(why)
        odd = [b for b in self.widths() if b not in GPTQ_BITS]
        if self.format == "gptq" and odd:
            raise ValueError(
                f"format gptq stores {', '.join(map(str, GPTQ_BITS))} bits (got {', '.join(map(str, odd))})"
            )
        return self


def fold_scales(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide the output of ``prev`` (a norm or a linear) by s."""
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    elif hasattr(prev, "weight") and prev.weight is not None and prev.weight.dim() == 1:
        prev.weight.data.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    else:
        raise QuantlabError(f"AWQ cannot fold scales into a {type(prev).__name__}")


class AWQ(LayoutBackend):
    name = "awq"
    description = "AWQ (Lin et al. 2023), quantlab's PyTorch implementation; AutoAWQ gemm or GPTQ checkpoints."
    Config = AWQConfig
    needs_calibration = True
    replaces_only = False  # it also rescales the norms and layers in front of the quantized ones

    def check(self, model: nn.Module) -> None:
        c = self.config
        targets = target_linears(model, c.skip_list())
        check_not_tied(model, targets)
        for bits in c.widths():
            check_layers(targets, bits, c.group_size, self.layout())
        check_allocation(c, model, targets)
        spec = arch_spec(model)
        decoder_layers(model, spec)
        if not spec.scale_groups:
            raise QuantlabError(
                f"AWQ does not know how to fold scales in a '{model.config.model_type}' "
                "model (no scale groups for this architecture)"
            )

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        if calibration is None:
            raise QuantlabError("awq needs calibration data")
        c = self.config
        spec = arch_spec(model)
        layers = decoder_layers(model, spec)
        targets = dict(target_linears(model, c.skip_list()))
        with out.stage("capture inputs"):
            hidden, kwargs = first_layer_inputs(model, layers, calibration, c.batch_size)
        gen = torch.Generator().manual_seed(c.seed)
        n_tok = sum(h.shape[0] * h.shape[1] for h in hidden)
        pick = torch.randperm(n_tok, generator=gen)[: c.search_tokens].sort().values
        for li, layer in enumerate(
            tqdm(layers, desc="awq: layers", unit="layer", leave=False, disable=None)
        ):
            prefix = f"{spec.layers}.{li}."
            # taken out of `targets`, so each float layer is freed once its quantized copy is in
            mine = {
                n[len(prefix) :]: targets.pop(n)
                for n in [n for n in targets if n.startswith(prefix)]
            }
            sig, x_mean, float_out = self._statistics(layer, mine, hidden, kwargs, pick, n_tok, out)
            self._scale(layer, spec, mine, sig, x_mean, prefix, out)
            self._quantize_linears(layer, mine, sig, prefix, out)
            if c.next_inputs == "float":
                hidden = float_out
            else:
                with out.stage("quantized pass"):
                    hidden = run_layer(layer, hidden, kwargs)
            drop_dense_weights(layer)
        return model

    def _statistics(
        self, layer, mine: dict, hidden, kwargs, pick: torch.Tensor, n_tok: int, rec: Quantized
    ):
        """One pass through ``layer``: per distinct input, mean |x| over all tokens and the
        second moment over the ``pick`` subset; and the layer's float outputs (when the next
        layer calibrates on them). Returns (sigma by name, mean |x| by name, outputs)."""
        abs_sum: dict[str, torch.Tensor] = {}
        chunks: dict[str, list[torch.Tensor]] = {n: [] for n in mine}
        offset = [0]

        def collect(name, x):
            x = x.reshape(-1, x.shape[-1]).float()
            abs_sum[name] = abs_sum.get(name, 0) + x.abs().sum(dim=0)
            lo = offset[0]
            sel = pick[(pick >= lo) & (pick < lo + x.shape[0])] - lo
            chunks[name].append(x[sel.to(x.device)])

        float_out = []
        with rec.stage("statistics pass"), input_hooks(mine, collect) as seen:
            for h, kw in zip(hidden, kwargs):
                seen.clear()
                out = layer_output(layer(h, **kw))
                if self.config.next_inputs == "float":
                    float_out.append(out)
                offset[0] += h.shape[0] * h.shape[1]
        # one second moment per distinct input (q/k/v share one, gate/up another)
        sig: dict[str, torch.Tensor] = {}
        for n in mine:
            twin = next((m for m in sig if torch.equal(chunks[m][0], chunks[n][0])), None)
            sig[n] = sig[twin] if twin else gram(torch.cat(chunks[n]))
        return sig, {n: abs_sum[n] / n_tok for n in mine}, float_out

    def _scale(
        self, layer, spec, mine: dict, sig: dict, x_mean: dict, prefix: str, rec: Quantized
    ) -> None:
        """Search and fold the input-channel scales of each scale group of ``layer``."""
        c = self.config
        for sg in spec.scale_groups:
            names = [n for n in sg.linears if n in mine]
            if len(names) != len(sg.linears):
                continue  # part of the group is skipped: scaling it would change float layers
            prev = layer.get_submodule(sg.prev)
            width = mine[names[0]].in_features
            if isinstance(prev, nn.Linear) and prev.out_features != width:
                continue  # e.g. v_proj -> o_proj under grouped-query attention
            w_cat = torch.cat([mine[n].weight.data for n in names])
            with rec.stage("scale search"):
                s, losses = awq_search_scales(
                    w_cat,
                    sig[names[0]],
                    x_mean[names[0]],
                    c.bits_for(prefix + names[0]),
                    c.group_size,
                    c.sym,
                    c.n_grid,
                    c.duo_scaling,
                )
            fold_scales(prev, s)
            for n in names:
                mine[n].weight.data.mul_(s.view(1, -1).to(mine[n].weight.dtype))
                # inputs become x / s: their second moment Sigma / (s s^T)
                sig[n] = sig[n] / (s.view(-1, 1) * s.view(1, -1))
                rec.layer_stats[prefix + n] = {
                    "awq_loss_identity": float(losses[0]),
                    "awq_loss_best": float(losses.min()),
                    "awq_best_grid_index": int(losses.argmin()),
                }

    def _quantize_linears(self, layer, mine: dict, sig: dict, prefix: str, rec: Quantized) -> None:
        """Clip (optionally) and round each linear of ``layer`` to its grid; swap them in."""
        c = self.config
        for n, lin in mine.items():
            w = lin.weight.data
            g = w.shape[1] if c.group_size == -1 else c.group_size
            bits = c.bits_for(prefix + n)
            if c.clip and not any(k in n for k in ("q_proj", "k_proj")):
                with rec.stage("clip search"):
                    mx = awq_search_clip(
                        w, sig[n], bits, c.group_size, c.sym, c.clip_grid, c.max_shrink
                    )
                bound = mx.repeat_interleave(g, dim=1).to(w.dtype)
                w = torch.clamp(w, -bound, bound)
            codes, scales, zeros = quantize_matrix(w, bits, c.group_size, c.sym)
            q = self.pack(
                QuantizedWeight(
                    codes, scales, zeros, torch.arange(w.shape[1]) // g, bits, c.group_size
                ),
                lin.bias,
                lin.weight.dtype,
            )
            stats = rec.layer_stats.setdefault(prefix + n, {})
            stats["weight_rel_error"] = float(
                (q.weight.float() - lin.weight.float()).norm()
                / lin.weight.float().norm().clamp(min=1e-12)
            )
            set_module(layer, n, q)

    def layout(self) -> LayerFormat:
        return LAYOUTS["gptq-v1" if self.config.format == "gptq" else "awq-gemm"]

    @classmethod
    def default_layout(cls, meta: dict) -> LayerFormat:
        return LAYOUTS["gptq-v1" if meta.get("options", {}).get("format") == "gptq" else "awq-gemm"]

    def quantization_extra(self, model: nn.Module) -> dict:
        if self.config.format == "gptq":
            return {}
        skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return {"modules_to_not_convert": skipped or None}
