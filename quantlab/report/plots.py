"""The report's plots (matplotlib). Each function takes a results frame (one run, or several
from :func:`quantlab.load_results`) and returns a ``Figure``, so notebooks show them inline;
:func:`save_figure` writes PNG and SVG. A function returns ``None`` when the frame holds
nothing for it to draw (no speed measured, no per-layer statistics...)."""

from __future__ import annotations

import io
import math
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from quantlab.errors import MissingDependencyError
from quantlab.records import atomic_write_bytes

BASE_COLOR = "#222222"
PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
]
_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:.*\.)?([^.]+)$")


def pyplot():
    """matplotlib.pyplot, on the file-only Agg backend outside Jupyter."""
    try:
        import matplotlib

        # Files only (no windows), except inside Jupyter, whose inline backend shows the figures.
        if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "report", "drawing plots") from None
    return plt


def context_line(frame: pd.DataFrame) -> str:
    """What the numbers were measured on, for plot titles: model, corpus, convention."""

    def one(col: str) -> str:
        vals = [str(v) for v in frame[col].dropna().unique()] if col in frame else []
        return vals[0] if len(vals) == 1 else (f"{len(vals)} {col}s" if vals else "?")

    model = one("model")
    conv = one("ppl_convention")
    seq = one("eval_seq_len")
    return f"{model} · {one('eval_source')} · perplexity convention {conv} (ctx {seq})"


def _label(row: pd.Series, multi: bool) -> str:
    return f"{Path(str(row['run'])).name}/{row['method']}" if multi else str(row["method"])


