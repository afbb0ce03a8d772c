"""The self-contained HTML report (jinja2 template, plots embedded as PNG data URIs) and the
files written next to it: results.md, plots/*.png|svg, and for a comparison the combined
results.csv / results.parquet."""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from quantlab import __version__
from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.layout import (
    PLOTS as PLOTS_DIR,
)
from quantlab.layout import (
    REPORT_HTML,
    RESULTS_CSV,
    RESULTS_MD,
    RESULTS_PARQUET,
    SENSITIVITY,
)
from quantlab.records import atomic_write_bytes, atomic_write_text
from quantlab.report import plots as P
from quantlab.report.caveats import report_warnings
from quantlab.report.data import RunData, combined_frame, load_runs
from quantlab.report.serving import PLOT as SERVING_PLOT
from quantlab.report.serving import serving_plot
from quantlab.report.tables import (
    CONVENTION_TEXT,
    deploy_frame,
    markdown_table,
    summary_frame,
)
from quantlab.results import write_parquet
from quantlab.rundir import owned_path, prepare_run_dir

TEMPLATE = "report.html.j2"

PLOTS = [
    (
        "quality_vs_size",
        "Quality vs size",
        "One point per method: perplexity (left) and mean KL divergence from the float model "
        "(right) against the stored bits per weight of its weight files; the line is the Pareto "
        "front (no other method is both smaller and better); the star is the float baseline.",
    ),
    (
        "speed",
        "Speed",
        "Prefill and decode tokens/s at batch 1 (median, bars: min-max of the repeats); red ticks: "
        "the memory-bandwidth bound of decode (measured bandwidth / weight bytes read per token).",
    ),
    (
        "layer_error",
        "Per-layer quantization error",
        "Relative weight error per linear layer (decoder block × layer type) for the methods that "
        "record it; one colour scale for all panels.",
    ),
    (
        "quantization_cost",
        "Cost of quantization",
        "Seconds to quantize, stacked by the backend's stages (other: forward passes, packing...), "
        "and the "
        "process's peak resident memory while quantizing, reloading the checkpoint and scoring it.",
    ),
    SERVING_PLOT,
]


