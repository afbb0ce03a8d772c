"""Efficiencies fitted to measurements: one profile for GPU engines (published anchors) and one
per CPU engine (this repository's measurements; ``scripts/bench_projection.py`` refits them on
the machine at hand).

Decode at batch 1 is ``t = bytes / (bandwidth x memory) + layers x overhead``: two unknowns,
fitted by least squares on the relative error of the step time, with ``memory <= 1`` and
``overhead >= 0``. Prefill's compute efficiency is the geometric mean over the prefill anchors
of ``FLOPs / peak / (t - layers x overhead)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from quantlab.hardware.anchors import CPU_DECODE, GPU_DECODE, GPU_PREFILL, Anchor
from quantlab.hardware.projection import Efficiency, decode_rate, prefill_rate

#: a CPU's "peak" is its measured float32 matmul rate, so prefill's share of it is near 1 by
#: construction; provisional until scripts/bench_projection.py fits it on a quiet machine
CPU_COMPUTE_EFFICIENCY = 1.0
CPU_ENGINES = tuple(CPU_DECODE)


def _decode_terms(a: Anchor) -> tuple[float, float]:
    """(bandwidth-bound time, layers), both over the measured step time."""
    t = 1 / a.measured_tokens_per_s
    step_bytes = a.read_bytes + a.tokens * a.shape.kv_bytes_per_token(a.kv_bytes)
    return step_bytes / a.card.bandwidth_bytes_per_s / t, a.shape.layers / t


def fit_decode(anchors: Sequence[Anchor]) -> tuple[float, float]:
    """(memory efficiency, seconds of overhead per layer) that best reproduce the anchors."""
    terms = [_decode_terms(a) for a in anchors]
    su, sv = sum(u for u, _ in terms), sum(v for _, v in terms)
    suu, svv, suv = (
        sum(u * u for u, _ in terms),
        sum(v * v for _, v in terms),
        sum(u * v for u, v in terms),
    )
    det = suu * svv - suv * suv
    if len(terms) < 2 or det <= 1e-12 * suu * svv:
        raise ValueError(
            "fitting memory efficiency and overhead needs two anchors of different sizes"
        )
    inv_eff, overhead = (su * svv - sv * suv) / det, (suu * sv - suv * su) / det
    if inv_eff < 1:  # faster than the bandwidth allows: the bandwidth figure is low, not the model
        inv_eff, overhead = 1.0, (sv - suv) / svv
    if overhead < 0:
        inv_eff, overhead = max(1.0, su / suu), 0.0
    return 1 / inv_eff, overhead


def fit_compute(anchors: Sequence[Anchor], overhead_s: float) -> float:
    """Prefill's share of peak throughput, the geometric mean over ``anchors``."""
    shares = []
    for a in anchors:
        busy = 1 / a.measured_tokens_per_s * a.tokens - a.shape.layers * overhead_s
        if busy <= 0:
            raise ValueError(f"anchor {a.name}: faster than its layers' overhead alone")
        shares.append(a.shape.prefill_flops(a.tokens) / a.card.peak(a.compute) / busy)
    return math.exp(sum(map(math.log, shares)) / len(shares))


def _names(anchors: Sequence[Anchor]) -> str:
    return "; ".join(a.name for a in anchors)


@functools.cache
def gpu_efficiency() -> Efficiency:
    """The GPU profile, fitted to every published anchor."""
    memory, overhead = fit_decode(GPU_DECODE)
    compute = fit_compute(GPU_PREFILL, overhead)
    return Efficiency(
        memory,
        compute,
        overhead,
        f"fit to {len(GPU_DECODE)} published GPU decode anchors ({_names(GPU_DECODE)}) and "
        f"{len(GPU_PREFILL)} prefill anchors (TensorRT-LLM); docs/hardware.md",
    )


@functools.cache
def cpu_efficiency(engine: str) -> Efficiency:
    """The profile of a CPU engine ('torch eager', 'torch compiled', 'llama.cpp')."""
    anchors = CPU_DECODE[engine]
    memory, overhead = fit_decode(anchors)
    return Efficiency(
        memory,
        CPU_COMPUTE_EFFICIENCY,
        overhead,
        f"{engine} on CPU: fit to {len(anchors)} measurements on a 2-core Xeon VM "
        f"({anchors[0].source}); refit here with scripts/bench_projection.py",
    )


def project_anchor(a: Anchor, eff: Efficiency) -> float:
    """The projection's tokens/s for what ``a`` measured."""
    kv = a.shape.kv_bytes_per_token(a.kv_bytes)
    if a.kind == "decode":
        return decode_rate(a.shape, a.read_bytes, kv, a.tokens, 1, a.card, eff, a.compute)[0]
    return prefill_rate(a.shape, a.read_bytes, a.tokens, 1, a.card, eff, a.compute)[0]


def anchor_errors(anchors: Sequence[Anchor], eff: Efficiency) -> list[dict]:
    """Each anchor's projection against its measurement (error = projected / measured - 1)."""
    out = []
    for a in anchors:
        p = project_anchor(a, eff)
        out.append(
            {
                "anchor": a.name,
                "card": a.card.name,
                "engine": a.engine,
                "kind": a.kind,
                "measured_tokens_per_s": a.measured_tokens_per_s,
                "projected_tokens_per_s": p,
                "error": p / a.measured_tokens_per_s - 1,
                "source": a.source,
            }
        )
    return out
