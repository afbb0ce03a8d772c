"""The allocation issue's targets, measured: recipes/size_budget.yaml on the demo model,
evaluated on WikiText-2 v1 test (../shared/data) as the GPTQ/AWQ table in docs/methods.md is,
then each target printed with the figures behind it.

    .venv/bin/python scripts/bench_allocation.py [--windows 40] [--threads 2] \\
        [--out runs/bench-allocation]

Needs ../shared/data/wikitext-2. Run it alone (allocation_s, the search's cost, is a target).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


def _targets(f: pd.DataFrame) -> list[tuple[str, str, bool | None]]:
    f = f.set_index("method")
    out: list[tuple[str, str, bool | None]] = []
    uniform4 = [m for m in f.index if "-w4-" in m]
    best4 = min(uniform4, key=lambda m: f.loc[m, "kld_mean"])
    for alloc in [m for m in f.index if "auto4.3" in m]:
        k, b = f.loc[alloc, "kld_mean"], f.loc[best4, "kld_mean"]
        out.append(
            (
                f"{alloc}: KL <= 0.7x the best uniform 4-bit row ({best4})",
                f"{k:.4f} vs {b:.4f} ({k / b:.2f}x) at {f.loc[alloc, 'bits_per_weight']:.3f} vs "
                f"{f.loc[best4, 'bits_per_weight']:.3f} bits/weight",
                k <= 0.7 * b,
            )
        )
    for alloc in [m for m in f.index if "auto3.5" in m]:
        bpw = f.loc[alloc, "bits_per_weight"]
        rivals = [
            m
            for m in f.index
            if not m.startswith(("baseline",))
            and "auto" not in m
            and f.loc[m, "bits_per_weight"] <= bpw + 1e-9
        ]
        beats = all(
            f.loc[alloc, "kld_mean"] < f.loc[m, "kld_mean"]
            and f.loc[alloc, "ppl"] < f.loc[m, "ppl"]
            for m in rivals
        )
        out.append(
            (
                f"{alloc} ({bpw:.3f} bits/weight): KL and PPL below every uniform row that fits "
                f"({', '.join(rivals) or 'none'})",
                f"KL {f.loc[alloc, 'kld_mean']:.4f}, PPL {f.loc[alloc, 'ppl']:.3f}; rivals "
                + "; ".join(
                    f"{m} KL {f.loc[m, 'kld_mean']:.4f} PPL {f.loc[m, 'ppl']:.3f}" for m in rivals
                ),
                beats if rivals else None,
            )
        )
    k_imp, k_rtn = f.loc["rtn-w4-g64-imp", "kld_mean"], f.loc["rtn-w4-g64", "kld_mean"]
    out.append(
        (
            "importance-weighted RTN below plain RTN's KL (W4 g64)",
            f"{k_imp:.4f} vs {k_rtn:.4f}",
            k_imp < k_rtn,
        )
    )
    for m in [m for m in f.index if m.startswith("hqq")]:
        out.append(
            (
                f"{m}: present with its time and memory",
                f"KL {f.loc[m, 'kld_mean']:.4f}, PPL "
                f"{f.loc[m, 'ppl']:.3f}, quantized in {f.loc[m, 'quantize_s']:.1f} s, peak RSS "
                f"{f.loc[m, 'peak_rss_quantize_bytes'] / 2**20:.0f} MB while quantizing",
                None,
            )
        )
    secs = f["allocation_s"].dropna()
    out.append(
        (
            "the allocation search <= 10 minutes (first method measures, the others reuse)",
            ", ".join(f"{m} {s:.0f} s" for m, s in secs.items()),
            bool(len(secs)) and secs.max() <= 600,
        )
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-allocation"))
    args = ap.parse_args()
    if not WIKITEXT.is_dir():
        print(f"WikiText-2 not found at {WIKITEXT}", file=sys.stderr)
        return 2
    sets = [
        f"threads={args.threads}",
        f"eval.source={WIKITEXT}",
        "eval.split=test",
        f"eval.max_windows={args.windows}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "quantlab",
        "run",
        str(ROOT / "recipes" / "size_budget.yaml"),
        "--out",
        args.out,
    ]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    frame = pd.read_csv(Path(args.out) / "results.csv")
    frame["quantize_peak_MB"] = frame["peak_rss_quantize_bytes"] / 2**20
    cols = [
        "method",
        "bits",
        "bits_per_weight",
        "ppl",
        "kld_mean",
        "top1_agreement",
        "quantize_s",
        "allocation_s",
        "quantize_peak_MB",
    ]
    print(frame[[c for c in cols if c in frame]].to_string(index=False))
    for what, figure, ok in _targets(frame):
        print(f"[{ {True: 'MET', False: 'NOT MET', None: 'info'}[ok] }] {what}: {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
