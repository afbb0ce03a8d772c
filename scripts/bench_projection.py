"""The hardware projection checked where it can be measured: this machine. Measures the memory
bandwidth and the decode (and prefill) tokens/s of the demo model's rows -- torch float32 and
bfloat16, RTN W4 g32 through torch's int4 kernel (kernel: auto), llama.cpp F32 / Q8_0 / Q4_0
when its tools are built -- fits one efficiency per engine (quantlab.hardware.efficiency), and
prints each row's projection against its measurement, in the fit and left out of it.

    .venv/bin/python scripts/bench_projection.py [--threads 2] [--out runs/bench-projection]
        [--model smollm2-135m] [--prompt 64] [--new 32] [--repeats 3] [--no-llamacpp]

Target (issue #31): every row within +-25% of its measurement with one efficiency per engine.
Run it alone: a second process on the same cores distorts every figure (the fit included).
The fitted constants are printed and written to OUT/bench_projection.json; the CPU profiles
quantlab ships (quantlab/hardware/anchors.py, CPU_DECODE) are updated from a quiet run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.25
#: torch rows: (label, checkpoint method, dtype, kernel)
TORCH = [
    ("torch float32", "float", "float32", "dense"),
    ("torch bfloat16", "float", "bfloat16", "dense"),
    ("torch RTN W4 g32 int4pack", "rtn-w4-g32", "float32", "auto"),
]
GGUF_TYPES = ("F32", "Q8_0", "Q4_0")


def _recipe(args, llamacpp: bool) -> dict:
    rtn = {"bits": 4, "group_size": 32, "sym": False}
    methods = [
        {"label": "float", "backend": "none"},
        {"label": "rtn-w4-g32", "backend": "rtn", "options": rtn},
    ]
    if llamacpp:
        methods += [
            {"label": f"gguf-{t.lower()}", "backend": "llamacpp", "options": {"type": t}}
            for t in GGUF_TYPES
        ]
    # scoring is not what this script measures: one short window, no divergence, no speed phase
    ev = {
        "max_windows": 1,
        "seq_len": 128,
        "divergence": {"enabled": False},
        "speed": {"enabled": False},
    }
    return {
        "name": "bench-projection",
        "model": {"source": args.model},
        "threads": args.threads,
        "methods": methods,
        "eval": ev,
    }


def _export(args, llamacpp: bool) -> Path:
    from quantlab.api import run_recipe
    from quantlab.recipe import parse_recipe

    recipe = parse_recipe(_recipe(args, llamacpp), origin="bench_projection")
    run_recipe(recipe, Path(args.out) / "run")
    return Path(args.out) / "run"


def _measure_here(ckpt: str, dtype: str, kernel: str, prompt: int, new: int, repeats: int) -> dict:
    """One torch measurement (this process): quantlab's own speed code and bytes count."""
    import torch

    from quantlab.bench.speed import bytes_per_token, measure_speed
    from quantlab.checkpoint import load_checkpoint

    lm = load_checkpoint(
        ckpt, dtype=getattr(torch, dtype), device=torch.device("cpu"), verify=False, kernel=kernel
    )
    ids = torch.randint(
        100, lm.model.config.vocab_size - 1, (prompt,), generator=torch.Generator().manual_seed(0)
    )
    m = measure_speed(lm.model, ids, new_tokens=new, warmup=1, repeats=repeats)
    return {
        "decode": m["decode_tokens_per_s"],
        "prefill": m["prefill_tokens_per_s"],
        "read_bytes": bytes_per_token(lm.model),
        "kv_bytes": torch.finfo(getattr(torch, dtype)).bits // 8,
    }


def _said(row: dict) -> None:
    print(
        f"  {row['row']}: decode {row['decode']:.1f} tok/s, prefill {row['prefill']:.0f} tok/s",
        flush=True,
    )


