"""Serving benchmarks in a run (``eval.serving``): after every row is scored, each row is
served by the engines asked for and loaded by vLLM's load generator at each concurrency, in
rounds (every server once per concurrency per round, the float model among them), with
ratios to the float model served by the same engine in the same round
(:func:`quantlab.engines.serving.serving_table`).

- vLLM serves every checkpoint directory: the float baseline once per
  ``eval.serving.float_dtypes`` (the fastest is the reference), quantized rows in
  ``eval.serving.dtype``; a GGUF checkpoint gets vLLM's row error.
- llama-server serves every row's GGUF file (``export: [gguf]``; the baseline's is F32).

Each row gets ``serving``: one record per engine and concurrency (``engine, dtype,
concurrency, threads``, output tokens/s, requests/s, TTFT and TPOT p50/p99, ``x_float``), and
flat columns ``serving_<engine>_c<N>_tok_s`` and ``serving_<engine>_c<N>_x_float``. A row an
engine cannot serve gets ``serving_error`` (the engine's own message, its log's path); the
other rows go on. Servers' logs live under ``RUN/.serving/``; every server is stopped with
its process group at the end, on an error and on Ctrl-C.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

#: the row's serving fields, cleared before each measurement (a re-run measures again)
PREFIX = "serving"
#: the servers' and load generator's logs, in the run directory (kept)
LOG_DIR = ".serving"


def column(engine: str, concurrency: int, what: str) -> str:
    """A serving column's name: ``serving_vllm_c8_tok_s``, ``serving_llamacpp_c1_x_float``."""
    return f"serving_{engine}_c{concurrency}_{what}"


def serving_entries(plan, rows: list[dict], engines: list[str]) -> list[dict]:
    """What each engine serves: one entry per (row, engine[, float dtype]); a row an engine
    cannot serve gets ``error`` instead of a checkpoint."""
    spec, root = plan.recipe.eval.serving, plan.run_dir.root
    base = next((r for r in rows if r["backend"] == "none"), None)
    tokenizer = plan.run_dir.checkpoint(base["method"]) if base else None
    entries = []
    for r in rows:
        label, ckpt = r["method"], plan.run_dir.checkpoint(r["method"])
        is_float = r["backend"] == "none"
        for engine in engines:
            e = {"engine": engine, "method": label, "float": is_float, "row": r}
            if engine == "vllm":
                entries += _vllm_entries(e, ckpt, is_float, spec)
            else:
                entries.append(_llamacpp_entry(e, r, root, tokenizer or ckpt))
    for e in entries:
        e["name"] = f"{e['method']}-{e['engine']}-{e['dtype']}"
    return entries


def _vllm_entries(e: dict, ckpt: Path, is_float: bool, spec) -> list[dict]:
    if not (ckpt / "config.json").is_file() or any(ckpt.glob("*.gguf")):
        why = "a GGUF checkpoint: vLLM serves checkpoint directories here"
        return [{**e, "dtype": "-", "error": why}]
    dtypes = spec.float_dtypes if is_float else [spec.dtype]
    return [{**e, "dtype": d, "dir": str(ckpt)} for d in dtypes]


def _llamacpp_entry(e: dict, row: dict, root: Path, tokenizer: Path) -> dict:
    if not row.get("gguf_file"):
        why = "no GGUF file: llama-server serves the rows that export GGUF (export: [gguf])"
        return {**e, "dtype": "-", "error": why}
    # the load generator counts tokens with a Hugging Face tokenizer: the baseline's
    # checkpoint holds the model's own (a GGUF row's file holds the same vocabulary)
    dtype = row.get("gguf_type") or "F32"
    return {**e, "dtype": dtype, "dir": str(root / row["gguf_file"]), "tokenizer": str(tokenizer)}


def serving_phase(
    plan, rows: list[dict], log: Callable[[str], None], save: Callable[[dict], None]
) -> None:
    """Serve every row with each engine of ``eval.serving``; the figures go into the rows (in
    place) and each row is saved (``save``) twice: cleared of an earlier session's serving
    fields before any server starts (an interrupted benchmark never leaves old figures
    beside new ones), and with the figures once all rows are measured."""
    from quantlab.engines.serving import serving_table
    from quantlab.engines.vllm import find_vllm
    from quantlab.rundir import owned_path

    spec, engines = plan.recipe.eval.serving, plan.recipe.eval.serving_engines()
    vllm = find_vllm()  # the load generator runs in vLLM's environment, for both engines
    tools = _llamacpp_tools() if "llamacpp" in engines else None
    for r in rows:
        for k in [k for k in r if k.startswith(PREFIX)]:
            del r[k]
        save(r)
    entries = serving_entries(plan, rows, engines)
    todo = [e for e in entries if "error" not in e]
    threads = spec.threads or plan.recipe.threads or os.cpu_count() or 1
    log(
        f"serving: {len(todo)} servers ({', '.join(engines)}), concurrency "
        f"{spec.concurrency}, {spec.rounds} round(s), {threads} threads each"
    )
    records = serving_table(
        vllm,
        todo,
        concurrency=spec.concurrency,
        requests=spec.requests,
        input_tokens=spec.input_tokens,
        output_tokens=spec.output_tokens,
        rounds=spec.rounds,
        log_dir=owned_path(plan.run_dir.root, LOG_DIR, directory=True, what="serving logs"),
        eager=spec.eager,
        llamacpp=tools,
        threads=threads,
        log=lambda msg: log(f"serving: {msg}"),
    )
    _into_rows(entries, records, spec, vllm.label, tools)
    for r in rows:
        save(r)


def _llamacpp_tools():
    from quantlab.engines.llamacpp import find_llamacpp

    tools = find_llamacpp()
    tools.server()  # the one tool only serving needs: its absence is one error, before serving
    return tools


def _into_rows(entries, records, spec, vllm_label, tools) -> None:
    """Each entry's records into its row: ``serving`` (with labels), the flat columns of the
    reference dtype, ``serving_error`` for what an engine refused."""
    by_name = {}
    for rec in records:
        by_name.setdefault(rec.pop("name"), []).append(rec)
    for e in entries:
        row = e["row"]
        recs = by_name.get(e["name"], []) if "error" not in e else []
        errors = [e["error"]] if "error" in e else [x["error"] for x in recs if "error" in x]
        if errors:
            msg = f"{e['engine']}: {errors[0]}"
            row["serving_error"] = "; ".join(filter(None, [row.get("serving_error"), msg]))
        for rec in recs:
            rec.update(_labels(rec["engine"], spec, vllm_label, tools))
            row.setdefault("serving", []).append(rec)
            _columns(row, rec)


def _columns(row: dict, rec: dict) -> None:
    """The flat columns of a record; for the float model served in several dtypes, the
    fastest dtype's (the reference the ratios are to)."""
    if "error" in rec:
        return
    tok = column(rec["engine"], rec["concurrency"], "tok_s")
    if row.get(tok) is not None and row[tok] >= rec["output_tokens_per_s"]:
        return
    row[tok] = rec["output_tokens_per_s"]
    row[column(rec["engine"], rec["concurrency"], "x_float")] = rec.get("x_float")


def _labels(engine: str, spec, vllm_label: str, tools) -> dict:
    """What each record was measured with (a number without its engine and load is noise)."""
    build = tools.version if engine == "llamacpp" and tools else vllm_label
    return {
        "build": build,
        "load_generator": f"vllm.benchmarks.serve ({vllm_label})",
        "requests": spec.requests,
        "input_tokens": spec.input_tokens,
        "output_tokens": spec.output_tokens,
        "eager": spec.eager if engine == "vllm" else None,
    }
