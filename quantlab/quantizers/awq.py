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
Sigma costs in^2 per candidate row, the matmul tokens x in: for each input of a layer the
cheaper is chosen by an operation count (``score_on: auto``; :func:`search_ops`), so very wide
inputs (a 1.5B model's 8960-wide down_proj) are scored by the matmul, the original AWQ's way.

The per-layer work (:func:`quantize_layer`) is shared with the streamed walk
(:mod:`quantlab.streaming.methods`), which holds one decoder layer at a time.

Checkpoints: the AutoAWQ "gemm" layout (:mod:`quantlab.formats.awq_gemm`, 4 bits); or, with
``format: gptq`` (any of 2/3/4/8 bits), the GPTQ v1 layout (:mod:`quantlab.formats.gptq_v1`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, LayerFormat, QuantizedWeight, drop_dense_weights
from quantlab.formats.gptq_v1 import GPTQ_BITS
from quantlab.grid import clip_search, fake_quant, quantize_matrix
from quantlab.log import log as default_log
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


def forward_mse(dw: torch.Tensor, x: torch.Tensor, chunk: int = 2048) -> float:
    """mean over tokens and outputs of (x @ dW^T)^2, from the inputs x [t, in] themselves (in
    chunks of tokens, so the outputs [chunk, out] stay small). Equal to
    ``output_mse(dw, gram(x))`` in exact arithmetic; the float sums differ in their order."""
    total = torch.zeros((), dtype=torch.float64, device=dw.device)
    for i in range(0, x.shape[0], chunk):
        total += (x[i : i + chunk] @ dw.t()).pow(2).sum(dtype=torch.float64)
    return float(total / (x.shape[0] * dw.shape[0]))


def search_ops(tokens: int, in_f: int, out_f: int, n_grid: int, group: int) -> dict[str, int]:
    """Multiply-adds of scoring the n_grid + 1 candidate scales of linears [out_f, in_f] (all
    that read one input) and clipping them, each way. 'gram': X^T X once (tokens x in^2), then
    (dW Sigma) per candidate (out x in^2); 'forward': x @ dW^T over the tokens per candidate
    (tokens x in x out), and the clipping blocks from the tokens (tokens x in x group). The
    candidates' quantization costs both ways the same and is left out."""
    cands = n_grid + 1
    return {
        "gram": tokens * in_f * in_f + cands * out_f * in_f * in_f,
        "forward": cands * tokens * in_f * out_f + tokens * in_f * group,
    }


def cheaper_way(tokens: int, in_f: int, out_f: int, n_grid: int, group: int) -> str:
    """'gram' or 'forward', whichever :func:`search_ops` counts fewer operations for (gram on
    a tie: the demo's way)."""
    ops = search_ops(tokens, in_f, out_f, n_grid, group)
    return "forward" if ops["forward"] < ops["gram"] else "gram"


def gram_blocks(x: torch.Tensor, group: int) -> torch.Tensor:
    """The diagonal blocks [n_groups, g, g] of gram(x) for input groups of ``group`` columns,
    from x [t, in] (t x in x g operations instead of t x in^2)."""
    x = x.float()
    g = x.shape[1] if group == -1 else group
    xg = x.view(x.shape[0], -1, g)  # [t, ng, g]
    return torch.einsum("tng,tnh->ngh", xg, xg) / x.shape[0]


def awq_search_scales(
    w: torch.Tensor,
    sigma: torch.Tensor,
    x_mean: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    duo_scaling: bool = True,
    inputs: torch.Tensor | None = None,
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
        loss = output_mse(wq - w, sigma) if inputs is None else forward_mse(wq - w, inputs)
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
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per (row, group) clipping bound of W [out, in] minimising that group's share of the
    output error, (dW_g) Sigma_gg (dW_g)^T with Sigma_gg the group's diagonal block of the
    input second moment ``sigma`` (or ``blocks`` [ng, g, g] given, :func:`gram_blocks`).
    Returns max_val [out, n_groups]."""
    in_f = w.shape[1]
    g = in_f if group_size == -1 else group_size
    if blocks is None:
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
    score_on: Literal["auto", "gram", "forward"] = Field(
        "auto",
        description="How candidate scales are scored on the search tokens: 'gram', on their "
        "second moment X^T X (cost grows with in^2); 'forward', by x @ dW^T per candidate "
        "(tokens x in x out, the original AWQ's way); 'auto', the cheaper by an op count, per "
        "input of each layer (the same objective: the same scales up to float rounding).",
    )
    batch_size: int = Field(8, ge=1, description="Calibration windows per forward pass.")
    next_inputs: Literal["float", "quantized"] = Field(
        "float",
        description="What the next layer is calibrated on: 'float', this layer's float outputs "
        "from the statistics pass (one pass per layer, as the reference AutoAWQ does), or "
        "'quantized', its outputs after quantization (a second pass per layer, ~1.6x the time; "
        "errors propagate as at inference).",
    )
    format: Literal["gemm", "gptq"] = Field(
        "gemm",
        description="Checkpoint layout: 'gemm' (AutoAWQ, 4 bits only) or 'gptq' (GPTQ v1, "
        "2/3/4/8 bits).",
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
                f"format gptq stores {', '.join(map(str, GPTQ_BITS))} bits "
                f"(got {', '.join(map(str, odd))})"
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


# --------------------------------------------------------------------------- one decoder layer


def check_scale_groups(model: nn.Module) -> None:
    """AWQ needs to know where each group's scales fold (architecture data)."""
    spec = arch_spec(model)
    decoder_layers(model, spec)
    if not spec.scale_groups:
        raise QuantlabError(
            f"AWQ does not know how to fold scales in a '{model.config.model_type}' "
            "model (no scale groups for this architecture)"
        )


@dataclass
class LayerJob:
    """What quantizing a decoder layer needs beside the layer (the whole-model backend and
    the streamed walk make one each): the options, the packing, where the per-layer
    statistics and stage times go, the search tokens, the log of the scoring ways chosen."""

    config: AWQConfig
    pack: Callable[..., nn.Module]  # (QuantizedWeight, bias, dtype) -> packed module
    stats: dict[str, dict[str, float]]
    stage: Callable[[str], Any]  # stage name -> context manager timing it
    subset: tuple[torch.Tensor, int]  # (picked token indices, tokens in all)
    log: Callable[[str], None] = default_log
    said: set = field(default_factory=set)


def search_subset(hidden: list[torch.Tensor], c: AWQConfig) -> tuple[torch.Tensor, int]:
    """The seeded random ``search_tokens`` of the calibration windows (flat indices, sorted)
    that the searches score on, and the number of tokens in all."""
    gen = torch.Generator().manual_seed(c.seed)
    n_tok = sum(h.shape[0] * h.shape[1] for h in hidden)
    return torch.randperm(n_tok, generator=gen)[: c.search_tokens].sort().values, n_tok


@dataclass
class LayerInputs:
    """Per linear of a layer: mean |x| over every token, and what the searches score on,
    by the way chosen for its input: its second moment (``sigma``, 'gram') or the search
    tokens themselves (``x``, 'forward'). Linears reading one tensor share the objects."""

    x_mean: dict[str, torch.Tensor]
    way: dict[str, str]
    sigma: dict[str, torch.Tensor] = field(default_factory=dict)
    x: dict[str, torch.Tensor] = field(default_factory=dict)

    def objective(self, n: str) -> dict[str, torch.Tensor | None]:
        """awq_search_scales' arguments for what linear ``n`` is scored on."""
        if self.way[n] == "gram":
            return {"sigma": self.sigma[n]}
        return {"sigma": None, "inputs": self.x[n]}

    def rescale(self, n: str, s: torch.Tensor, done: dict) -> None:
        """Inputs of ``n`` become x / s: second moment Sigma / (s s^T). ``done``: tokens
        already divided for a twin (one copy of them, not one per linear)."""
        if self.way[n] == "gram":
            self.sigma[n] = self.sigma[n] / (s.view(-1, 1) * s.view(1, -1))
        else:
            key = id(self.x[n])
            if key not in done:
                done[key] = self.x[n] / s.view(1, -1)
            self.x[n] = done[key]

    def clip_args(self, n: str, group: int) -> dict[str, torch.Tensor | None]:
        """awq_search_clip's arguments: Sigma, or its diagonal blocks from the tokens."""
        if self.way[n] == "gram":
            return {"sigma": self.sigma[n]}
        return {"sigma": None, "blocks": gram_blocks(self.x[n], group)}


def quantize_layer(
    job: LayerJob, layer: nn.Module, spec, mine: dict, hidden: list, kwargs: list, prefix: str
) -> list:
    """Search and fold the scales of ``layer``'s linears ``mine`` (names inside it), clip and
    quantize them, swap the packed modules in; return the next layer's calibration inputs."""
    inputs, float_out = statistics(job, layer, mine, hidden, kwargs)
    scale_layer(job, layer, spec, mine, inputs, prefix)
    quantize_linears(job, layer, mine, inputs, prefix)
    if job.config.next_inputs == "float":
        nxt = float_out
    else:
        with job.stage("quantized pass"):
            nxt = run_layer(layer, hidden, kwargs)
    drop_dense_weights(layer)
    return nxt


def statistics(job: LayerJob, layer, mine: dict, hidden, kwargs) -> tuple[LayerInputs, list]:
    """One pass through ``layer``: per distinct input, mean |x| over all tokens and the
    search tokens (their second moment, or kept as they are; :func:`choose_ways`); and the
    layer's float outputs (when the next layer calibrates on them)."""
    pick, n_tok = job.subset
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
    with job.stage("statistics pass"), input_hooks(mine, collect) as seen:
        for h, kw in zip(hidden, kwargs):
            seen.clear()
            out = layer_output(layer(h, **kw))
            if job.config.next_inputs == "float":
                float_out.append(out)
            offset[0] += h.shape[0] * h.shape[1]
    # one statistic per distinct input (q/k/v share one, gate/up another)
    twin_of: dict[str, str] = {}
    for n in mine:
        twin_of[n] = next(
            (m for m, r in twin_of.items() if m == r and torch.equal(chunks[m][0], chunks[n][0])),
            n,
        )
    inputs = LayerInputs({n: abs_sum[n] / n_tok for n in mine}, choose_ways(job, mine, twin_of))
    for n in mine:
        held = inputs.sigma if inputs.way[n] == "gram" else inputs.x
        if twin_of[n] != n:
            held[n] = held[twin_of[n]]
        else:
            xs = torch.cat(chunks[n])
            held[n] = gram(xs) if inputs.way[n] == "gram" else xs
    return inputs, float_out


def choose_ways(job: LayerJob, mine: dict, twin_of: dict[str, str]) -> dict[str, str]:
    """Per linear, how its input's candidates are scored (``score_on``; 'auto': the cheaper
    by :func:`cheaper_way` for all the linears reading that input), each new choice logged."""
    c = job.config
    tokens = min(c.search_tokens, job.subset[1])
    ways: dict[str, str] = {}
    for src in dict.fromkeys(twin_of.values()):
        readers = [n for n in mine if twin_of[n] == src]
        in_f, out_f = mine[src].in_features, sum(mine[n].out_features for n in readers)
        g = in_f if c.group_size == -1 else c.group_size
        way = c.score_on
        if way == "auto":
            way = cheaper_way(tokens, in_f, out_f, c.n_grid, g)
        for n in readers:
            ways[n] = way
        key = (in_f, out_f, way)
        if key not in job.said:
            job.said.add(key)
            ops = search_ops(tokens, in_f, out_f, c.n_grid, g)
            job.log(
                f"awq: {'/'.join(readers)} ({in_f} -> {out_f}): candidates scored by {way} "
                f"({c.score_on}; multiply-adds: gram {ops['gram']:.2e}, "
                f"forward {ops['forward']:.2e})"
            )
    return ways


def scale_layer(job: LayerJob, layer, spec, mine: dict, inputs: LayerInputs, prefix: str) -> None:
    """Search and fold the input-channel scales of each scale group of ``layer``."""
    c = job.config
    for sg in spec.scale_groups:
        names = [n for n in sg.linears if n in mine]
        if len(names) != len(sg.linears):
            continue  # part of the group is skipped: scaling it would change float layers
        prev = layer.get_submodule(sg.prev)
        width = mine[names[0]].in_features
        if isinstance(prev, nn.Linear) and prev.out_features != width:
            continue  # e.g. v_proj -> o_proj under grouped-query attention
        w_cat = torch.cat([mine[n].weight.data for n in names])
        with job.stage("scale search"):
            s, losses = awq_search_scales(
                w_cat,
                x_mean=inputs.x_mean[names[0]],
                bits=c.bits_for(prefix + names[0]),
                group_size=c.group_size,
                sym=c.sym,
                n_grid=c.n_grid,
                duo_scaling=c.duo_scaling,
                **inputs.objective(names[0]),
            )
        fold_scales(prev, s)
        done: dict = {}
        for n in names:
            mine[n].weight.data.mul_(s.view(1, -1).to(mine[n].weight.dtype))
            inputs.rescale(n, s, done)
            job.stats[prefix + n] = {
                "awq_loss_identity": float(losses[0]),
                "awq_loss_best": float(losses.min()),
                "awq_best_grid_index": int(losses.argmin()),
            }


def quantize_linears(job: LayerJob, layer, mine: dict, inputs: LayerInputs, prefix: str) -> None:
    """Clip (optionally) and round each linear of ``layer`` to its grid; swap them in."""
    c = job.config
    for n, lin in mine.items():
        w = lin.weight.data
        g = w.shape[1] if c.group_size == -1 else c.group_size
        bits = c.bits_for(prefix + n)
        if c.clip and not any(k in n for k in ("q_proj", "k_proj")):
            with job.stage("clip search"):
                mx = awq_search_clip(
                    w,
                    bits=bits,
                    group_size=c.group_size,
                    sym=c.sym,
                    n_grid=c.clip_grid,
                    max_shrink=c.max_shrink,
                    **inputs.clip_args(n, c.group_size),
                )
            bound = mx.repeat_interleave(g, dim=1).to(w.dtype)
            w = torch.clamp(w, -bound, bound)
        codes, scales, zeros = quantize_matrix(w, bits, c.group_size, c.sym)
        q = job.pack(
            QuantizedWeight(
                codes, scales, zeros, torch.arange(w.shape[1]) // g, bits, c.group_size
            ),
            lin.bias,
            lin.weight.dtype,
        )
        stats = job.stats.setdefault(prefix + n, {})
        stats["weight_rel_error"] = float(
            (q.weight.float() - lin.weight.float()).norm()
            / lin.weight.float().norm().clamp(min=1e-12)
        )
        set_module(layer, n, q)


class AWQ(LayoutBackend):
    name = "awq"
    description = (
        "AWQ (Lin et al. 2023), quantlab's PyTorch implementation; AutoAWQ gemm or GPTQ "
        "checkpoints."
    )
    Config = AWQConfig
    needs_calibration = True
    replaces_only = False  # it also rescales the norms and layers in front of the quantized ones
    memory = "streams one decoder layer at a time (bits: auto needs the whole model)"

    def check(self, model: nn.Module) -> None:
        c = self.config
        targets = target_linears(model, c.skip_list())
        check_not_tied(model, targets)
        for bits in c.widths():
            check_layers(targets, bits, c.group_size, self.layout())
        check_allocation(c, model, targets)
        check_scale_groups(model)

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
        job = LayerJob(c, self.pack, out.layer_stats, out.stage, search_subset(hidden, c))
        for li, layer in enumerate(
            tqdm(layers, desc="awq: layers", unit="layer", leave=False, disable=None)
        ):
            prefix = f"{spec.layers}.{li}."
            # taken out of `targets`, so each float layer is freed once its quantized copy is in
            mine = {
                n[len(prefix) :]: targets.pop(n)
                for n in [n for n in targets if n.startswith(prefix)]
            }
            hidden = quantize_layer(job, layer, spec, mine, hidden, kwargs, prefix)
        return model

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
