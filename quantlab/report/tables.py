"""The results table: one row per method, units in column names, baseline first."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

CONVENTION_TEXT = {
    "gptq": "non-overlapping {seq}-token windows, mean NLL of every predicted token",
    "llamacpp": "llama-perplexity: {seq}-token chunks, BOS-led where the tokenizer adds BOS, "
    "second half scored, ± standard error",
    "strided": "sliding {seq}-token windows, each token scored once",
    "lm-eval": "lm-eval rolling log-likelihood per document, word perplexity, context {seq}",
}


def _baseline(frame: pd.DataFrame) -> pd.Series | None:
    base = frame[frame["backend"] == "none"]
    return base.iloc[0] if len(base) else None


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A readable table: baseline first, deltas against it, units in the headers. With
    several runs (a ``run`` column, as :func:`quantlab.load_results` gives), each run's rows
    are compared with that run's own baseline, and a ``run`` column leads."""
    if "run" in frame.columns and frame["run"].nunique() > 1:
        parts = [
            _summary_one(part).assign(run=run) for run, part in frame.groupby("run", sort=False)
        ]
        out = pd.concat(parts, ignore_index=True).fillna("")
        return out[["run"] + [c for c in out.columns if c != "run"]]
    return _summary_one(frame)


#: figures the summary formats as numbers: a frame built in memory from rows that all failed
#: holds None in them (object dtype), which the formats cannot take
_NUMERIC = ("ppl", "ppl_stderr", "kld_mean", "top1_agreement", "size_bytes", "bits_per_weight")