def _multi(frame: pd.DataFrame) -> bool:
    return "run" in frame.columns and frame["run"].nunique() > 1


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower x and lower y are better), sorted
    by x: each point of the front has a lower y than every point with smaller or equal x."""
    front: list[tuple[float, float]] = []
    best = math.inf
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y))
            best = y
    return front


def quality_vs_size(frame: pd.DataFrame):
    """Perplexity (and KL, when measured) against stored bits per weight: one point per
    method, the Pareto front of each run drawn, the float baseline marked with a star."""
    plt = pyplot()
    metrics = [("ppl", "perplexity (lower is better)", False)]
    if "kld_mean" in frame and frame["kld_mean"].notna().any():
        metrics.append(("kld_mean", "mean KL(base ‖ method), nats/token (log)", True))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.6), squeeze=False)
    multi = _multi(frame)
    groups = list(frame.groupby("run", sort=False)) if multi else [(None, frame)]
    for ax, (col, ylabel, log) in zip(axes[0], metrics):
        for k, (run, part) in enumerate(groups):
            color = PALETTE[k % len(PALETTE)]
            data = part[part[col].notna() & part["bits_per_weight"].notna()]
            if log:  # KL of the baseline against itself is zero by definition: not drawn
                data = data[(data[col] > 0) & (data["backend"] != "none")]
            quant = data[data["backend"] != "none"]
            base = data[data["backend"] == "none"]
            name = Path(str(run)).name if multi else None
            ax.scatter(
                quant["bits_per_weight"],
                quant[col],
                color=color,
                s=36,
                zorder=3,
                label=f"{name}: methods" if multi else "quantized methods",
            )
            if len(base):
                ax.scatter(
                    base["bits_per_weight"],
                    base[col],
                    marker="*",
                    s=180,
                    color=BASE_COLOR if not multi else color,
                    edgecolor="black",
                    zorder=4,
                    label=f"{name}: float baseline" if multi else "float baseline",
                )
                ax.axhline(
                    float(base[col].iloc[0]), color=color if multi else BASE_COLOR, lw=0.7, ls=":"
                )
            front = pareto_front(
                list(zip(data["bits_per_weight"].astype(float), data[col].astype(float)))
            )
            if len(front) > 1:
                xs, ys = zip(*front)
                ax.step(
                    xs,
                    ys,
                    where="post",
                    color=color,
                    lw=1.2,
                    alpha=0.7,
                    label=f"{name}: Pareto front" if multi else "Pareto front",
                )
            _annotate(
                ax,
                data["bits_per_weight"].astype(float).tolist(),
                data[col].astype(float).tolist(),
                [_label(r, multi) for _, r in data.iterrows()],
                log,
            )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(plt.FixedLocator([1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64]))
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("stored bits per weight (log2 scale; weight files on disk)")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
            # KLs within one decade would get no labelled tick at all: label 1-2-5 steps
            ax.yaxis.set_major_locator(plt.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7.5, loc="best")
    fig.suptitle(f"Quality vs size\n{context_line(frame)}", fontsize=10)
    fig.tight_layout()
    return fig


def _annotate(ax, xs: list[float], ys: list[float], labels: list[str], log_y: bool) -> None:
    """Label points; labels of points that (nearly) coincide are stacked, not overprinted."""
    ymin, ymax = (min(ys), max(ys)) if ys else (0.0, 1.0)

    def key(x: float, y: float) -> tuple[float, float]:
        yy = math.log10(y) if log_y and y > 0 else y
        span = (math.log10(ymax) - math.log10(ymin)) if log_y and ymin > 0 else (ymax - ymin)
        return math.log2(x) if x > 0 else x, yy / (span or 1.0)

    placed: list[tuple[float, float]] = []
    for x, y, text in sorted(zip(xs, ys, labels), key=lambda t: (t[0], t[1])):
        kx, ky = key(x, y)
        near = sum(1 for px, py in placed if abs(px - kx) < 0.35 and abs(py - ky) < 0.06)
        placed.append((kx, ky))
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(5, 4 + 9 * near), fontsize=7.5
        )


def speed(frame: pd.DataFrame):
    """Prefill and decode tokens/s per method (batch 1, median with min-max), with the
    memory-bandwidth bound of decode drawn for each method."""
    if "decode_tokens_per_s" not in frame or frame["decode_tokens_per_s"].isna().all():
        return None
    plt = pyplot()
    multi = _multi(frame)
    data = frame[frame["decode_tokens_per_s"].notna()].reset_index(drop=True)
    names = [_label(r, multi) for _, r in data.iterrows()]
    colors = [BASE_COLOR if b == "none" else PALETTE[0] for b in data["backend"]]
    y = list(range(len(data)))
    height = max(3.2, 0.42 * len(data) + 2.2)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    if data["prefill_tokens_per_s"].notna().any():
        ax1.barh(y, data["prefill_tokens_per_s"].fillna(0), color=colors, alpha=0.85)
    ax1.set_xlabel("prefill tokens/s (prompt processing, batch 1)")
    ax1.set_yticks(y, names, fontsize=8)
    ax1.invert_yaxis()
    med = data["decode_tokens_per_s"]
    lo = (med - data["decode_tokens_per_s_min"]).clip(lower=0).fillna(0)
    hi = (data["decode_tokens_per_s_max"] - med).clip(lower=0).fillna(0)
    ax2.barh(
        y, med, xerr=[lo, hi], color=colors, alpha=0.85, capsize=3, label="decode, median (min-max)"
    )
    if "decode_bound_tokens_per_s" in data and data["decode_bound_tokens_per_s"].notna().any():
        ax2.scatter(
            data["decode_bound_tokens_per_s"],
            y,
            marker="|",
            s=400,
            color="#d62728",
            zorder=4,
            label="bound: memory bandwidth / weight bytes per token",
        )
    ax2.set_xlim(left=0)  # linear from zero: bar lengths compare like the numbers do
    ax2.set_xlabel("decode tokens/s (batch 1, KV cache)")
    ax2.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="x", which="both")
    dev = ", ".join(
        sorted({f"{d} {t}" for d, t in zip(data["device"].astype(str), data["dtype"].astype(str))})
    )
    threads = ", ".join(sorted({str(int(t)) for t in data["threads"].dropna()}))
    fig.suptitle(
        f"Speed on {dev}, {threads} threads (float baseline in black)\n{context_line(frame)}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _layer_table(layers: dict[str, dict[str, float]], stat: str) -> pd.DataFrame | None:
    """Rows: decoder block index; columns: linear type (q_proj, ...); values: the statistic.
    Layers outside the decoder blocks (lm_head) are left out."""
    cells = {}
    for name, stats in layers.items():
        m = _LAYER.match(name)
        if m and stat in stats and stats[stat] is not None:
            cells[(int(m.group(1)), m.group(2))] = float(stats[stat])
    if not cells:
        return None
    table = pd.Series(cells).unstack()
    order = [
        c
        for c in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        if c in table
    ]
    return table[order + [c for c in table.columns if c not in order]].sort_index()


LAYER_STATS = {
    "weight_rel_error": "relative weight error ‖ΔW‖/‖W‖",
    "output_rel_error": "relative output error on calibration inputs",
}


def layer_error(
    metrics: dict[str, dict[str, Any]],
    frame: pd.DataFrame | None = None,
    stat: str = "weight_rel_error",
):
    """Per-layer quantization error as one heat map per method (decoder block × linear
    type), for the methods whose backend records it (rtn, gptq, awq)."""
    tables = {
        label: t
        for label, m in metrics.items()
        if (t := _layer_table(m.get("layers") or {}, stat)) is not None
    }
    if not tables:
        return None
    plt = pyplot()
    vmin = min(float(t.min().min()) for t in tables.values())
    vmax = max(float(t.max().max()) for t in tables.values())
    n = len(tables)
    blocks = max(len(t) for t in tables.values())
    fig, axes = plt.subplots(
        1,
        n,
        figsize=(max(4.5, 3.2 * n + 1.5), max(3.5, 0.16 * blocks + 1.8)),
        squeeze=False,
        sharey=True,
    )
    im = None
    for ax, (label, t) in zip(axes[0], tables.items()):
        im = ax.imshow(
            t.to_numpy(dtype=float),
            aspect="auto",
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_xticks(
            range(len(t.columns)),
            [c.replace("_proj", "") for c in t.columns],
            rotation=45,
            fontsize=8,
        )
        ax.set_title(label, fontsize=9)
        worst = t.stack().idxmax()
        ax.set_xlabel(f"worst: block {worst[0]} {worst[1]} ({t.stack().max():.3f})", fontsize=7.5)
    axes[0][0].set_ylabel("decoder block")
    cbar = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    cbar.set_label(LAYER_STATS.get(stat, stat), fontsize=8)
    title = "Per-layer quantization error (which layers suffer most)"
    if frame is not None:
        title += f"\n{context_line(frame)}"
    fig.suptitle(title, fontsize=10)
    return fig


def quantization_cost(frame: pd.DataFrame, metrics: dict[str, dict[str, Any]] | None = None):
    """Time to quantize each method, split into the backend's named stages (plus the
    sensitivity pass), and peak resident memory while quantizing, loading and scoring.
    ``metrics`` maps a row's label (the method; ``run-name/method`` across several runs) to
    its metrics.json."""
    plt = pyplot()
    metrics = metrics or {}
    multi = _multi(frame)
    data = frame.reset_index(drop=True)
    names = [_label(r, multi) for _, r in data.iterrows()]
    stage_rows = []
    for _, r in data.iterrows():
        m = metrics.get(_label(r, multi), {})
        stages = dict(m.get("quantize_stages") or {})
        if not stages:
            stages = {"quantize": r.get("quantize_s") or 0.0}
        if pd.notna(r.get("sensitivity_s")):
            stages = {"sensitivity pass": r["sensitivity_s"], **stages}
        stage_rows.append({k: max(float(v or 0.0), 0.0) for k, v in stages.items()})
    stages = pd.DataFrame(stage_rows).fillna(0.0)
    y = list(range(len(data)))
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(12, max(3.2, 0.42 * len(data) + 2.2)), sharey=True
    )
    left = [0.0] * len(data)
    for k, col in enumerate(stages.columns):
        ax1.barh(y, stages[col], left=left, color=PALETTE[k % len(PALETTE)], label=col)
        left = [a + b for a, b in zip(left, stages[col])]
    ax1.set_yticks(y, names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds to quantize (stacked by stage)")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, frameon=False)
    mem_cols = [
        ("peak_rss_quantize_bytes", "quantize"),
        ("peak_rss_load_bytes", "reload"),
        ("peak_rss_eval_bytes", "score"),
    ]
    width = 0.27
    for k, (col, label) in enumerate(mem_cols):
        if col in data and data[col].notna().any():
            ax2.barh(
                [v + (k - 1) * width for v in y],
                data[col].fillna(0) / 1e6,
                height=width,
                color=PALETTE[k + 3],
                label=label,
            )
    ax2.set_xlabel("peak resident memory of the process, MB")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, frameon=False)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="x")
    dev = ", ".join(sorted({str(d) for d in data["device"].dropna()}))
    fig.suptitle(f"Cost of quantization on {dev}\n{context_line(frame)}", fontsize=10)
    fig.tight_layout()
    return fig


def _deploy_x(records: list[dict]) -> tuple[str, str]:
    """KL when the rows measured it (log axis), else perplexity."""
    if any((r["kld_mean"] or 0) > 0 for r in records if r["backend"] != "none"):
        return "kld_mean", "mean KL(base ‖ method), measured (log)"
    return "ppl", "perplexity, measured"


def _deploy_panel(ax, mine: list[dict], key: str, xcol: str, multi: bool) -> None:
    shown = [
        r
        for r in mine
        if r["fits"] and r["backend"] != "none" and r[xcol] is not None and r[xcol] > 0
    ]
    for r in [r for r in mine if r["fits"] and r["backend"] == "none"]:
        ax.axhline(r[key], color=BASE_COLOR, lw=0.8, ls=":")
    if shown:
        xs, ys = [r[xcol] for r in shown], [r[key] for r in shown]
        ax.scatter(xs, ys, color=PALETTE[0], s=30, zorder=3)
        labels = [f"{Path(r['run']).name}/{r['method']}" if multi else r["method"] for r in shown]
        _annotate(ax, xs, ys, labels, True)
    if not any(r["fits"] for r in mine):
        ax.text(
            0.5, 0.5, "fits none of the rows", transform=ax.transAxes, ha="center", color="#d62728"
        )


def deploy(records: list[dict]):
    """Where to deploy: per card (columns), projected decode (top) and prefill (bottom)
    tokens/s of the rows that fit, against their measured KL; rows that do not fit are left
    out (the table says so). Every axis says *projected*."""
    if not records:
        return None
    plt = pyplot()
    cards = list(dict.fromkeys(r["card"] for r in records))
    xcol, xlabel = _deploy_x(records)
    multi = len({r["run"] for r in records}) > 1
    keys = ("decode_tokens_per_s_projected", "prefill_tokens_per_s_projected")
    fig, axes = plt.subplots(
        2, len(cards), figsize=(3.2 * len(cards) + 1, 6.4), squeeze=False, sharey="row"
    )
    for j, card in enumerate(cards):
        mine = [r for r in records if r["card"] == card]
        for i, key in enumerate(keys):
            ax = axes[i][j]
            _deploy_panel(ax, mine, key, xcol, multi)
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
            if xcol == "kld_mean":
                ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.tick_params(labelsize=7)
        fit = sum(r["fits"] for r in mine)
        axes[0][j].set_title(f"{card}\n{fit} of {len(mine)} rows fit", fontsize=8.5)
        axes[1][j].set_xlabel(xlabel, fontsize=7.5)
    for i, key in enumerate(keys):  # linear from zero, one scale per row: heights compare as values
        axes[i][0].set_ylim(0, 1.15 * max((r[key] for r in records if r[key]), default=1.0))
    axes[0][0].set_ylabel("decode tok/s, PROJECTED", fontsize=8)
    axes[1][0].set_ylabel("prefill tok/s, PROJECTED", fontsize=8)
    first = records[0]
    fig.suptitle(
        f"Where to deploy — PROJECTED tokens/s, not measured (context "
        f"{first['context']}, batch {first['batch']}; docs/hardware.md)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def sensitivity(doc: dict, label: str):
    """Bar chart of the sensitivity pass's per-candidate KL (log scale), the candidates it left
    in float in red; ``doc`` is the method's ``sensitivity.json``."""
    plt = pyplot()
    sens = doc["sensitivity"]
    names = list(sens)
    values = [max(float(sens[n]), 1e-8) for n in names]
    chosen = set(doc.get("chosen") or [])
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names) + 2), 3.6))
    ax.bar(
        range(len(names)), values, color=["#c0392b" if n in chosen else "#2c7fb8" for n in names]
    )
    ax.set_yscale("log")
    ax.set_ylabel("KL(float || quantized), nats/token")
    ax.set_title(
        f"{label}: sensitivity per {doc.get('granularity', 'layer')} "
        f"({len(chosen)} left in float, red)"
    )
    if len(names) <= 40:
        ax.set_xticks(
            range(len(names)),
            [n.replace("model.layers.", "L") for n in names],
            rotation=90,
            fontsize=7,
        )
    else:
        ax.set_xlabel("layers in model order")
    if doc.get("kl_budget") is not None:
        ax.axhline(
            doc["kl_budget"], color="black", lw=0.8, ls="--", label=f"kl_budget {doc['kl_budget']}"
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def allocation(record: dict, label: str):
    """Width per unit across the decoder blocks, one line per unit type; ``record`` is the
    ``allocation`` entry of the method's ``sensitivity.json``."""
    plt = pyplot()
    series: dict[str, list[tuple[int, int]]] = {}
    for unit, bits in record["chosen"].items():
        m = re.search(r"\.(\d+)\.([^.]+(?:\.[^.]+)*)$", unit)
        kind, idx = (m.group(2), int(m.group(1))) if m else (unit, 0)
        series.setdefault(kind, []).append((idx, bits))
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for k, (kind, pts) in enumerate(sorted(series.items())):
        xs, ys = zip(*sorted(pts))
        ax.step(xs, [y + 0.06 * (k - len(series) / 2) for y in ys], where="mid", label=kind, lw=1.4)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("bits per code")
    ax.set_yticks(sorted(set(record["chosen"].values())))
    ax.set_title(
        f"{label}: widths at {record['bits_per_weight']:.2f} bits/weight (budget "
        f"{record['budget_bits_per_weight']}); RTN-probe KL {record['measured_kl']:.4f} "
        "on calibration windows",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=min(4, len(series)))
    fig.tight_layout()
    return fig


def png_bytes(fig) -> bytes:
    """A figure as PNG bytes (closed afterwards)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, directory: Path, name: str) -> dict[str, Path]:
    """Write ``name.png`` and ``name.svg`` into ``directory`` (atomically); close the figure."""
    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for ext, kw in (("png", {"dpi": 110}), ("svg", {})):
        buf = io.BytesIO()
        # bbox "tight": legends placed below the axes stay in the picture
        fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
        out[ext] = directory / f"{name}.{ext}"
        atomic_write_bytes(out[ext], buf.getvalue())
    plt.close(fig)
    return out
