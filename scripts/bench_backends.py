#!/usr/bin/env python
"""Benchmark the library backends against the float baseline on the demo model (issue:
library backends). Run alone: the machine's cores are shared by everything running.

Phase 1 runs one quantlab recipe (every method quantized, exported, RELOADED from disk,
scored): perplexity (gptq convention, 512-token windows of the embedded pydoc evaluation
split), KL from the float model, size on disk, bits per weight, prefill and decode tokens/s.

Phase 2 measures speed and memory per checkpoint, each in a FRESH process, one after the
other (no method inherits another's allocations or competes for the cores): prefill
tokens/s of a 512-token prompt and batch-1 decode tokens/s (32 tokens after a 64-token
prompt), medians of ``--repeats``, measured as the results table measures speed
(``quantlab.bench.probe``); resident memory after running (all
weights touched: safetensors are memory-mapped, so RSS right after loading undercounts) and
the peak while running, both above the process's RSS after importing torch, transformers
and the backend's library.

Prints a table with every figure and its ratio to the float baseline.

    .venv/bin/python scripts/bench_backends.py [--windows 8] [--granularity layer] \\
        [--out runs/bench_backends]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

METHODS = [
    {"label": "int8-per-token", "backend": "int8-dynamic", "options": {"activations": "per-token"}},
    {"label": "int8-per-token-fbgemm", "backend": "int8-dynamic", "options": {"engine": "fbgemm"}},
    {
        "label": "int8-per-tensor",
        "backend": "int8-dynamic",
        "options": {"activations": "per-tensor"},
    },
    {
        "label": "int8-per-tensor-wpt",
        "backend": "int8-dynamic",
        "options": {"activations": "per-tensor", "weights": "per-tensor"},
    },
    {
        "label": "int8-per-tensor-auto",
        "backend": "int8-dynamic",
        "options": {"activations": "per-tensor", "skip": "auto"},
    },
    {"label": "int8-weight-only", "backend": "int8-weight-only"},
    {"label": "bnb-nf4", "backend": "bnb", "options": {"mode": "nf4"}},
    {"label": "bnb-nf4-dq", "backend": "bnb", "options": {"mode": "nf4", "double_quant": True}},
    {
        "label": "bnb-nf4-bf16",
        "backend": "bnb",
        "options": {"mode": "nf4", "compute_dtype": "bfloat16"},
    },
    {"label": "bnb-fp4", "backend": "bnb", "options": {"mode": "fp4"}},
    {"label": "bnb-int8", "backend": "bnb", "options": {"mode": "int8"}},
    {"label": "bnb-int8-t0", "backend": "bnb", "options": {"mode": "int8", "threshold": 0.0}},
    {"label": "quanto-int8", "backend": "quanto", "options": {"weights": "int8"}},
    {"label": "quanto-int4", "backend": "quanto", "options": {"weights": "int4"}},
    {"label": "quanto-float8", "backend": "quanto", "options": {"weights": "float8"}},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--windows", type=int, default=8, help="512-token evaluation windows (default 8)"
    )
    ap.add_argument(
        "--granularity",
        choices=("layer", "type"),
        default="layer",
        help="sensitivity candidates for the skip: auto method",
    )
    ap.add_argument("--kl-budget", type=float, default=0.02)
    ap.add_argument("--methods", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--out", default="runs/bench_backends")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--probe-only",
        action="store_true",
        help="skip phase 1: probe the checkpoints of the existing results.csv in --out",
    )
    args = ap.parse_args()

    from quantlab.api import run_recipe
    from quantlab.recipe import parse_recipe

    methods = [
        dict(m) for m in METHODS if args.methods is None or m["label"] in args.methods.split(",")
    ]
    for m in methods:
        if m.get("options", {}).get("skip") == "auto":
            m["sensitivity"] = {
                "kl_budget": args.kl_budget,
                "granularity": args.granularity,
                "windows": 2,
                "seq_len": 256,
            }
    doc = {
        "model": {"source": "smollm2-135m"},
        "calibration": {"source": "pydoc"},
        "methods": methods,
        "eval": {"source": "pydoc", "seq_len": 512, "max_windows": args.windows},
        "output": {"dir": args.out},
    }
    if args.probe_only:
        results = pd.read_csv(Path(args.out) / "results.csv")
        results = results[results["method"].isin(["baseline"] + [m["label"] for m in methods])]
    else:
        results = run_recipe(parse_recipe(doc, default_name="bench_backends"), echo=True).results

    import torch

    rows = []
    for _, r in results.iterrows():
        ckpt = Path(args.out) / r["checkpoint"]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "quantlab.bench.probe",
                str(ckpt),
                str(torch.get_num_threads()),
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
        )
        probe = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        if proc.returncode:
            print(f"probe failed for {r['method']}: {proc.stderr[-800:]}", file=sys.stderr)
        print(f"probed {r['method']}: {probe}", file=sys.stderr, flush=True)
        rows.append(
            {
                "method": r["method"],
                "kernel": r["kernel"],
                "ppl": r["ppl"],
                "KL": r["kld_mean"],
                "size_MB": r["size_bytes"] / 1e6,
                "bits/w": r["bits_per_weight"],
                "prefill_tok/s": probe.get("prefill512_tok_s", float("nan")),
                "decode_tok/s": probe.get("decode_tok_s", float("nan")),
                "decode_min": probe.get("decode_min"),
                "decode_max": probe.get("decode_max"),
                "model_MB": probe.get("model_rss", float("nan")) / 1e6,
                "peak_MB": probe.get("peak_run", float("nan")) / 1e6,
                "float_layers": r.get("skipped_layers"),
            }
        )
    t = pd.DataFrame(rows)
    base = t[t["method"] == "baseline"].iloc[0]
    for col in ("size_MB", "prefill_tok/s", "decode_tok/s", "model_MB", "peak_MB"):
        t[f"x{col.split('_')[0]}"] = t[col] / base[col]
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print(
        "\nperplexity: gptq convention, 512-token windows of the embedded pydoc evaluation split; "
        "KL: mean KL(float || method) per token; fresh process per checkpoint, nothing else "
        "running: prefill: 512-token prompt, decode: batch 1, 32 tokens after a 64-token prompt, "
        f"medians of {args.repeats}; model_MB: RSS after running minus RSS after imports; peak_MB: "
        "peak RSS while running minus RSS after imports"
    )
    print(t.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    (Path(args.out) / "bench_backends.csv").write_text(t.to_csv(index=False))


if __name__ == "__main__":
    main()
