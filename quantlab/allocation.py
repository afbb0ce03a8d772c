"""Bit allocation under a budget (``bits: auto`` with ``bits_budget``): which width each layer
gets so that the model is as close to float as possible at a given average size.

1. **Units.** Layers that engines fuse share one width (q/k/v read one input and run as one
   matmul in vLLM and gptqmodel; so do gate/up): the units are the ``sequential`` groups of
   :mod:`quantlab.quantizers.arch` inside each decoder layer; a linear the architecture does not
   describe is a unit of its own.
2. **Sensitivity at each width.** For every unit and every candidate width, the KL divergence
   KL(float || model with only that unit quantized) on the sensitivity windows, measured with
   :mod:`quantlab.sensitivity`'s runner (forward from the unit's decoder layer on cached float
   hidden states; the unit quantized round-to-nearest at that width with the method's group
   size and symmetry, then undone in place). RTN is the probe for every method: it costs one
   rounding per probe where GPTQ or AWQ would need calibration passes, and what the knapsack
   needs is how much each unit's error costs at each width, which rounding measures well.
3. **Knapsack.** Minimise the sum of the units' KLs subject to the stored bits (codes, scales,
   zeros and group index, counted as the results table counts them) not exceeding the budget:
   a multiple-choice knapsack, solved exactly by dynamic programming over the budget in
   ``STEPS`` steps, each unit's cost rounded *up* to a step (the budget is never exceeded;
   120 units x 6 widths take well under a second).
4. **Measured, not predicted.** The chosen allocation is probed as a whole (every unit at its
   width) and its joint KL recorded beside the predicted sum; the method then quantizes the
   model with it, and the row's KL on the evaluation text is the final word.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.quantizers.arch import arch_spec
from quantlab.records import atomic_write_json

#: budget steps of the dynamic programme
STEPS = 20_000


@dataclass
class Allocation:
    budget: float
    choices: list[int]
    group_size: int
    units: dict[str, list[str]]
    params: dict[str, int]
    cost: dict[str, dict[int, float]]  # unit -> width -> stored bits of the unit
    kl: dict[str, dict[int, float]] = field(default_factory=dict)  # unit -> width -> KL
    chosen: dict[str, int] = field(default_factory=dict)
    predicted_kl: float | None = None
    measured_kl: float | None = None
    bits_per_weight: float | None = None
    seconds: float = 0.0
    windows: int = 0
    seq_len: int = 0

    def module_bits(self) -> dict[str, int]:
        """Every quantized module's width."""
        return {m: self.chosen[u] for u, members in self.units.items() for m in members}

    def as_dict(self) -> dict:
        return {
            "budget_bits_per_weight": self.budget,
            "choices": self.choices,
            "group_size": self.group_size,
            "solver": f"multiple-choice knapsack, dynamic programming over {STEPS} budget "
            "steps (exact, costs rounded up)",
            "probe": "round-to-nearest at each width, one unit at a time, KL(float || probe) "
            "per token (nats)",
            "units": self.units,
            "params": self.params,
            "kl": {u: {str(b): v for b, v in k.items()} for u, k in self.kl.items()},
            "chosen": self.chosen,
            "predicted_kl": self.predicted_kl,
            "measured_kl": self.measured_kl,
            "bits_per_weight": self.bits_per_weight,
            "seconds": self.seconds,
            "windows": self.windows,
            "seq_len": self.seq_len,
        }


def _read_cache(path: Path | None) -> dict[str, dict[str, float]]:
    """The per-unit KLs measured earlier ({} when none or unreadable: measured again)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and all(
        isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
        for v in data.values()
    )
    return data if ok else {}


def stored_bits(in_f: int, out_f: int, bits: int, group_size: int) -> float:
    """Bits a GPTQ-v1-layout layer stores: codes, float16 scales and ``bits``-bit zeros per
    group and output, an int32 group index per input column (as ``bits_per_weight`` counts)."""
    groups = 1 if group_size == -1 else in_f // group_size
    return in_f * out_f * bits + groups * out_f * (16 + bits) + in_f * 32


def fused_units(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Units of layers that share one width: each decoder layer's ``sequential`` groups (q/k/v,
    o, gate/up, down for Llama-like models); anything else alone."""
    spec = arch_spec(model)
    left = list(names)
    units: dict[str, list[str]] = {}
    if spec.layers and spec.sequential:
        n_layers = len(model.get_submodule(spec.layers))
        for i in range(n_layers):
            for grp in spec.sequential:
                members = [
                    f"{spec.layers}.{i}.{n}" for n in grp if f"{spec.layers}.{i}.{n}" in left
                ]
                if members:
                    key = f"{spec.layers}.{i}." + "+".join(m.rsplit(".", 1)[-1] for m in members)
                    units[key] = members
                    left = [n for n in left if n not in members]
    units.update({n: [n] for n in left})
    return units


def check_budget(
    budget: float,
    choices: list[int],
    group_size: int,
    shapes: dict[str, tuple[int, int]],
    units: dict[str, list[str]],
) -> None:
    """A budget outside what the widths can reach is an error naming the feasible range."""
    total = sum(i * o for i, o in shapes.values())
    lo = (
        sum(stored_bits(*shapes[m], min(choices), group_size) for ms in units.values() for m in ms)
        / total
    )
    hi = (
        sum(stored_bits(*shapes[m], max(choices), group_size) for ms in units.values() for m in ms)
        / total
    )
    if not lo <= budget <= hi:
        raise QuantlabError(
            f"bits_budget {budget} cannot be met with widths {choices} and group_size "
            f"{group_size}: the quantized layers store between {lo:.3f} and {hi:.3f} bits per "
            f"weight; choose a budget in that range (nearest feasible: "
            f"{min(max(budget, lo), hi):.3f})"
        )