def _jinja_env():
    try:
        import jinja2
    except ImportError:
        raise MissingDependencyError("jinja2", "report", "writing the HTML report") from None
    return jinja2.Environment(
        loader=jinja2.PackageLoader("quantlab.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _mb(v: Any) -> str:
    return "" if v is None or pd.isna(v) else f"{float(v) / 1e6:.1f} MB"


def _floor_fact(row) -> str:
    if pd.isna(row.get("kld_floor")):
        return ""
    return (
        f"; noise floor {row['kld_floor']:.5f} (the float model in {row['kld_floor_dtype']} "
        "against itself)"
    )


def _s(v: Any) -> str:
    return "" if v is None or pd.isna(v) else f"{float(v):.1f} s"


def _facts(frame: pd.DataFrame, runs: list[RunData]) -> list[tuple[str, str]]:
    def vals(col: str) -> str:
        v = [str(x) for x in frame[col].dropna().unique()] if col in frame else []
        return ", ".join(v) if v else "?"

    convs = []
    for conv, seq in (
        frame[["ppl_convention", "eval_seq_len"]].drop_duplicates().itertuples(index=False)
    ):
        convs.append(f"{conv} — {CONVENTION_TEXT.get(str(conv), '').format(seq=seq)}")
    first = frame.iloc[0]
    facts = [
        ("model", vals("model")),
        (
            "evaluation text",
            f"{vals('eval_source')} (sha256 {vals('eval_sha256')[:16]}…), "
            f"{vals('eval_tokens')} scored tokens",
        ),
        ("tokenizer", vals("tokenizer")),
        ("perplexity convention", "; ".join(convs)),
    ]
    if "kld_mean" in frame and frame["kld_mean"].notna().any():
        facts.append(
            (
                "divergence",
                f"mean KL(base ‖ method) per token over {vals('kld_tokens')} tokens of the same "
                "windows; top1_%: tokens where both models rank the same token first",
            )
        )
    cpu = ", ".join(
        sorted({str(r.environment.get("cpu")) for r in runs if r.environment.get("cpu")})
    )
    facts.append(
        (
            "device",
            f"{vals('device')}, {vals('dtype')}, {vals('threads')} threads"
            + (f", {cpu}" if cpu else ""),
        )
    )
    if pd.notna(first.get("decode_tokens_per_s")):
        facts.append(
            (
                "speed",
                "batch 1 with KV cache; median (min-max) of repeats; ratios inside the spread are "
                "noise",
            )
        )
    facts.append(
        (
            "size",
            "weight files on disk; bits/weight: stored bits of the quantized layers' weights, "
            "scales and zero points per weight",
        )
    )
    return facts


def _png_b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _png_size(path: Path) -> tuple[int, int]:
    head = Path(path).read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _method_figures(run: RunData, method: str, label: str, own: bool) -> dict[str, str]:
    """The sensitivity and allocation figures of a method, drawn from its sensitivity.json
    (base64 PNG for the page). In a run's own report they are also kept beside the JSON
    (``sensitivity.png``, ``allocation.png``); a report elsewhere never writes into a run."""
    path = run.path / method / SENSITIVITY
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return {}  # unreadable: the row's numbers are in results.csv, the figure is left out
    out: dict[str, str] = {}
    drawn = [
        ("sensitivity", doc if "sensitivity" in doc else None, P.sensitivity),
        ("allocation", doc.get("allocation") if isinstance(doc, dict) else None, P.allocation),
    ]
    for name, data, draw in drawn:
        if not isinstance(data, dict):
            continue
        try:
            png = P.png_bytes(draw(data, label))
        except (KeyError, TypeError, ValueError):
            continue  # a record of another shape (written by an older quantlab): no figure
        if own:  # replaces a link left there, never writes through it
            atomic_write_bytes(run.path / method / f"{name}.png", png)
        out[f"{name}_png"] = base64.b64encode(png).decode("ascii")
    return out


def _method_details(run: RunData, row: pd.Series, label: str, own: bool) -> dict[str, Any]:
    m = run.metrics.get(str(row["method"]), {})
    facts = [("backend", row["backend"])]
    ckpt = m.get("checkpoint") or row.get("checkpoint")
    if ckpt and isinstance(ckpt, str):
        path = run.path / ckpt
        facts.append(("checkpoint", str(path) + ("" if path.exists() else " (no longer on disk)")))
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            facts.append(
                (
                    "checkpoint files",
                    ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in files),
                )
            )
    facts += [
        ("weight files", _mb(row.get("size_bytes"))),
        ("checkpoint directory", _mb(row.get("checkpoint_bytes"))),
        (
            "bits per weight",
            "" if pd.isna(row.get("bits_per_weight")) else f"{row['bits_per_weight']:.3f}",
        ),
        ("kernel", row.get("kernel") or ""),
    ]
    ppl = f"{row['ppl']:.4f}" + (
        "" if pd.isna(row.get("ppl_stderr")) else f" ± {row['ppl_stderr']:.4f}"
    )
    facts.append(
        (
            "perplexity",
            f"{ppl} ({row['ppl_convention']}, ctx {row['eval_seq_len']}, {row['eval_tokens']} "
            "tokens)",
        )
    )
    if pd.notna(row.get("kld_mean")):
        facts.append(
            (
                "KL divergence",
                f"mean {row['kld_mean']:.5f}, p99 {row['kld_p99']:.4f}, top-1 agreement "
                f"{100 * row['top1_agreement']:.2f}%" + _floor_fact(row),
            )
        )
    stages = m.get("quantize_stages") or {}
    split = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items() if v is not None)
    facts.append(
        ("quantization time", _s(row.get("quantize_s")) + (f" ({split})" if split else ""))
    )
    if pd.notna(row.get("sensitivity_s")):
        facts.append(
            (
                "sensitivity pass",
                f"{_s(row['sensitivity_s'])}, {int(row['skipped_layers'])} layers left in float",
            )
        )
    facts += [
        (
            "export / reload / scoring",
            f"{_s(row.get('export_s'))} / {_s(row.get('load_s'))} / {_s(row.get('eval_s'))}",
        ),
        (
            "peak memory (quantize / reload / score)",
            f"{_mb(row.get('peak_rss_quantize_bytes'))} / {_mb(row.get('peak_rss_load_bytes'))} / "
            f"{_mb(row.get('peak_rss_eval_bytes'))} resident",
        ),
    ]
    if pd.notna(row.get("decode_tokens_per_s")):
        facts.append(
            (
                "speed",
                f"prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode "
                f"{row['decode_tokens_per_s']:.2f} tok/s "
                f"({row['decode_tokens_per_s_min']:.2f}-{row['decode_tokens_per_s_max']:.2f}), "
                f"bound {row['decode_bound_tokens_per_s']:.1f} tok/s"
                if pd.notna(row.get("decode_bound_tokens_per_s"))
                else f"prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode "
                f"{row['decode_tokens_per_s']:.2f} tok/s",
            )
        )
    if m.get("measured_at"):
        facts.append(("measured at", m["measured_at"]))
    layers = m.get("layers") or {}
    errs = sorted(
        (
            (n, s["weight_rel_error"])
            for n, s in layers.items()
            if s.get("weight_rel_error") is not None
        ),
        key=lambda x: -x[1],
    )[:5]
    figures = _method_figures(run, str(row["method"]), label, own)
    return {
        "label": label,
        "anchor": re.sub(r"[^A-Za-z0-9_-]", "-", label),
        "backend": row["backend"],
        "facts": [(k, v) for k, v in facts if v not in ("", None)],
        "options": json.dumps(m["options"], indent=2) if m.get("options") else "",
        "worst_layers": [(n, f"relative weight error {v:.4f}") for n, v in errs],
        "sensitivity_png": figures.get("sensitivity_png", ""),
        "allocation_png": figures.get("allocation_png", ""),
        "granularity": ((m.get("sensitivity") or {}).get("granularity") or "layer"),
    }