def _measure_torch(run: Path, args) -> list[dict]:
    """Each torch row in a fresh process (no row inherits another's allocations or threads)."""
    out = []
    for label, method, dtype, kernel in TORCH:
        cmd = [
            sys.executable,
            __file__,
            "--measure",
            str(run / method / "checkpoint"),
            dtype,
            kernel,
            str(args.prompt),
            str(args.new),
            str(args.repeats),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"measuring {label} failed:\n{proc.stderr[-2000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append({"row": label, "engine": "torch eager", **measured})
        _said(out[-1])
    return out


def _measure_llamacpp(run: Path, args) -> list[dict]:
    from quantlab.engines.llamacpp import bench, find_llamacpp
    from quantlab.hardware.rows import gguf_footprint

    files = [run / f"gguf-{t.lower()}" / "checkpoint" / "model.gguf" for t in GGUF_TYPES]
    recs = bench(
        find_llamacpp(),
        files,
        threads=args.threads,
        n_prompt=args.prompt,
        n_gen=args.new,
        repetitions=args.repeats,
    )
    out = []
    for t, f in zip(GGUF_TYPES, files):
        got = {r["test"]: r["tokens_per_s"] for r in recs if Path(r["model"]) == f}
        out.append(
            {
                "row": f"llama.cpp {t}",
                "engine": "llama.cpp",
                "decode": got["decode"],
                "prefill": got["prefill"],
                "kv_bytes": 2,
                "read_bytes": gguf_footprint(f, "llama.cpp").read_bytes,
            }
        )
        _said(out[-1])
    return out


def _anchors(rows: list[dict], card, shape, args, kind: str) -> list:
    from quantlab.hardware.anchors import Anchor

    # a decode run's KV cache grows through it: its mean context stands for it
    tokens = args.prompt + args.new // 2 if kind == "decode" else args.prompt
    return [
        Anchor(
            r["row"],
            card,
            r["engine"],
            kind,
            shape,
            r["read_bytes"],
            tokens,
            r[kind],
            "measured by scripts/bench_projection.py",
            kv_bytes=r["kv_bytes"],
        )
        for r in rows
    ]


def _left_out(decode: list, i: int, compute: float):
    """The efficiency fitted without row ``i`` (None when the rest cannot fit two unknowns)."""
    from quantlab.hardware.efficiency import fit_decode
    from quantlab.hardware.projection import Efficiency

    try:
        memory, overhead = fit_decode(decode[:i] + decode[i + 1 :])
    except ValueError:
        return None
    return Efficiency(memory, compute, overhead, "left out")


def fit_engine(rows: list[dict], card, shape, args) -> dict:
    """One engine's efficiency from its rows, each row's error in the fit and left out of it."""
    from quantlab.hardware.efficiency import CPU_COMPUTE_EFFICIENCY as DEFAULT
    from quantlab.hardware.efficiency import fit_compute, fit_decode, project_anchor
    from quantlab.hardware.projection import Efficiency

    decode = _anchors(rows, card, shape, args, "decode")
    prefill = _anchors(rows, card, shape, args, "prefill")
    memory, overhead = fit_decode(decode)
    try:
        compute = fit_compute(prefill, overhead)
    except ValueError as e:  # a prompt this short is all overhead: it says nothing about compute
        print(
            f"  {rows[0]['engine']}: prefill efficiency not fitted ({e}); the shipped "
            f"{DEFAULT} is used",
            flush=True,
        )
        compute = DEFAULT
    eff = Efficiency(memory, compute, overhead, "this machine")
    report = []
    for i, (a, p) in enumerate(zip(decode, prefill)):
        loo = _left_out(decode, i, eff.compute)
        report.append(
            {
                "row": a.name,
                "engine": a.engine,
                "read_bytes": a.read_bytes,
                "decode_measured": a.measured_tokens_per_s,
                "decode_projected": project_anchor(a, eff),
                "decode_projected_left_out": project_anchor(a, loo) if loo else None,
                "prefill_measured": p.measured_tokens_per_s,
                "prefill_projected": project_anchor(p, eff),
            }
        )
    fitted = {"memory": memory, "compute": eff.compute, "layer_overhead_s": overhead}
    return {"efficiency": fitted, "rows": report}


def _err(p: float | None, m: float) -> str:
    return "-" if p is None else f"{100 * (p / m - 1):+.1f}%"


HEAD = (
    "row",
    "engine",
    "MB/step",
    "decode",
    "proj.",
    "error",
    "left-out",
    "prefill",
    "proj.",
    "error",
)


def _line(r: dict, engine: str) -> str:
    dm, pm = r["decode_measured"], r["prefill_measured"]
    cells = (
        r["row"],
        engine,
        f"{r['read_bytes'] / 1e6:.1f}",
        f"{dm:.1f}",
        f"{r['decode_projected']:.1f}",
        _err(r["decode_projected"], dm),
        _err(r["decode_projected_left_out"], dm),
        f"{pm:.0f}",
        f"{r['prefill_projected']:.0f}",
        _err(r["prefill_projected"], pm),
    )
    return f"{cells[0]:28s} {cells[1]:12s} " + " ".join(f"{c:>8s}" for c in cells[2:])


def print_report(fits: dict[str, dict], bandwidth: float, card) -> bool:
    """The per-row table and whether every row met the target (in the fit)."""
    print(
        f"\nthis machine: {card.cores} cores, measured bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"float32 matmul {card.dense_flops / 1e9:.0f} GFLOPS"
    )
    print(f"{HEAD[0]:28s} {HEAD[1]:12s} " + " ".join(f"{h:>8s}" for h in HEAD[2:]))
    ok = True
    for engine, fit in fits.items():
        for r in fit["rows"]:
            ok &= abs(r["decode_projected"] / r["decode_measured"] - 1) <= TARGET
            print(_line(r, engine))
        e = fit["efficiency"]
        print(
            f"  {engine}: memory efficiency {e['memory']:.3f}, {e['layer_overhead_s'] * 1e6:.0f} "
            f"us per layer, prefill {e['compute']:.3f} of the measured matmul rate"
        )
    print(
        f"[{'MET' if ok else 'NOT MET'}] every row's decode within +-{TARGET:.0%} of its "
        "measurement, one efficiency per engine (the 'left-out' column: fitted without that row)"
    )
    return ok


def _main_measure() -> int:
    import torch

    ckpt, dtype, kernel, prompt, new, repeats = sys.argv[2:8]
    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    print(json.dumps(_measure_here(ckpt, dtype, kernel, int(prompt), int(new), int(repeats))))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":  # one measurement, in its own process
        return _main_measure()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", help="model source (default: the demo)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-llamacpp", action="store_true", help="torch rows only")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-projection"))
    args = ap.parse_args()
    import torch

    from quantlab.bench.speed import memory_bandwidth
    from quantlab.engines.llamacpp import find_llamacpp
    from quantlab.errors import QuantlabError
    from quantlab.hardware.machine import this_machine
    from quantlab.hardware.shape import read_shape

    torch.set_num_threads(args.threads)
    llamacpp = not args.no_llamacpp
    try:
        llamacpp and find_llamacpp()
    except QuantlabError as e:
        print(f"llama.cpp rows skipped: {e}", flush=True)
        llamacpp = False
    run = _export(args, llamacpp)
    bandwidths = [memory_bandwidth("cpu")]
    rows = _measure_torch(run, args) + (_measure_llamacpp(run, args) if llamacpp else [])
    bandwidths.append(memory_bandwidth("cpu"))
    bandwidth = statistics.fmean(bandwidths)  # before and after: a drift shows in the JSON
    card = this_machine(bandwidth, "measured by bench_projection.py (mean of before and after)")
    shape = read_shape(run / "float" / "checkpoint" / "config.json")
    fits = {
        e: fit_engine([r for r in rows if r["engine"] == e], card, shape, args)
        for e in dict.fromkeys(r["engine"] for r in rows)
    }
    ok = print_report(fits, bandwidth, card)
    Path(args.out, "bench_projection.json").write_text(
        json.dumps(
            {
                "bandwidths": bandwidths,
                "matmul_flops": card.dense_flops,
                "threads": args.threads,
                "rows": rows,
                "fits": fits,
                "target_met": ok,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