def _summary_one(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.assign(
        **{c: pd.to_numeric(frame[c], errors="coerce") for c in _NUMERIC if c in frame.columns}
    )
    base = _baseline(frame)
    order = (
        frame.assign(_b=frame["backend"] != "none")
        .sort_values("_b", kind="stable")
        .drop(columns="_b")
    )
    out = pd.DataFrame(
        {
            "method": order["method"],
            "backend": order["backend"],
            "bits": order["bits"],
            "group": order["group_size"].map(
                lambda g: "" if pd.isna(g) else ("channel" if g == -1 else str(g))
            ),
            "ppl": order["ppl"].map("{:.3f}".format),
        }
    )
    if order["ppl_stderr"].notna().any():
        out["±"] = order["ppl_stderr"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    if base is not None:
        out["Δppl_%"] = ((order["ppl"] / base["ppl"] - 1) * 100).map("{:+.2f}".format)
    if order["kld_mean"].notna().any():
        out["KL"] = order["kld_mean"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
        out["top1_%"] = order["top1_agreement"].map(
            lambda v: "" if pd.isna(v) else f"{100 * v:.1f}"
        )
    out["size_MB"] = (order["size_bytes"] / 1e6).map("{:.1f}".format)
    if base is not None:
        out["×size"] = (order["size_bytes"] / base["size_bytes"]).map("{:.3f}".format)
    out["bits/weight"] = order["bits_per_weight"].map("{:.2f}".format)
    if order["skipped_layers"].notna().any():
        out["float_layers"] = order["skipped_layers"].map(
            lambda v: "" if pd.isna(v) else f"{int(v)}"
        )
    if order["prefill_tokens_per_s"].notna().any():
        out["prefill_tok/s"] = order["prefill_tokens_per_s"].map(
            lambda v: "" if pd.isna(v) else f"{v:.0f}"
        )
    speed = order["decode_tokens_per_s"]
    lo, hi = order["decode_tokens_per_s_min"], order["decode_tokens_per_s_max"]
    out["decode_tok/s (min-max)"] = [
        "" if pd.isna(v) else f"{v:.1f} ({a:.1f}-{b:.1f})" for v, a, b in zip(speed, lo, hi)
    ]
    if "decode_x_float" in order and order["decode_x_float"].notna().any():
        # the speed phase's per-round ratios to the baseline measured beside each method
        out["×speed (rounds min-max)"] = [
            "" if pd.isna(v) else f"{v:.2f} ({a:.2f}-{b:.2f})"
            for v, a, b in zip(
                order["decode_x_float"], order["decode_x_min"], order["decode_x_max"]
            )
        ]
    elif base is not None and pd.notna(base["decode_tokens_per_s"]):
        out["×speed"] = (speed / base["decode_tokens_per_s"]).map(
            lambda v: "" if pd.isna(v) else f"{v:.2f}"
        )
    if order["decode_fraction_of_bound"].notna().any():
        out["%bound"] = order["decode_fraction_of_bound"].map(
            lambda v: "" if pd.isna(v) else f"{100 * v:.0f}"
        )
    out["quantize_s"] = order["quantize_s"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    if order["peak_rss_quantize_bytes"].notna().any():
        out["peak_MB"] = (
            order[["peak_rss_quantize_bytes", "peak_rss_eval_bytes"]]
            .max(axis=1)
            .map(lambda v: "" if pd.isna(v) else f"{v / 1e6:.0f}")
        )
    for col in [c for c in order.columns if c.startswith("task_") and not c.endswith("_stderr")]:
        out[col.removeprefix("task_")] = order[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    if "llamacpp_ppl" in order and order["llamacpp_ppl"].notna().any():
        _llamacpp_columns(out, order)
    return out.reset_index(drop=True)


def _llamacpp_columns(out: pd.DataFrame, order: pd.DataFrame) -> None:
    """The llama.cpp engine's own figures, prefixed ``llama.cpp``: the GGUF type, its PPL and
    KL, the activation-quantization cost (quantized file vs its F32 twin), the engine gap
    (F32 twin vs quantlab's llamacpp-convention PPL, when the run scores that convention with
    the same context and chunks), decode tokens/s and its per-round ratio to the float GGUF."""

    def fmt(col: str, spec: str, scale: float = 1.0) -> pd.Series:
        return order[col].map(lambda v: "" if pd.isna(v) else format(scale * v, spec))

    out["gguf"] = order["gguf_type"].fillna("")
    out["llama.cpp ppl"] = fmt("llamacpp_ppl", ".3f")
    out["llama.cpp KL"] = fmt("llamacpp_kld_mean", ".4f")
    out["llama.cpp top1_%"] = fmt("llamacpp_top1_agreement", ".1f", 100)
    out["actq_cost_%"] = fmt("llamacpp_actq_cost_pct", "+.2f")
    if order["llamacpp_engine_gap_pct"].notna().any():
        out["engine_gap_%"] = fmt("llamacpp_engine_gap_pct", "+.3f")
    out["llama.cpp decode_tok/s"] = fmt("llamacpp_decode_tokens_per_s", ".1f")
    out["llama.cpp ×decode (min-max)"] = [
        "" if pd.isna(x) else f"{x:.2f} ({a:.2f}-{b:.2f})"
        for x, a, b in zip(
            order["llamacpp_decode_x_float"],
            order["llamacpp_decode_x_min"],
            order["llamacpp_decode_x_max"],
        )
    ]


def slower_basis(frame: pd.DataFrame) -> str:
    """How :func:`slower_than_baseline` decided, for the sentence that reports it."""
    if "decode_x_max" in frame and frame["decode_x_max"].notna().any():
        return "decode, in every speed round against the baseline measured beside it"
    return "decode, whole min-max range below the baseline's"


def slower_than_baseline(frame: pd.DataFrame) -> list[tuple[str, float]]:
    """Methods slower than the float baseline in decode, with their median speed ratio: said
    plainly in every summary. With the speed phase's rounds: slower in every round (each
    against the baseline measured beside it); else (older runs) the fastest repeat below the
    baseline's slowest."""
    if "decode_x_max" in frame and frame["decode_x_max"].notna().any():
        rows = frame[(frame["backend"] != "none") & (frame["decode_x_max"] < 1)]
        return [(r["method"], r["decode_x_float"]) for _, r in rows.iterrows()]
    base = _baseline(frame)
    if base is None or pd.isna(base.get("decode_tokens_per_s_min")):
        return []
    out = []
    for _, row in frame[frame["backend"] != "none"].iterrows():
        if (
            pd.notna(row["decode_tokens_per_s_max"])
            and row["decode_tokens_per_s_max"] < base["decode_tokens_per_s_min"]
        ):
            out.append((row["method"], row["decode_tokens_per_s"] / base["decode_tokens_per_s"]))
    return out


def format_summary(
    frame: pd.DataFrame, env: dict | None = None, warnings: list[str] | None = None
) -> str:
    """The terminal summary: a header saying what was measured, then the table. ``warnings``:
    the report's caveats (:func:`quantlab.report.caveats.report_warnings`), printed instead of
    this run's own speed warnings: ``quantlab compare`` passes them, so the terminal and the
    HTML say the same."""
    if frame.empty:
        return "(no results)"
    first = frame.iloc[0]

    def vals(col: str) -> str:
        v = [str(x) for x in frame[col].dropna().unique()] if col in frame else []
        return " / ".join(v) if v else "?"

    conv = first["ppl_convention"]
    how = CONVENTION_TEXT.get(conv, "").format(seq=first["eval_seq_len"])
    if frame["ppl_convention"].nunique() > 1 or frame["eval_seq_len"].nunique() > 1:
        how = (
            "DIFFERENT CONVENTIONS OR CONTEXTS BETWEEN ROWS: "
            + vals("ppl_convention")
            + ", ctx "
            + vals("eval_seq_len")
        )
    lines = [
        f"perplexity: convention {vals('ppl_convention')} ({how}), {vals('eval_tokens')} scored "
        f"tokens of {vals('eval_source')}, tokenizer {vals('tokenizer')}",
        f"device {vals('device')}, dtype {vals('dtype')}, {vals('threads')} threads"
        + (f", {env['cpu']}" if env and env.get("cpu") else ""),
    ]
    if pd.notna(first.get("kld_mean")):
        lines.append(
            f"KL: mean KL(base || method) per token over {vals('kld_tokens')} tokens; top1_%: same "
            "top token as the base model"
        )
    if pd.notna(first.get("decode_tokens_per_s")):
        lines.append(
            "speed: batch 1, KV cache, median (min-max) of repeats, all checkpoints measured "
            "together in rounds alternating with the baseline; ×speed: median (min-max) over "
            "rounds of each method's ratio to the baseline beside it; %bound: decode speed as a "
            "share of memory bandwidth / weight bytes per token"
        )
        mode = (
            vals("speed_mode")
            if "speed_mode" in frame and frame["speed_mode"].notna().any()
            else "eager"
        )
        kernels = "; ".join(
            f"{r['method']} {r['kernel']}"
            for _, r in frame.iterrows()
            if r.get("backend") != "none" and pd.notna(r.get("kernel"))
        )
        lines.append(f"speed engine: torch, {mode} decode; kernels: {kernels or 'dense'}")
    lines.append(
        "size: weight files on disk; peak_MB: process peak RSS while quantizing or scoring"
    )
    if "skipped_layers" in frame and frame["skipped_layers"].notna().any():
        lines.append(
            "float_layers: linear layers the sensitivity pass left in float (skip: auto), besides "
            "lm_head"
        )
    if warnings is not None:
        lines += [f"WARNING: {w}" for w in warnings]
    else:
        session = (
            "speed_session"
            if "speed_session" in frame and frame["speed_session"].notna().any()
            else "session"
        )
        if session in frame and frame["decode_tokens_per_s"].notna().any():
            timed = frame[frame["decode_tokens_per_s"].notna()]
            sessions = timed[session].dropna().astype(str)
            if sessions.nunique() > 1:
                older = timed[timed[session].astype(str) != sessions.max()]["method"].astype(str)
                lines.append(
                    "SPEED FROM AN EARLIER SESSION (reused on resume; machine load may have "
                    f"differed, --force re-measures): {', '.join(older)}"
                )
        slower = slower_than_baseline(frame)
        if slower:
            lines.append(
                f"SLOWER THAN FLOAT on this device ({slower_basis(frame)}): "
                + ", ".join(f"{m} ({r:.2f}x)" for m, r in slower)
            )
    lines += [
        "",
        summary_frame(frame).to_string(index=False),
    ]
    return "\n".join(lines)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a (formatted) frame, numbers right-aligned."""
    cols = [str(c) for c in table.columns]
    cells = [
        ["" if pd.isna(v) else str(v).replace("|", "\\|") for v in row]
        for row in table.itertuples(index=False)
    ]

    def numeric(j: int) -> bool:
        vals = [r[j] for r in cells if r[j]]
        return bool(vals) and all(_looks_numeric(v) for v in vals)

    align = ["---:" if numeric(j) else "---" for j in range(len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines) + "\n"


def _looks_numeric(text: str) -> bool:
    try:
        float(text.split(" ")[0].replace("+", ""))
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ where to deploy (projected)

PROJECTED_NOTE = (
    "PROJECTED, not measured: datasheet figures x efficiencies fitted to published measurements "
    "(docs/hardware.md); decode at the context's end, prefill of a prompt that fills the context"
)


def _row_label(rec: dict, multi: bool) -> str:
    return f"{Path(rec['run']).name}/{rec['method']}" if multi else rec["method"]


def _fmt(v, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, spec)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def deploy_frame(records: list[dict]) -> pd.DataFrame:
    """One card's records as a table; every speed column says it is projected."""
    if not records:
        return pd.DataFrame()
    first = records[0]
    multi = len({r["run"] for r in records}) > 1
    out = pd.DataFrame(
        {
            "method": [_row_label(r, multi) for r in records],
            "engine": [r["engine"] for r in records],
            "fits": ["yes" if r["fits"] else "NO" for r in records],
            "weights": [_size(r["weight_bytes"]) for r in records],
            f"max_batch@ctx{first['context']}": [r["max_batch"] for r in records],
            f"max_ctx@batch{first['batch']}": [r["max_context"] for r in records],
            "decode_tok/s PROJECTED": [
                _fmt(r["decode_tokens_per_s_projected"], ",.0f") for r in records
            ],
            "bound": [r["decode_bound"] or "" for r in records],
            "prefill_tok/s PROJECTED": [
                _fmt(r["prefill_tokens_per_s_projected"], ",.0f") for r in records
            ],
        }
    )
    if any(r["kld_mean"] is not None for r in records):
        out["KL (measured)"] = [_fmt(r["kld_mean"], ".4f") for r in records]
    return out


def format_deploy(records: list[dict], cards: list, notes: list[str] | None = None) -> str:
    """The terminal version of the report's "Where to deploy" section."""
    first = records[0]
    widths = sorted({f"{8 * r['kv_cache_bytes_per_element']:g}-bit" for r in records})
    lines = [
        PROJECTED_NOTE,
        f"context {first['context']} tokens, batch {first['batch']}, KV cache {' / '.join(widths)}",
    ]
    for source in dict.fromkeys(r["efficiency_source"] for r in records):
        lines.append(f"efficiency: {source}")
    for card in cards:
        mine = [r for r in records if r["card"] == card.name]
        lines += ["", card.summary(), deploy_frame(mine).to_string(index=False)]
    lines += [f"NOTE: {n}" for n in notes or []]
    return "\n".join(lines)