def _env_rows(env: dict) -> list[tuple[str, str]]:
    rows = []
    for k, v in env.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        elif k == "memory_bandwidth_bytes_per_s" and v:
            k, v = "memory bandwidth (measured)", f"{float(v) / 1e9:.1f} GB/s"
        rows.append((k, str(v)))
    return rows


DEPLOY_CAPTION = (
    "Per card (columns): projected decode (top) and prefill (bottom) tokens/s of "
    "the rows that fit, against their measured quality; dotted line: the float "
    "baseline (served in 16 bits). Projections, not measurements."
)


def _deploy_section(runs: list[RunData], plots_dir: Path, out: Path) -> dict[str, Any]:
    """ "Where to deploy": every row on the built-in GPU cards at the default context, batch 1
    (this machine's own speeds are the measured columns above: no CPU projection beside them).
    A run that cannot be projected gets a sentence saying why, never a partial table."""
    from quantlab.hardware.cards import CARDS
    from quantlab.hardware.deploy import nothing_fits, project_rows, resolve_context
    from quantlab.hardware.efficiency import gpu_efficiency
    from quantlab.hardware.rows import run_rows

    try:
        pairs = [run_rows(run) for run in runs]
        rows, skipped = [r for p in pairs for r in p[0]], [s for p in pairs for s in p[1]]
        if not rows:
            raise QuantlabError("no row can be projected: " + "; ".join(skipped))
        records = project_rows(rows, list(CARDS), resolve_context(rows, None), 1)
    except (QuantlabError, OSError, ValueError) as e:  # a damaged file: the report is still written
        return {"error": f"not projected: {e}"}
    cards = [
        {
            "summary": c.summary(),
            "sources": c.source_line(),
            "empty": nothing_fits(records, c.name),
            "table_html": deploy_frame([r for r in records if r["card"] == c.name]).to_html(
                index=False, classes="deploy", border=0, escape=True
            ),
        }
        for c in CARDS
    ]
    eff = gpu_efficiency()
    how = (
        f"memory {eff.memory:.2f} of datasheet bandwidth, {eff.layer_overhead_s * 1e6:.0f} µs "
        f"per layer per forward, prefill {eff.compute:.2f} of peak: {eff.source}"
    )
    plot = _figure(
        P.deploy(records), plots_dir, out, "deploy", "Where to deploy (projected)", DEPLOY_CAPTION
    )
    return {
        "error": "",
        "cards": cards,
        "notes": skipped,
        "context": records[0]["context"],
        "efficiency": how,
        "plot": plot,
    }


