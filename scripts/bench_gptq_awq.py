#!/usr/bin/env python
"""Benchmark quantlab's GPTQ and AWQ against RTN on the demo model (issue: GPTQ and AWQ).

For each method: quantize (wall time split into calibration capture and the rest, peak
resident memory), export, RELOAD from disk, then score the reloaded model:
- perplexity (gptq convention, 512-token windows) on the embedded pydoc evaluation split and
  on the WikiText-2 test split (../shared/data/wikitext-2, if present);
- KL divergence from the float model and top-1 agreement on the WikiText-2 windows (the
  float model's distributions stored once and compared token by token).

Prints one JSON line per method and a table at the end. Run alone: two cores are shared.

    .venv/bin/python scripts/bench_gptq_awq.py --samples 128 --methods rtn4,gptq4,awq4,rtn3,gptq3
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantlab.bench.memory import PeakRSS, rss_bytes
from quantlab.bench.perplexity import gptq_plan, perplexity_gptq
from quantlab.checkpoint import export_checkpoint, load_checkpoint, weight_bytes
from quantlab.data import load_text, sample_calibration, tokenize
from quantlab.models import load_model
from quantlab.registry import get_backend
from quantlab.scoring import compute_reference, evaluate

METHODS = {
    "rtn4": ("rtn", dict(bits=4, group_size=64, sym=True)),
    "rtn4a": ("rtn", dict(bits=4, group_size=64, sym=False)),
    "gptq4": ("gptq", dict(bits=4, group_size=64, sym=True, act_order=True)),
    "gptq4a": ("gptq", dict(bits=4, group_size=64, sym=False, act_order=True)),
    "awq4": ("awq", dict(bits=4, group_size=64, sym=False)),
    "awq4f": ("awq", dict(bits=4, group_size=64, sym=False, next_inputs="float")),
    "rtn3": ("rtn", dict(bits=3, group_size=64, sym=True)),
    "gptq3": ("gptq", dict(bits=3, group_size=64, sym=True, act_order=True)),
}
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", default="rtn4,gptq4,awq4,rtn3,gptq3")
    ap.add_argument("--pydoc-windows", type=int, default=40)
    ap.add_argument("--wikitext-windows", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=None, help="keep checkpoints here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cpu = torch.device("cpu")

    import transformers  # noqa: F401  (imported now, so the runtime baseline below includes it)

    runtime_rss = rss_bytes()  # interpreter + torch + transformers, before any weights
    base = load_model("smollm2-135m", dtype=torch.float32, device=cpu)
    weights_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    cal_text = load_text("pydoc", None, "calibration")
    cal = sample_calibration(
        tokenize(cal_text, base.tokenizer), cal_text, args.samples, args.seq_len, 0
    )
    pydoc_ids = tokenize(load_text("pydoc", None, "evaluation"), base.tokenizer)
    wt_ids = (
        tokenize(load_text(str(WIKITEXT), None, "evaluation"), base.tokenizer)
        if WIKITEXT.is_dir()
        else None
    )
    print(
        f"# float weights {weights_bytes / 1e6:.1f} MB, rss after load {rss_bytes() / 1e6:.0f} MB, "
        f"calibration {args.samples}x{args.seq_len} tokens of {cal_text.name}, threads "
        f"{torch.get_num_threads()}",
        file=sys.stderr,
    )

    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-gptq-awq-"))
    wt_plan = gptq_plan(wt_ids, 512, args.wikitext_windows) if wt_ids is not None else None
    reference = (
        compute_reference(base.model, wt_plan, out_root / "reference", args.batch_size, "wikitext")
        if wt_plan is not None
        else None
    )

    def score(model, divergence: bool = False) -> dict:
        r = {
            "ppl_pydoc": perplexity_gptq(
                model, pydoc_ids, 512, max_windows=args.pydoc_windows, batch_size=args.batch_size
            ).ppl
        }
        if wt_plan is not None:
            ppl, div = evaluate(model, wt_plan, args.batch_size, reference if divergence else None)
            r["ppl_wikitext"] = ppl.ppl
            r.update(div or {})
        return r

    rows = [{"method": "float", **score(base.model)}]
    print(json.dumps(rows[0]), flush=True)
    for key in args.methods.split(","):
        backend_name, opts = METHODS[key]
        backend = get_backend(backend_name)(get_backend(backend_name).Config(**opts))
        # like the pipeline: one float model in memory while quantizing, so the peak is the
        # quantizer's own footprint (divergence uses the base distributions stored once)
        base.model = None
        gc.collect()
        work = load_model("smollm2-135m", dtype=torch.float32, device=cpu).model
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            q = backend.quantize(work, cal.ids if backend.needs_calibration else None)
            quantize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt = export_checkpoint(q, base.tokenizer, backend, out_root / key, source={}, label=key)
        export_s = time.perf_counter() - t0
        stage_seconds = dict(q.stage_seconds)
        del q, work
        gc.collect()
        loaded = load_checkpoint(ckpt, dtype=torch.float32, device=cpu).model
        row = {
            "method": key,
            "backend": backend_name,
            **opts,
            "quantize_s": round(quantize_s, 1),
            "export_s": round(export_s, 1),
            "peak_rss_quantize_bytes": mem.peak_bytes,
            "rss_before_quantize_bytes": mem.start_bytes,
            "peak_rss_over_float_weights": round(mem.peak_bytes / weights_bytes, 2),
            "runtime_rss_bytes": runtime_rss,
            "peak_rss_above_runtime_over_float_weights": round(
                (mem.peak_bytes - runtime_rss) / weights_bytes, 2
            ),
            "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
            "size_bytes": weight_bytes(ckpt),
            **score(loaded, divergence=True),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del loaded
        gc.collect()

    import pandas as pd

    cols = [
        c
        for c in [
            "method",
            "ppl_pydoc",
            "ppl_wikitext",
            "kld_mean",
            "kld_p99",
            "top1_agreement",
            "size_bytes",
            "quantize_s",
            "peak_rss_over_float_weights",
            "peak_rss_above_runtime_over_float_weights",
        ]
        if c in pd.DataFrame(rows)
    ]
    print(pd.DataFrame(rows)[cols].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
