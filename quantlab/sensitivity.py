"""The sensitivity pass: which layers can a backend quantize, and which must stay in float?

For any backend whose options have ``skip``, the pass

1. runs the float model once on a few calibration windows and keeps its next-token
   distributions (and the hidden state entering each decoder layer);
2. quantizes one candidate at a time (a linear layer, or a layer type such as every
   ``mlp.down_proj``) with the method's own backend and options, everything else in float,
   and measures the mean KL divergence KL(float || candidate-quantized) per token: the
   candidate's *sensitivity*. The forward pass starts at the first decoder layer the
   candidate touches, from the cached float hidden state (the layers before it are
   unchanged), which halves the cost on average;
3. if the method asks for ``skip: auto``, finds the fewest candidates to leave in float so
   that the model with every other candidate quantized stays within ``kl_budget``: the
   candidates are ranked by sensitivity and a binary search over "leave the top n in float"
   measures the real joint KL at each probe (not a sum of individual KLs).

Backends that only replace the modules they quantize (every backend but AWQ, which also
rescales the norms in front of the layers) are undone in place after each probe; the others
work on a copy of the model per probe.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.quantizers.arch import arch_spec
from quantlab.quantizers.base import AUTO_SKIP_BASE, Backend, target_linears

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class SensitivityResult:
    granularity: str
    kl_budget: float | None
    windows: int
    seq_len: int
    candidates: dict[str, list[str]]
    sensitivity: dict[str, float]  # candidate -> mean KL with only it quantized
    chosen: list[str] = field(default_factory=list)  # candidates left in float
    probes: list[dict] = field(default_factory=list)  # {"float": n, "kl": ...} of the search
    final_kl: float | None = None  # KL with every other candidate quantized
    seconds: float = 0.0

    def skip_patterns(self) -> list[str]:
        """Module-name patterns of the chosen candidates (exact names, or per-type globs)."""
        return list(self.chosen)

    def as_dict(self) -> dict:
        return {
            "granularity": self.granularity,
            "kl_budget": self.kl_budget,
            "windows": self.windows,
            "seq_len": self.seq_len,
            "kl_measure": "mean KL(float || quantized) per token, nats",
            "sensitivity": self.sensitivity,
            "chosen": self.chosen,
            "probes": self.probes,
            "final_kl": self.final_kl,
            "seconds": self.seconds,
            "candidates": {k: len(v) for k, v in self.candidates.items()},
        }


def candidate_groups(names: list[str], granularity: str) -> dict[str, list[str]]:
    """Candidates: each layer, or each layer type (layer indices replaced by '*')."""
    if granularity == "layer":
        return {n: [n] for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_LAYER_INDEX.sub(".*.", n), []).append(n)
    return groups


class _Pass(nn.Module):
    """Stands in for a decoder layer whose output is replaced anyway."""

    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_out else hidden_states


class _Runner:
    """Forward passes of the sensitivity windows, starting at a given decoder layer."""

    def __init__(self, model: nn.Module, ids: torch.Tensor):
        self.model, self.ids = model, ids
        spec = arch_spec(model)
        self.layers_path = spec.layers
        self.layers = model.get_submodule(spec.layers) if spec.layers else None
        self.index = {}
        self.cache: list[torch.Tensor] = []
        self.tuple_out = False
        if self.layers is not None:
            self.index = {
                n: i
                for i, _ in enumerate(self.layers)
                for n, _m in self.layers[i].named_modules(prefix=f"{spec.layers}.{i}")
            }
        self.base = self._reference()
        self.base_p = self.base.exp()

    @torch.no_grad()
    def _reference(self) -> torch.Tensor:
        handles = []
        if self.layers is not None:

            def grab(module, args, kwargs):
                self.cache.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

            def out_type(module, args, kwargs, out):
                self.tuple_out = isinstance(out, tuple)

            handles = [
                layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.layers
            ]
            handles.append(self.layers[0].register_forward_hook(out_type, with_kwargs=True))
        try:
            return self._logprobs()
        finally:
            for h in handles:
                h.remove()

    def _logprobs(self) -> torch.Tensor:
        device = next(self.model.parameters()).device
        logits = self.model(self.ids.to(device), use_cache=False).logits
        return F.log_softmax(logits.float(), dim=-1)

    def start_layer(self, modules: list[str]) -> int:
        """The first decoder layer that holds one of ``modules`` (0 when unknown)."""
        idx = [self.index.get(m) for m in modules]
        return 0 if not idx or any(i is None for i in idx) else min(idx)

    @torch.no_grad()
    def kl(self, start: int = 0) -> float:
        """Mean KL(float || current model) per token, the forward starting at layer ``start``."""
        if start == 0 or self.layers is None:
            lp = self._logprobs()
        else:
            saved = [self.layers[i] for i in range(start)]
            cached = self.cache[start]

            def swap(module, args, kwargs):
                if args:
                    return (cached, *args[1:]), kwargs
                return args, dict(kwargs, hidden_states=cached)

            for i in range(start):
                self.layers[i] = _Pass(self.tuple_out)
            handle = self.layers[start].register_forward_pre_hook(swap, with_kwargs=True)
            try:
                lp = self._logprobs()
            finally:
                handle.remove()
                for i, layer in enumerate(saved):
                    self.layers[i] = layer
        kl = (self.base_p * (self.base - lp)).sum(-1)
        # KL >= 0; float32 rounding can make a near-zero mean come out at -1e-8
        return max(0.0, float(kl.mean()))


def _snapshot(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module, dict]]:
    """What undoing an in-place quantization of ``names`` needs: each module object and a
    shallow copy of its attributes (parameters, buffers and submodule tables included)."""
    out = []
    for n in names:
        m = model.get_submodule(n)
        state = {
            k: (dict(v) if k in ("_parameters", "_buffers", "_modules") else v)
            for k, v in vars(m).items()
        }
        out.append((n, m, state))
    return out


def _restore(model: nn.Module, snap: list[tuple[str, nn.Module, dict]]) -> None:
    from quantlab.quantizers.base import set_module

    for n, m, state in snap:
        m.__dict__.clear()
        m.__dict__.update(state)
        set_module(model, n, m)


def run_sensitivity(
    model: nn.Module,
    make_backend: Callable[[list[str]], Backend],
    ids: torch.Tensor,
    *,
    base_skip: list[str],
    granularity: str,
    kl_budget: float | None,
    calibration: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
) -> SensitivityResult:
    """Measure each candidate's sensitivity and, with a ``kl_budget``, choose what to skip.

    ``make_backend(skip)`` returns the method's backend with ``skip`` as its skip list;
    ``ids`` [windows, seq_len] are the windows KL is measured on; ``calibration`` goes to
    backends that need calibration data; ``base_skip`` are the patterns always left in
    float. ``model`` is left as it was (float)."""
    t0 = time.perf_counter()
    if log is None:
        from quantlab.log import log
    names = [n for n, _ in target_linears(model, base_skip)]
    if not names:
        raise QuantlabError("sensitivity: no linear layer is left to quantize")
    groups = candidate_groups(names, granularity)
    probe_backend = make_backend(base_skip)
    in_place = probe_backend.replaces_only
    cal = calibration if probe_backend.needs_calibration else None
    runner = _Runner(model, ids)
    result = SensitivityResult(granularity, kl_budget, ids.shape[0], ids.shape[1], groups, {})

    def measure(quantized: list[str]) -> float:
        """KL with exactly the modules ``quantized`` quantized by the backend."""
        keep = set(quantized)
        backend = make_backend(list(base_skip) + [n for n in names if n not in keep])
        if in_place:
            snap = _snapshot(model, quantized)
            try:
                backend.quantize(model, cal)
                return runner.kl(runner.start_layer(quantized))
            finally:
                _restore(model, snap)
        saved = runner.model, runner.layers
        try:
            runner.model = backend.quantize(copy.deepcopy(model), cal).model
            runner.layers = (
                runner.model.get_submodule(runner.layers_path) if runner.layers_path else None
            )
            return runner.kl(runner.start_layer(quantized))
        finally:
            runner.model, runner.layers = saved

    bar = tqdm(groups.items(), desc="sensitivity", unit="candidate", leave=False, disable=None)
    for cand, members in bar:
        result.sensitivity[cand] = measure(members)
    ranked = sorted(groups, key=lambda c: result.sensitivity[c], reverse=True)
    top = ", ".join(f"{c} {result.sensitivity[c]:.4g}" for c in ranked[:3])
    log(f"sensitivity: {len(groups)} candidates ({granularity}), most sensitive: {top}")

    if kl_budget is not None:

        def joint(n_float: int) -> float:
            quantized = [m for c in ranked[n_float:] for m in groups[c]]
            kl = measure(quantized) if quantized else 0.0
            result.probes.append({"float": n_float, "kl": kl})
            return kl

        lo, hi = 0, len(ranked)  # hi: everything in float, KL 0, always within budget
        best_kl = 0.0
        kl0 = joint(0)
        if kl0 <= kl_budget:
            hi, best_kl = 0, kl0
        # invariant: leaving the top `lo` in float exceeds the budget, the top `hi` fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            kl = joint(mid)
            if kl <= kl_budget:
                hi, best_kl = mid, kl
            else:
                lo = mid
        if hi == len(ranked):
            raise QuantlabError(
                f"sensitivity: no subset of layers fits kl_budget {kl_budget} (quantizing only the "
                f"least sensitive candidate already costs more); raise the budget"
            )
        result.chosen = ranked[:hi]
        result.final_kl = best_kl
        log(
            f"sensitivity: leaving {hi} of {len(ranked)} candidates in float keeps KL at "
            f"{best_kl:.4g} (budget {kl_budget})"
        )
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["AUTO_SKIP_BASE", "SensitivityResult", "candidate_groups", "run_sensitivity"]
