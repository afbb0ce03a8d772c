"""The engines issue's targets, measured: recipes/cpu_deploy.yaml's rows on the demo model,
scored by quantlab (torch) and by llama.cpp on WikiText-2 v1 test (../shared/data), ctx 512,
the first N chunks, at a fixed thread count; then each target printed with the figures behind it.

    .venv/bin/python scripts/bench_engines.py [--chunks 100] [--threads 2] [--samples 32] \\
        [--out runs/bench-engines]

Needs llama.cpp's tools (bash scripts/llamacpp.sh) and ../shared/data/wikitext-2. Run it alone:
speed ratios come from interleaved rounds, but a second benchmark on the same cores still
distorts the absolute figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


def _recipe(args) -> dict:
    doc = yaml.safe_load((ROOT / "recipes" / "cpu_deploy.yaml").read_text())
    doc["name"] = "bench-engines"
    doc["threads"] = args.threads
    doc["calibration"]["samples"] = args.samples
    doc["eval"].update(source=str(WIKITEXT), split="test", seq_len=512, max_windows=args.chunks)
    doc["eval"]["llamacpp"].update(ctx=512, chunks=args.chunks, threads=args.threads)
    return doc


def _targets(frame: pd.DataFrame) -> list[tuple[str, str, bool | None]]:
    f = frame.set_index("method")
    out: list[tuple[str, str, bool | None]] = []
    own = f.loc["llamacpp-q4_0", "llamacpp_decode_x_float"]
    for label in ("rtn-w4-g32-q4_0", "gptq-w4-g32-q4_0", "awq-w4-g32-q4_0"):
        x = f.loc[label, "llamacpp_decode_x_float"]
        out.append(
            (
                f"{label}: decode >= 0.95x llama.cpp's own Q4_0 file",
                f"{x:.2f}x vs {own:.2f}x of float32 (ratio {x / own:.3f})",
                x / own >= 0.95,
            )
        )
        out.append((f"{label}: decode >= 2x the float32 GGUF", f"{x:.2f}x", x >= 2))
    ref = f.loc["llamacpp-q4_0-imatrix", "llamacpp_kld_mean"]
    km = f.loc["llamacpp-q4_k_m", "llamacpp_kld_mean"]
    for label in ("gptq-w4-g32-q4_0", "awq-w4-g32-q4_0"):
        k = f.loc[label, "llamacpp_kld_mean"]
        out.append(
            (
                f"{label}: llama.cpp KLD below llama.cpp's Q4_0 + imatrix",
                f"{k:.4f} vs {ref:.4f}",
                k < ref,
            )
        )
    k = f.loc["awq-w4-g32-q4_0", "llamacpp_kld_mean"]
    out.append(("moonshot: AWQ in Q4_0 below Q4_K_M's KLD", f"{k:.4f} vs {km:.4f}", k < km))
    for label, row in f.iterrows():
        gap = row["llamacpp_engine_gap_pct"]
        if pd.notna(row.get("gguf_type")):
            out.append(
                (
                    f"{label}: llama.cpp PPL of the F32 export == quantlab's within 0.05%",
                    f"gap {gap:+.4f}%, activation-quantization cost "
                    f"{row['llamacpp_actq_cost_pct']:+.3f}%",
                    abs(gap) <= 0.05 if pd.notna(gap) else None,
                )
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--samples",
        type=int,
        default=32,
        help="calibration windows of 512 tokens (GPTQ, AWQ, imatrix)",
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-engines"))
    args = p.parse_args()
    if not WIKITEXT.is_dir():
        print(f"bench_engines: {WIKITEXT} is missing (WikiText-2 v1 valid/test)", file=sys.stderr)
        return 2
    from quantlab.api import run_recipe
    from quantlab.recipe import parse_recipe

    result = run_recipe(parse_recipe(_recipe(args), origin="bench_engines"), args.out)
    frame = result.results
    cols = [
        "method",
        "gguf_type",
        "ppl",
        "llamacpp_ppl",
        "llamacpp_f32_ppl",
        "llamacpp_engine_gap_pct",
        "llamacpp_actq_cost_pct",
        "llamacpp_kld_mean",
        "llamacpp_top1_agreement",
        "kld_mean",
        "llamacpp_prefill_tokens_per_s",
        "llamacpp_decode_tokens_per_s",
        "llamacpp_decode_x_float",
        "llamacpp_decode_x_min",
        "llamacpp_decode_x_max",
        "gguf_bytes",
        "quantize_s",
    ]
    print(
        f"\nWikiText-2 v1 test, ctx 512, {args.chunks} chunks, {args.threads} threads; torch ppl "
        "in the llamacpp convention; llama.cpp figures from its own tools"
    )
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\ntargets:")
    for what, figures, ok in _targets(frame):
        print(f"  [{'met' if ok else ('n/a' if ok is None else 'NOT met')}] {what}: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
