"""The results table: one row per method, units in column names, baseline first."""

from __future__ import annotations

import pandas as pd

#: columns of results.csv, in order (metrics.json holds more: raw speed samples, options...)
COLUMNS = [
    "method", "backend", "bits", "group_size", "ppl", "ppl_convention", "eval_source",
    "eval_seq_len", "eval_tokens", "size_bytes", "bits_per_weight", "decode_tokens_per_s",
    "decode_tokens_per_s_min", "decode_tokens_per_s_max", "quantize_s", "export_s", "load_s", "eval_s", "dtype", "device", "threads", "kernel",
    "tokenizer", "eval_sha256", "checkpoint",
]


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """A tidy DataFrame of the flat metric fields, in :data:`COLUMNS` order."""
    frame = pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], columns=COLUMNS)
    frame["group_size"] = frame["group_size"].astype("Int64")
    return frame


def _baseline(frame: pd.DataFrame) -> pd.Series | None:
    base = frame[frame["backend"] == "none"]
    return base.iloc[0] if len(base) else None


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A readable table: baseline first, deltas against it, units in the headers."""
    base = _baseline(frame)
    order = frame.assign(_b=frame["backend"] != "none").sort_values("_b", kind="stable").drop(columns="_b")
    out = pd.DataFrame({
        "method": order["method"],
        "backend": order["backend"],
        "bits": order["bits"],
        "group": order["group_size"].map(lambda g: "" if pd.isna(g) else ("channel" if g == -1 else str(g))),
        "ppl": order["ppl"].map("{:.3f}".format),
    })
    if base is not None:
        out["Δppl_%"] = ((order["ppl"] / base["ppl"] - 1) * 100).map("{:+.2f}".format)
    out["size_MB"] = (order["size_bytes"] / 1e6).map("{:.1f}".format)
    if base is not None:
        out["×size"] = (order["size_bytes"] / base["size_bytes"]).map("{:.3f}".format)
    out["bits/weight"] = order["bits_per_weight"].map("{:.2f}".format)
    speed = order["decode_tokens_per_s"]
    lo, hi = order["decode_tokens_per_s_min"], order["decode_tokens_per_s_max"]
    out["decode_tok/s (min-max)"] = [
        "" if pd.isna(v) else f"{v:.1f} ({a:.1f}-{b:.1f})" for v, a, b in zip(speed, lo, hi)]
    if base is not None and pd.notna(base["decode_tokens_per_s"]):
        out["×speed"] = (speed / base["decode_tokens_per_s"]).map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    out["quantize_s"] = order["quantize_s"].map("{:.1f}".format)
    return out.reset_index(drop=True)


def format_summary(frame: pd.DataFrame, env: dict | None = None) -> str:
    """The terminal summary: a header saying what was measured, then the table."""
    if frame.empty:
        return "(no results)"
    first = frame.iloc[0]
    conv = ", ".join(sorted(set(frame["ppl_convention"])))
    lines = [
        f"perplexity: convention {conv} (non-overlapping {first['eval_seq_len']}-token windows, "
        f"mean NLL), {first['eval_tokens']} scored tokens of {first['eval_source']}, "
        f"tokenizer {first['tokenizer']}",
        f"device {first['device']}, dtype {first['dtype']}, {first['threads']} threads"
        + (f", {env['cpu']}" if env and env.get("cpu") else "")
        + "; decode speed: batch 1, KV cache, median (min-max) of repeats: ratios inside the "
        "spread are noise; size: weight files on disk",
        "",
        summary_frame(frame).to_string(index=False),
    ]
    return "\n".join(lines)