def solve(
    kl: dict[str, dict[int, float]],
    cost: dict[str, dict[int, float]],
    budget_bits: float,
    steps: int = STEPS,
) -> dict[str, int]:
    """The width of each unit minimising the summed KL with the summed cost <= budget_bits
    (multiple-choice knapsack, exact DP on costs rounded up to budget_bits / steps)."""
    units = list(kl)
    quantum = budget_bits / steps
    inf = float("inf")
    dp = torch.full((steps + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    picks = []
    for u in units:
        new = torch.full_like(dp, inf)
        arg = torch.full((steps + 1,), -1, dtype=torch.int64)
        for b, k in kl[u].items():
            w = math.ceil(cost[u][b] / quantum - 1e-9)
            if w > steps:
                continue
            cand = torch.full_like(dp, inf)
            cand[w:] = dp[: steps + 1 - w] + k
            better = cand < new
            new[better], arg[better] = cand[better], b
        dp = new
        picks.append(arg)
    if not torch.isfinite(dp).any():
        raise QuantlabError("no allocation fits the budget")
    c = int(torch.argmin(dp))
    chosen: dict[str, int] = {}
    for u, arg in zip(reversed(units), reversed(picks)):
        b = int(arg[c])
        chosen[u] = b
        c -= math.ceil(cost[u][b] / quantum - 1e-9)
    return dict(reversed(list(chosen.items())))


def allocate(
    model: nn.Module,
    names: list[str],
    make_probe: Callable[[dict[str, int]], object],
    ids: torch.Tensor,
    *,
    budget: float,
    choices: list[int],
    group_size: int,
    cache: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Allocation:
    """Choose a width per fused unit of ``names`` (see the module docstring). ``make_probe``
    returns an RTN backend quantizing exactly the given {module: width}; ``ids`` are the
    sensitivity windows. ``cache``: a JSON file of the per-unit KLs, named by the caller after
    everything they depend on (model, layers, grid, windows, code): methods of a run that
    allocate on the same grid measure once. ``model`` is left as it was (float)."""
    from quantlab.sensitivity import _restore, _Runner, _snapshot

    if log is None:
        from quantlab.log import log
    t0 = time.perf_counter()
    shapes = {
        n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names
    }
    units = fused_units(model, names)
    check_budget(budget, choices, group_size, shapes, units)
    cost = {
        u: {b: sum(stored_bits(*shapes[m], b, group_size) for m in ms) for b in choices}
        for u, ms in units.items()
    }
    params = {u: sum(shapes[m][0] * shapes[m][1] for m in ms) for u, ms in units.items()}
    alloc = Allocation(
        budget,
        sorted(choices),
        group_size,
        units,
        params,
        cost,
        windows=ids.shape[0],
        seq_len=ids.shape[1],
    )
    runner = _Runner(model, ids)

    def probe(widths: dict[str, int]) -> float:
        snap = _snapshot(model, list(widths))
        try:
            make_probe(widths).quantize(model, None)
            return runner.kl(runner.start_layer(list(widths)))
        finally:
            _restore(model, snap)

    log(
        f"allocation: {len(units)} units x {len(choices)} widths, KL on "
        f"{ids.shape[0]} x {ids.shape[1]} tokens"
    )
    alloc.kl = measure(units, dict.fromkeys(units, alloc.choices), probe, cache=cache, log=log)
    total_params = sum(params.values())
    alloc.chosen = solve(alloc.kl, cost, budget * total_params)
    alloc.predicted_kl = sum(alloc.kl[u][b] for u, b in alloc.chosen.items())
    alloc.bits_per_weight = sum(cost[u][b] for u, b in alloc.chosen.items()) / total_params
    alloc.measured_kl = probe(alloc.module_bits())
    alloc.seconds = time.perf_counter() - t0
    widths = sorted(set(alloc.chosen.values()))
    mix = ", ".join(f"{sum(1 for b in alloc.chosen.values() if b == w)} x {w}-bit" for w in widths)
    log(
        f"allocation: {mix} units; {alloc.bits_per_weight:.3f} bits/weight (budget {budget}); "
        f"KL predicted {alloc.predicted_kl:.4f}, measured {alloc.measured_kl:.4f} (RTN probe) "
        f"in {alloc.seconds:.0f} s"
    )
    return alloc


def measure(
    units: dict[str, list[str]],
    choices: dict[str, list],
    probe: Callable[[dict], float],
    *,
    cache: Path | None = None,
    log: Callable[[str], None],
) -> dict[str, dict]:
    """KL of every unit at each of its ``choices[unit]`` (widths, GGUF types...): ``probe``
    of {member: choice} for the unit's members, read from ``cache`` (a JSON file of
    {unit: {str(choice): KL}}) when measured before and written back when new ones were."""
    t0 = time.perf_counter()
    known = _read_cache(cache)
    todo = [(u, c) for u in units for c in choices[u] if str(c) not in known.get(u, {})]
    total = sum(len(c) for c in choices.values())
    if known:
        log(f"allocation: {total - len(todo)} of {total} probes measured earlier in this run")
    kl: dict[str, dict] = {}
    for i, u in enumerate(units):
        kl[u] = {}
        for c in choices[u]:
            if str(c) not in known.get(u, {}):
                known.setdefault(u, {})[str(c)] = probe(dict.fromkeys(units[u], c))
            kl[u][c] = known[u][str(c)]
        if (i + 1) % max(1, len(units) // 10) == 0 and todo:
            log(
                f"allocation: {i + 1}/{len(units)} units measured "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    if cache is not None and todo:
        atomic_write_json(cache, known)
    return kl