def _figure(
    fig, plots_dir: Path, out: Path, name: str, title: str, caption: str
) -> dict[str, Any] | None:
    if fig is None:
        return None
    files = P.save_figure(fig, plots_dir, name)
    w, h = _png_size(files["png"])
    return {
        "name": name,
        "title": title,
        "caption": caption,
        "png_b64": _png_b64(files["png"]),
        "svg": str(files["svg"].relative_to(out)),
        "width": w,
        "height": h,
    }


def write_report(
    paths: str | Path | list[str | Path], out: str | Path | None = None, *, title: str | None = None
) -> Path:
    """Write ``report.html`` (with results.md and plots/) for one run directory, into it by
    default, or for several runs into ``out`` (then also the combined results.csv and
    results.parquet). Returns the report's path."""
    return build_report(load_runs(paths), out, title=title)


def build_report(
    runs: list[RunData], out: str | Path | None = None, *, title: str | None = None
) -> Path:
    """:func:`write_report` for runs already loaded."""
    if out is None:
        if len(runs) > 1:
            names = ", ".join(str(r.path) for r in runs[:5]) + (" ..." if len(runs) > 5 else "")
            raise QuantlabError(
                f"a report across several runs ({names}) needs an output directory: "
                "quantlab compare RUNS... --out DIR"
            )
        out = runs[0].path
    # a report goes into its own run, or a directory of its own: never over another run's files
    out = prepare_run_dir(
        Path(out), "report directory", kind="report", allow=None if len(runs) > 1 else runs[0].path
    )
    plots_dir = owned_path(out, PLOTS_DIR, directory=True, what="plots directory")
    env = _jinja_env()
    multi = len(runs) > 1
    frame = combined_frame(runs) if multi else runs[0].frame.assign(run=str(runs[0].path))
    metrics = {}
    for run in runs:
        for label, m in run.metrics.items():
            metrics[f"{run.path.name}/{label}" if multi else label] = m
    table = summary_frame(frame)
    atomic_write_text(out / RESULTS_MD, markdown_table(table))
    if multi:
        atomic_write_text(out / RESULTS_CSV, frame.to_csv(index=False))
        write_parquet(frame, out / RESULTS_PARQUET)

    figures = [
        ("quality_vs_size", lambda: P.quality_vs_size(frame)),
        ("speed", lambda: P.speed(frame)),
        ("layer_error", lambda: P.layer_error(metrics, frame)),
        ("quantization_cost", lambda: P.quantization_cost(frame, metrics)),
        ("serving", lambda: serving_plot(metrics)),
    ]
    plots = [
        p
        for (name, make), (_, ptitle, caption) in zip(figures, PLOTS)
        if (p := _figure(make(), plots_dir, out, name, ptitle, caption)) is not None
    ]

    methods = []
    for run in runs:
        for _, row in run.frame.iterrows():
            label = f"{run.path.name}/{row['method']}" if multi else str(row["method"])
            own = not multi and Path(os.path.realpath(out)) == Path(os.path.realpath(run.path))
            methods.append(_method_details(run, row, label, own))
    names = sorted({r.name for r in runs})
    html = env.get_template(TEMPLATE).render(
        title=title
        or (
            f"quantlab report: {names[0]}"
            if not multi
            else f"quantlab comparison: {', '.join(names)}"
        ),
        version=__version__,
        generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        runs=[
            {
                "path": str(r.path),
                "recipe_yaml": yaml.safe_dump(r.recipe, sort_keys=False)
                if r.recipe
                else "(recipe.yaml missing)",
                "environment": _env_rows(r.environment),
            }
            for r in runs
        ],
        facts=_facts(frame, runs),
        warnings=report_warnings(runs, frame),
        table_note=(
            "Baseline first; Δppl_% and ×size/×speed are against the float baseline"
            + (" of the same run" if multi else "")
            + "; units are in the column names."
        ),
        table_html=table.to_html(index=False, classes="results", border=0, na_rep="", escape=True),
        plots=plots,
        deploy=_deploy_section(runs, plots_dir, out),
        methods=methods,
    )
    path = out / REPORT_HTML
    atomic_write_text(path, html)
    return path
