"""The speed phase: after every method is scored, the speed of all checkpoints of the run is
measured together, in alternation with the baseline, so that every ratio comes from
neighbouring measurements.

Each round measures ``baseline, A, baseline, B, baseline, ...`` (the methods in reverse order
on odd rounds, so a drift within a round does not always favour the same method); each
measurement reloads the checkpoint from disk, warms up and times ``eval.speed.repeats``
repeats (:func:`quantlab.bench.speed.measure_speed`). A method's ratio in a round is its
decode (prefill) tokens/s over the mean of the two baseline measurements beside it; the row
reports the median ratio over rounds and its min and max (``decode_x_float``,
``decode_x_min``, ``decode_x_max``), the medians of every pooled sample, and every raw sample
in ``metrics.json``. Rows reused on resume are measured again with the others: speed figures
of different sessions are never put side by side.

Interleaving protects ratios from a machine whose load drifts, not from a machine that is busy
throughout: OpenMP threads that share a core with another process wait for it at every
barrier (a spinning process on one of two cores made 2-thread decode more than 10x slower
here). So the phase also measures, from the kernel's CPU accounting, how many cores other
processes used on average while it ran (``speed_other_cores``); the report warns when that is
not negligible.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import statistics
import time

import torch

from quantlab.bench.size import checkpoint_quantized_bytes, checkpoint_tensor_bytes
from quantlab.bench.speed import decode_bound, measure_speed
from quantlab.checkpoint import load_checkpoint, read_sidecar
from quantlab.formats.base import DenseDequantLinear
from quantlab.records import write_record
from quantlab.results import BUSY_CORES

#: figures each measurement reports only as a median (no samples kept): median over measurements
_PER_MEASUREMENT = ("ttft_ms", "latency_p50_ms", "latency_p95_ms")


def speed_phase(plan, rows: list[dict], log) -> None:
    """Measure every row's speed in alternating rounds; the rows (and their metrics.json) get
    the figures."""
    spec = plan.recipe.eval.speed
    rows = [r for r in rows if not r.get("error") and r.get("checkpoint")]
    if not spec.enabled or not rows:
        return
    base = next((r for r in rows if r["backend"] == "none"), None)
    others = [r for r in rows if r is not base]
    log(
        f"speed: {len(rows)} checkpoints, {spec.rounds} rounds alternating with the baseline, "
        f"{spec.repeats} repeats each, {spec.mode} decode ({torch.get_num_threads()} threads)"
    )
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    samples: dict[str, list[dict]] = {r["method"]: [] for r in rows}
    ratios: dict[str, dict[str, list[float]]] = {
        r["method"]: {"decode": [], "prefill": []} for r in others
    }
    bounds: dict[str, dict] = {}
    for rnd in range(spec.rounds):
        order = others if rnd % 2 == 0 else others[::-1]
        sequence = [base] + [x for r in order for x in (r, base)] if base else list(order)
        measured = [(r, _measure(plan, r, bounds)) for r in sequence]
        for r, m in measured:
            samples[r["method"]].append(m)
        if base:
            _round_ratios(measured, ratios)
        log(f"speed: round {rnd + 1}/{spec.rounds} done ({time.perf_counter() - t0:.0f} s)")
    session = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    other = other_cores(cpu0, _cpu_seconds(), time.perf_counter() - t0)
    if other is not None and other >= BUSY_CORES:
        log(
            f"speed: other processes used {other:.2f} cores on average during the speed phase "
            f"({os.cpu_count()} cores, {torch.get_num_threads()} threads here): the figures are "
            "disturbed"
        )
    for r in rows:
        r.update(
            _row_fields(
                samples[r["method"]],
                ratios.get(r["method"]),
                r is base,
                bounds[r["method"]],
                spec.rounds,
                session,
            )
        )
        r["speed_other_cores"] = other
        write_record(plan.run_dir.metrics(r["method"]), r)


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has spent busy, CPU seconds of this process) from
    /proc/stat and os.times; None where /proc/stat does not exist (not Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [
                int(v) for v in f.readline().split()[1:9]
            ]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def other_cores(before, after, wall: float) -> float | None:
    """Average number of cores other processes kept busy between two :func:`_cpu_seconds`
    samples ``wall`` seconds apart (never below 0: the two clocks tick at different grains)."""
    if before is None or after is None or wall <= 0:
        return None
    machine, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, (machine - own) / wall)


def _measure(plan, row: dict, bounds: dict) -> dict:
    """One measurement of one checkpoint: reloaded from disk, timed, freed."""
    spec = plan.recipe.eval.speed
    ckpt = plan.run_dir.root / row["checkpoint"]
    # the kernels the row was scored with (an `auto` choice replayed, not timed again)
    kernels = row.get("kernels") or {}
    loaded = load_checkpoint(
        ckpt,
        dtype=plan.torch_dtype,
        device=plan.torch_device,
        verify=False,
        kernel=kernels.get("requested", "dense"),
        kernel_choices=kernels.get("shapes"),
    )
    m = measure_speed(
        loaded.model,
        plan.prompt,
        new_tokens=spec.new_tokens,
        batch_sizes=(1, spec.batch_size),
        warmup=spec.warmup,
        repeats=spec.repeats,
        mode=spec.mode,
    )
    if row["method"] not in bounds:
        bounds[row["method"]] = _bound(plan, loaded.model, ckpt)
    del loaded
    gc.collect()
    return m


def _bound(plan, model, ckpt) -> dict:
    """The decode speed the memory bandwidth allows (library layers count their stored bytes;
    quantlab's packed layers what their kernel reads: the dense weight, or the kernel's tensors)."""
    sizes = checkpoint_tensor_bytes(ckpt, model)
    qmodules = read_sidecar(ckpt).get("modules", [])
    stored = {
        n: checkpoint_quantized_bytes(sizes, [n]) + sizes.get(f"{n}.bias", 0)
        for n in qmodules
        if not isinstance(model.get_submodule(n), DenseDequantLinear)
    }
    return decode_bound(model, plan.env["memory_bandwidth_bytes_per_s"], stored=stored)


def _round_ratios(measured: list[tuple[dict, dict]], ratios: dict) -> None:
    """Each method's ratio to the mean of the baseline measurements on either side of it."""
    for i, (r, m) in enumerate(measured):
        if r["method"] not in ratios:
            continue
        beside = [
            measured[j][1]
            for j in (i - 1, i + 1)
            if 0 <= j < len(measured) and measured[j][0]["backend"] == "none"
        ]
        for what in ("decode", "prefill"):
            ref = statistics.fmean(b[f"{what}_tokens_per_s"] for b in beside)
            ratios[r["method"]][what].append(m[f"{what}_tokens_per_s"] / ref)


