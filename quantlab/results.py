"""The result schema: what one method's row holds, in one place.

A row is written as the method's ``metrics.json`` and becomes one line of ``results.csv``.
:data:`COLUMNS` are its flat fields (the table's columns, in order); :data:`DETAILS` are the
nested records only ``metrics.json`` keeps; ``task_*`` columns come from lm-eval tasks. A row
with a field outside the schema is a programming error (:func:`check_row`), so a column cannot
appear in one writer and be missing from the table.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from quantlab.records import atomic_write_bytes

#: flat fields of a row = the columns of results.csv, in order
COLUMNS = [
    "method",
    "model",
    "backend",
    "bits",
    "group_size",
    "ppl",
    "ppl_stderr",
    "ppl_convention",
    "eval_source",
    "eval_seq_len",
    "eval_windows",
    "eval_tokens",
    "kld_mean",
    "kld_p99",
    "top1_agreement",
    "dp_rms",
    "kld_tokens",
    "kld_floor",
    "kld_floor_dtype",
    "size_bytes",
    "checkpoint_bytes",
    "quantized_tensor_bytes",
    "bits_per_weight",
    "skipped_layers",
    "sensitivity_s",
    "allocation_s",
    "prefill_tokens_per_s",
    "ttft_ms",
    "decode_tokens_per_s",
    "decode_tokens_per_s_min",
    "decode_tokens_per_s_max",
    "latency_p50_ms",
    "latency_p95_ms",
    "decode_bound_tokens_per_s",
    "decode_fraction_of_bound",
    "decode_batch_size",
    "decode_tokens_per_s_batch",
    "decode_x_float",
    "decode_x_min",
    "decode_x_max",
    "prefill_x_float",
    "speed_rounds",
    "speed_session",
    "speed_mode",
    "compile_s",
    "speed_other_cores",
    "peak_rss_quantize_bytes",
    "peak_rss_load_bytes",
    "peak_rss_eval_bytes",
    "peak_cuda_quantize_bytes",
    "peak_cuda_eval_bytes",
    "quantize_s",
    "streamed",
    "export_s",
    "load_s",
    "eval_s",
    "eval_tokens_per_s",
    "dtype",
    "device",
    "threads",
    "kernel",
    "tokenizer",
    "eval_sha256",
    "checkpoint",
    "measured_at",
    "session",
    # GGUF export and the llama.cpp engine (eval.engines: [torch, llamacpp])
    "gguf_type",
    "gguf_float_type",
    "gguf_bytes",
    "gguf_file",
    "llamacpp_ppl",
    "llamacpp_ppl_stderr",
    "llamacpp_kld_mean",
    "llamacpp_kld_p99",
    "llamacpp_top1_agreement",
    "llamacpp_f32_ppl",
    "llamacpp_actq_cost_pct",
    "llamacpp_engine_gap_pct",
    "llamacpp_prefill_tokens_per_s",
    "llamacpp_decode_tokens_per_s",
    "llamacpp_decode_x_float",
    "llamacpp_decode_x_min",
    "llamacpp_decode_x_max",
    "llamacpp_prefill_x_float",
    "llamacpp_ctx",
    "llamacpp_chunks",
    "llamacpp_threads",
    "llamacpp_build",
    # the vLLM engine (eval.engines: [torch, vllm])
    "vllm_ppl",
    "vllm_ppl_gap_pct",
    "vllm_ppl_stderr",
    "vllm_dtype",
    "vllm_error",
    "vllm_warning",
    # the serving benchmark (eval.serving); its serving_<engine>_c<N>_tok_s / _x_float columns
    # follow COLUMNS, like task_* (which engines and concurrencies depends on the recipe)
    "serving_error",
    # where the method ran (distributed runs) and why it failed, if it did
    "worker",
    "error",
]

#: ``speed_other_cores`` (cores other processes kept busy on average while the speed phase
#: measured) from which the log and the report flag the speed figures as disturbed
BUSY_CORES = 0.2

#: nested (or row-bookkeeping) fields that metrics.json keeps and the table does not
DETAILS = frozenset(
    {
        "options",
        "eval_labels",
        "perplexity",
        "divergence",
        "speed",
        "decode_bound",
        "tasks",
        "layers",
        "sensitivity",
        "quantize_stages",
        "base_load_s",
        "key",
        "source_gguf",
        "gguf_f32_file",
        "llamacpp",
        "kernels",
        "allocation",
        "serving",
    }
)

_FIELDS = frozenset(COLUMNS) | DETAILS


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` unchanged when every field is in the schema; else a ValueError naming them."""
    prefixes = ("task_", "llamacpp_", "vllm_", "serving_")
    unknown = sorted(k for k in row if k not in _FIELDS and not k.startswith(prefixes))
    if unknown:
        raise ValueError(f"result fields outside quantlab.results' schema: {', '.join(unknown)}")
    return row


@dataclass
class MethodResult:
    """What running one method gives: its row (as written to metrics.json), or the error
    that stopped it (distributed runs report it in the row and finish the other methods)."""

    label: str
    row: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    reused: bool = False

    def as_row(self, backend: str) -> dict[str, Any]:
        if self.error is None:
            return self.row
        return check_row(
            {"method": self.label, "backend": backend, "error": self.error, **self.row}
        )


def serving_columns(rows: list[dict]) -> list[str]:
    """The rows' ``serving_<engine>_c<N>_<what>`` columns, by engine, then N as a number."""
    pattern = re.compile(r"serving_(\w+)_c(\d+)_(tok_s|x_float)")
    found = {k for r in rows for k in r if pattern.fullmatch(k)}

    def key(k: str):
        engine, c, what = pattern.fullmatch(k).groups()
        return engine, int(c), what

    return sorted(found, key=key)


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """A tidy DataFrame of the flat metric fields, in :data:`COLUMNS` order."""
    tasks = sorted({k for r in rows for k in r if k.startswith("task_")})
    cols = COLUMNS + serving_columns(rows) + tasks
    frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)
    frame["group_size"] = frame["group_size"].astype("Int64")
    base = frame[frame["backend"] == "none"]
    # compression ratio against the float baseline's weight files (None without a baseline)
    frame.insert(
        frame.columns.get_loc("size_bytes") + 1,
        "compression_ratio",
        base["size_bytes"].iloc[0] / frame["size_bytes"] if len(base) else None,
    )
    return frame


def write_parquet(frame: pd.DataFrame, path: Path) -> bool:
    """Write a results frame as Parquet (atomically); False when no Parquet engine is
    installed (the CSV holds the same table)."""
    buf = io.BytesIO()
    try:
        frame.to_parquet(buf, index=False)
    except ImportError:
        return False
    atomic_write_bytes(path, buf.getvalue())
    return True
