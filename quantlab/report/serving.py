"""The serving plot: throughput against concurrency, and p99 time per output token against
throughput, one line per method, engine and dtype, drawn from the rows' ``serving`` records
(metrics.json, written by the run's serving benchmark, ``eval.serving``).

The report hooks it in with :data:`PLOT` (name, title, caption) and :func:`serving_plot`
(a figure, or None when no row was served).
"""

from __future__ import annotations

from typing import Any

from quantlab.report.plots import BASE_COLOR, PALETTE, pyplot

PLOT = (
    "serving",
    "Serving under load",
    "Each method served by each engine (vLLM's OpenAI server; llama-server for GGUF files), "
    "loaded by vLLM's load generator with N concurrent streaming clients (random prompts, fixed "
    "lengths, ignore_eos; medians over rounds). Left: output tokens/s of all streams against "
    "N. Right: p99 time per output token against output tokens/s, one point per N. Dashed: "
    "the float model. Only ratios measured in the same run mean anything on a shared machine.",
)


def serving_records(metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every measured serving record of every row (``metrics``: label -> metrics.json),
    with ``label`` and ``float`` added; records that hold an error are left out."""
    out = []
    for label, row in metrics.items():
        for rec in (row or {}).get("serving") or []:
            if "error" not in rec and rec.get("output_tokens_per_s"):
                out.append({**rec, "label": label, "float": row.get("backend") == "none"})
    return out


def _series(records: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(label, engine, dtype) -> its records by concurrency."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        out.setdefault((r["label"], r["engine"], r["dtype"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in out.items()}


def _title(records: list[dict]) -> str:
    r = records[0]
    engines = sorted({f"{x['engine']}: {x.get('build', '?')}" for x in records})
    return (
        f"Serving: random {r.get('input_tokens', '?')}-in/{r.get('output_tokens', '?')}-out "
        f"tokens, {r.get('threads', '?')} threads per server\n" + "; ".join(engines)
    )


def serving_plot(metrics: dict[str, dict[str, Any]]):
    """The serving figure of a run's (or several runs') rows, or None when none was served."""
    records = serving_records(metrics)
    if not records:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, ((label, engine, dtype), recs) in enumerate(_series(records).items()):
        style = {
            "color": BASE_COLOR if recs[0]["float"] else PALETTE[i % len(PALETTE)],
            "ls": "--" if recs[0]["float"] else "-",
            "marker": "o" if engine == "vllm" else "s",
            "label": f"{label} · {engine} · {dtype}",
        }
        cs = [r["concurrency"] for r in recs]
        tok = [r["output_tokens_per_s"] for r in recs]
        left.plot(cs, tok, **style)
        right.plot(tok, [r["tpot_ms_p99"] for r in recs], **style)
        for x, y, c in zip(tok, [r["tpot_ms_p99"] for r in recs], cs):
            right.annotate(f"c{c}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    left.set_xscale("log", base=2)
    left.set_xticks(sorted({r["concurrency"] for r in records}))
    left.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    left.set(xlabel="concurrent clients", ylabel="output tokens/s (all streams)")
    right.set(xlabel="output tokens/s (all streams)", ylabel="TPOT p99, ms")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.suptitle(_title(records), fontsize=9)
    fig.tight_layout()
    # below both panels (the saved figure's tight bounding box keeps it)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7)
    return fig