def _pooled(ms: list[dict]) -> dict:
    """Every measurement's samples per batch size, pooled (medians over all of them)."""
    out = {}
    for key in ms[0]["by_batch"]:
        parts = [m["by_batch"][key] for m in ms]
        pooled = {k: [x for p in parts for x in p[k]] for k in parts[0] if k.endswith("_samples")}
        out[key] = dict(
            batch_size=parts[0]["batch_size"],
            prompt_tokens=parts[0]["prompt_tokens"],
            new_tokens=parts[0]["new_tokens"],
            **pooled,
            **{k.removesuffix("_samples"): statistics.median(v) for k, v in pooled.items()},
        )
    return out


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _row_fields(
    ms: list[dict], ratio: dict | None, is_base: bool, bound: dict, rounds: int, session: str
) -> dict:
    pooled = _pooled(ms)
    b1 = pooled["b1"]
    others = [b for k, b in pooled.items() if k != "b1"]
    out = {k: statistics.median(m[k] for m in ms) for k in _PER_MEASUREMENT}
    out.update(
        decode_tokens_per_s=b1["decode_tokens_per_s"],
        prefill_tokens_per_s=b1["prefill_tokens_per_s"],
        decode_tokens_per_s_min=min(b1["decode_tokens_per_s_samples"]),
        decode_tokens_per_s_max=max(b1["decode_tokens_per_s_samples"]),
        decode_bound_tokens_per_s=bound["decode_bound_tokens_per_s"],
        decode_fraction_of_bound=b1["decode_tokens_per_s"] / bound["decode_bound_tokens_per_s"],
        decode_batch_size=others[0]["batch_size"] if others else None,
        decode_tokens_per_s_batch=others[0]["decode_tokens_per_s"] if others else None,
        speed_rounds=rounds,
        speed_session=session,
        decode_bound=bound,
        speed_mode=ms[0]["mode"],
        compile_s=_median_or_none([m["by_batch"]["b1"].get("compile_s") for m in ms]),
        speed={
            "by_batch": pooled,
            "measurements": ms,
            "ratios": ratio,
            "rounds": rounds,
            "threads": ms[0]["threads"],
            "device": ms[0]["device"],
        },
    )
    if is_base:
        out.update(decode_x_float=1.0, decode_x_min=1.0, decode_x_max=1.0, prefill_x_float=1.0)
    elif ratio:
        out.update(
            decode_x_float=statistics.median(ratio["decode"]),
            decode_x_min=min(ratio["decode"]),
            decode_x_max=max(ratio["decode"]),
            prefill_x_float=statistics.median(ratio["prefill"]),
        )
    return out
