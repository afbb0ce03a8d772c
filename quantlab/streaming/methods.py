"""The per-layer work of each method the streaming path runs, on quantlab's own cores:
RTN's grid (:func:`quantlab.grid.quantize_matrix`, :func:`quantlab.quantizers.rtn.search_clip`),
GPTQ's solver (:func:`quantlab.quantizers.gptq.gptq_quantize`) and AWQ's layer
(:func:`quantlab.quantizers.awq.quantize_layer`, the backend's own function) with the same
orchestration as the in-memory backends (the same calls in the same order, so the same
tensors). A method here is its validated backend Config plus what it does to one decoder layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, QuantizedWeight, drop_dense_weights
from quantlab.grid import quantize_matrix
from quantlab.quantizers.arch import ArchSpec
from quantlab.quantizers.awq import AWQ, AWQConfig, LayerJob, check_scale_groups, search_subset
from quantlab.quantizers.awq import quantize_layer as awq_quantize_layer
from quantlab.quantizers.base import set_module, timed
from quantlab.quantizers.gptq import GPTQConfig, gptq_quantize, same_tensor
from quantlab.quantizers.rtn import RTNConfig, column_mean_squares, search_clip
from quantlab.quantizers.sequential import (
    feed,
    input_hooks,
    layer_output,
    run_layer,
    staged_prenorm_layer,
)
from quantlab.quantizers.weightonly import (
    WeightQuantConfig,
    check_layers,
    mixed_quantization_config,
)

Stats = dict[str, dict[str, float]]


class LayerMethod:
    """A weight-only method as the streaming path runs it (``backend``: the name its
    checkpoints record; their layout is GPTQ v1, as the backend's)."""

    backend: str
    needs_calibration = False
    batch_size = 8

    def __init__(self, config: WeightQuantConfig):
        if config.allocating():
            raise QuantlabError(
                f"{self.backend} with bits: auto is not streamed yet: its allocation "
                "probes need the whole model; give bits or module_bits"
            )
        if config.skip == "auto":
            raise QuantlabError(
                f"{self.backend} with skip: auto is not streamed yet: its sensitivity pass "
                "needs the whole model; give the skip list"
            )
        self.config = config
        self.layout = LAYOUTS["gptq-v1"]

    def check(self, model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> None:
        """The in-memory backend's checks (on the meta skeleton: shapes only)."""
        c = self.config
        for bits in c.widths():
            check_layers(targets, bits, c.group_size, self.layout)

    def quantize_layer(
        self,
        layer: nn.Module,
        prefix: str,
        mine: dict[str, nn.Linear],
        hidden: list | None,
        kwargs: list | None,
        spec: ArchSpec,
        stats: Stats,
    ) -> list | None:
        """Quantize the linears ``mine`` (names inside ``layer``) in place; return the layer's
        outputs on ``hidden`` (None when the method runs without calibration)."""
        raise NotImplementedError

    def quantize_outer(self, name: str, lin: nn.Linear, stats: Stats) -> nn.Module | None:
        """A targeted linear outside the decoder layers (an untied lm_head not skipped): its
        quantized module, or None where the backend leaves it in float."""
        return None

    def options(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def extra(self, model: nn.Module) -> dict[str, Any]:
        """The backend's ``quantization_extra`` (``model``: the walked skeleton, its quantized
        linears swapped for packed modules)."""
        return {}

    def quantization_config(self, widths: dict[str, int], model: nn.Module) -> dict[str, Any]:
        """What LayoutBackend.save writes into config.json for these layers' widths."""
        c, extra = self.config, self.extra(model)
        if not widths or len(set(widths.values())) == 1:
            bits = next(iter(widths.values()), c.bits if c.bits != "auto" else max(c.bits_choices))
            return self.layout.quantization_config(bits, c.group_size, c.sym, **extra)
        return mixed_quantization_config(self.layout, widths, c.group_size, c.sym, extra)


class RTNLayers(LayerMethod):
    """``rtn``: each linear on its own. With ``scale_search: importance`` the clipping search
    weighs each input column by its mean square over the calibration windows in the *float*
    model (RTN's ``input_mean_squares``): the float hidden states are carried from layer to
    layer and each layer's linears see them through hooks, batch by batch as that pass does."""

    backend = "rtn"
    batch_size = 4  # input_mean_squares' batches

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.scale_search == "importance"

    def _one(
        self, name: str, lin: nn.Linear, stats: Stats, importance: torch.Tensor | None = None
    ) -> nn.Module:
        # RTN.quantize's steps, in its order
        c = self.config
        w = lin.weight.data
        bits = c.bits_for(name)
        if c.scale_search != "none":
            w = search_clip(w, importance, bits, c.group_size, c.sym, c.search_grid, c.max_shrink)
        codes, scales, zeros = quantize_matrix(w, bits, c.group_size, c.sym)
        g = w.shape[1] if c.group_size == -1 else c.group_size
        g_idx = torch.arange(w.shape[1], device=w.device) // g
        q = self.layout.pack(
            QuantizedWeight(codes, scales, zeros, g_idx, bits, c.group_size),
            lin.bias,
            w.dtype,
            dense=False,
        )
        w = lin.weight.data
        err = (q.dequantize() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
        stats[name] = {"weight_rel_error": float(err)}
        return q

    def quantize_layer(self, layer, prefix, mine, hidden, kwargs, spec, stats):
        importance, out = {}, None
        if self.needs_calibration:
            importance, out = _float_pass(layer, mine, hidden, kwargs)
        # taken out of ``mine`` one by one: each float weight is freed once its packed layer
        # is in (the in-memory RTN frees them the same way)
        for n in list(mine):
            lin = mine.pop(n)
            set_module(layer, n, self._one(prefix + n, lin, stats, importance.get(n)))
            del lin
        return out

    def quantize_outer(self, name, lin, stats):
        if self.needs_calibration:
            raise QuantlabError(
                f"streamed rtn with scale_search: importance quantizes the decoder "
                f"layers only; keep '{name}' in 'skip'"
            )
        return self._one(name, lin, stats)


class AWQLayers(LayerMethod):
    """``awq``: the whole-model backend's per-layer work (:func:`quantlab.quantizers.awq.
    quantize_layer`: statistics pass, scale search and folding into the norms or linears in
    front, clipping search, rounding) on the layer in memory; the search tokens drawn from
    the first layer's inputs with the same seed, so the same tokens."""

    backend = "awq"
    needs_calibration = True

    def __init__(self, config: AWQConfig):
        super().__init__(config)
        self.batch_size = config.batch_size
        self.layout = AWQ(config).layout()
        self._subset: tuple[torch.Tensor, int] | None = None
        self._said: set = set()  # the scoring ways logged (once per shape, as the backend)

    def check(self, model, targets):
        super().check(model, targets)
        check_scale_groups(model)

    def quantize_layer(self, layer, prefix, mine, hidden, kwargs, spec, stats):
        c = self.config
        if self._subset is None:  # the first layer's inputs: those the backend draws from
            self._subset = search_subset(hidden, c)
        # the backend's inner stage times are not kept: the walk times 'quantize' as a whole
        job = LayerJob(c, self.layout.pack, stats, lambda name: timed({}, name), self._subset)
        job.said = self._said
        return awq_quantize_layer(job, layer, spec, dict(mine), hidden, kwargs, prefix)

    def extra(self, model):
        return AWQ(self.config).quantization_extra(model)


@torch.no_grad()
def _float_pass(
    layer: nn.Module, mine: dict[str, nn.Linear], hidden: list, kwargs: list
) -> tuple[dict[str, torch.Tensor], list]:
    """The float layer's outputs on ``hidden`` and the mean square of every input column of
    each linear in ``mine`` (summed batch by batch in order, as input_mean_squares sums)."""
    with column_mean_squares(mine) as means:
        out = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    return means, out


class GPTQLayers(LayerMethod):
    """``gptq`` (engine quantlab): each stage of a layer quantized on the inputs the
    already-quantized stages produce (true-sequential on a pre-norm architecture), or its
    linears in groups otherwise, as GPTQ.quantize."""

    backend = "gptq"
    needs_calibration = True

    def __init__(self, config: GPTQConfig):
        if config.engine != "quantlab":
            raise QuantlabError(
                "gptq with engine: gptqmodel is not streamed (gptqmodel loads the "
                "whole model itself); use engine: quantlab"
            )
        super().__init__(config)
        self.batch_size = config.batch_size

    def extra(self, model: nn.Module) -> dict[str, Any]:
        return {"desc_act": self.config.act_order}

    def quantize_layer(self, layer, prefix, mine, hidden, kwargs, spec, stats):
        c = self.config
        sequential = {n for g in spec.sequential for n in g}
        if not (c.true_sequential and spec.prenorm is not None and set(mine) <= sequential):
            return self._grouped(layer, prefix, mine, hidden, kwargs, spec, stats)
        stages = dict(zip(("attn_in", "o_in", "mlp_in", "down_in"), spec.sequential))

        def on_inputs(stage, xs):
            names = [n for n in stages[stage] if n in mine]
            if names:
                self._group(layer, mine, names, _hessian(xs), prefix, stats)

        out = staged_prenorm_layer(layer, spec.prenorm, hidden, kwargs, on_inputs)
        drop_dense_weights(layer)
        return out

    def _grouped(self, layer, prefix, mine, hidden, kwargs, spec, stats):
        """GPTQ.quantize's other path (true_sequential off, or a layer it cannot stage): the
        linears in groups, each group's Hessians from one feed of the layer."""
        c = self.config
        groups = (
            [tuple(n for n in g if n in mine) for g in spec.sequential] if c.true_sequential else []
        )
        groups = [g for g in groups if g]
        covered = {n for g in groups for n in g}
        if set(mine) - covered:
            rest = tuple(n for n in mine if n not in covered)
            groups = [rest, *groups] if covered else [tuple(mine)]
        for grp in groups:
            hess, count, shares = _group_hessians(layer, mine, grp, hidden, kwargs)
            for n in grp:
                src = shares.get(n, n)
                self._group(layer, mine, [n], hess[src] * (2 / max(count[src], 1)), prefix, stats)
            del hess
        out = run_layer(layer, hidden, kwargs)
        drop_dense_weights(layer)
        return out

    def _group(
        self,
        layer: nn.Module,
        mine: dict[str, nn.Linear],
        names: list[str],
        h: torch.Tensor,
        prefix: str,
        stats: Stats,
    ) -> None:
        """GPTQ._quantize_group: the linears sharing the Hessian ``h`` solved as one matrix."""
        c = self.config
        lins = [mine[n] for n in names]
        bits = c.bits_for(prefix + names[0])
        codes, scales, zeros, g_idx = gptq_quantize(
            torch.cat([lin.weight.data for lin in lins]),
            h,
            bits,
            c.group_size,
            c.sym,
            damp_percent=c.damp_percent,
            act_order=c.act_order,
            static_groups=c.static_groups,
            block_size=c.block_size,
        )
        r0 = 0
        for n, lin in zip(names, lins):
            r1 = r0 + lin.out_features
            qw = QuantizedWeight(
                codes[r0:r1].to(lin.weight.device),
                scales[:, r0:r1],
                zeros[:, r0:r1],
                g_idx,
                bits,
                c.group_size,
            )
            q = self.layout.pack(qw, lin.bias, lin.weight.dtype)
            r0 = r1
            w = lin.weight.data.float()
            dw = q.weight.float() - w
            rel = float(((dw @ h) * dw).sum() / ((w @ h) * w).sum().clamp(min=1e-20))
            stats[prefix + n] = {
                "weight_rel_error": float(dw.norm() / w.norm().clamp(min=1e-12)),
                "output_rel_error": rel,
            }
            set_module(layer, n, q)
            del mine[n]  # the float weight is freed with ``lins`` (no later stage reads it)


def _group_hessians(layer, mine, grp, hidden, kwargs):
    """Sum of x x^T of each linear of ``grp`` over the batches (linears that read one tensor,
    q/k/v or gate/up, share the first one's: ``shares``), and the rows counted.

    GPTQ.quantize's rule, with one difference: the last input seen is held, not only its
    address. An address alone can be reused once its tensor is freed (o_proj's input freed,
    the MLP's input allocated in its place, same shape), and gate/up were then given
    o_proj's Hessian, at random (quantlab.quantizers.gptq has that flaw: see the streaming
    report of issue 29)."""
    hess: dict[str, torch.Tensor] = {}
    count = {n: 0 for n in grp}
    shares: dict[str, str] = {}
    last: list = []  # [tensor, name]: the tensor held, so its address cannot be reused

    def accumulate(name, x):
        if last and same_tensor(last[0], x) and last[1] != name:
            shares[name] = last[1]
            return
        last[:] = [x, name]
        x = x.reshape(-1, x.shape[-1]).float()
        if name not in hess:
            hess[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        hess[name].addmm_(x.t(), x)
        count[name] += x.shape[0]

    with input_hooks({n: mine[n] for n in grp}, accumulate, stop_after=grp) as seen:
        feed(layer, hidden, kwargs, seen)
    return hess, count, shares


def _hessian(xs) -> torch.Tensor:
    """2/n * sum x x^T over the batches ``xs`` (one at a time, as GPTQ.quantize)."""
    h, count = None, 0
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).float()
        if h is None:
            h = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        h.addmm_(x.t(), x)
        count += x.shape[0]
    return h * (2 / count)


#: backend name -> (its Config, the streaming method)
METHODS: dict[str, tuple[type, Callable[[Any], LayerMethod]]] = {
    "rtn": (RTNConfig, RTNLayers),
    "gptq": (GPTQConfig, GPTQLayers),
    "awq": (AWQConfig, AWQLayers),
}


def layer_method(backend: str, options: dict[str, Any] | WeightQuantConfig) -> LayerMethod:
    """The streaming method of ``backend`` with ``options`` (validated by the backend's own
    Config: the same errors as a recipe's)."""
    if backend not in METHODS:
        raise QuantlabError(
            f"backend '{backend}' is not streamed yet; streamed: {', '.join(METHODS)} "
            "(the others load the whole model)"
        )
    cfg_cls, make = METHODS[backend]
    config = options if isinstance(options, cfg_cls) else cfg_cls(**dict(options))
    return make(config)


def why_not_streamed(backend: str, options: dict[str, Any] | WeightQuantConfig) -> str | None:
    """Why a method cannot stream (one sentence), or None when it can: what the run asks
    before it chooses between streaming and loading the whole model."""
    try:
        layer_method(backend, options)
    except QuantlabError as e:
        return str(e)
    return None


#: what each backend needs in memory, for ``quantlab backends`` (names as registered)
_WHOLE = "needs the whole model in memory"
MEMORY_NEEDS: dict[str, str] = {
    "rtn": "streams one decoder layer at a time (bits: auto needs the whole model)",
    "gptq": "streams one decoder layer at a time (engine: quantlab; gptqmodel loads it whole)",
    "hqq": f"{_WHOLE} (not streamed yet)",
    "ggml": f"{_WHOLE} (not streamed yet)",
    "none": "the float baseline: nothing quantized",
    "llamacpp": "llama-quantize reads the GGUF file itself (memory-mapped)",
}


def memory_needs(backend: str) -> str:
    """One phrase: whether ``backend`` streams, or what it needs: the backend class's
    ``memory`` where it sets one, else this table's entry (a backend not listed is a
    library's, which quantizes the model it is given: the whole of it)."""
    from quantlab.registry import get_backend

    try:
        own = get_backend(backend).memory
    except Exception:  # an optional library missing: the table still answers
        own = None
    return own or MEMORY_NEEDS.get(backend, f"{_WHOLE} (its library quantizes the loaded model)")
