"""The speed issue's targets, measured on the demo model: eager vs compiled decode, dense vs
kernels chosen at load, against llama.cpp's own Q4_0 on the same machine; optionally the
stability of the speed phase's ratios under load.

    .venv/bin/python scripts/bench_speed.py [--threads 2] [--rounds 2] [--stability] \\
        [--out runs/bench-speed]

1. ``quantlab run`` of a small recipe exports the checkpoints (float baseline, RTN W4 g32,
   llama.cpp's Q4_0 through llama-quantize when its tools are built: ``bash scripts/llamacpp.sh``).
2. In ``--rounds`` rounds, each configuration is measured between two measurements of the
   float model's eager decode, each measurement in a fresh process reloading its checkpoint
   from disk (batch 1, 64-token prompt, 32 new tokens, 1 warm-up + 3 repeats): every ratio
   comes from neighbouring measurements.
   llama-bench measures the Q4_0 file in the same rounds (-p 64 -n 32 -r 3).
3. ``--stability``: the speed phase of the demo recipe three times over the same run directory
   (rows reused, speed re-measured): on the idle machine, then twice while a second process
   keeps one core busy; the x-speed ratios of the three are compared.

Run it alone: a second benchmark on the same cores distorts every absolute figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW, WARMUP, REPEATS = 64, 32, 1, 3
#: (label, checkpoint method, kernel, mode); the first is the reference of every ratio
CONFIGS = [
    ("float eager", "float", "dense", "eager"),
    ("float compiled", "float", "dense", "compiled"),
    ("rtn-w4-g32 dense eager", "rtn-w4-g32", "dense", "eager"),
    ("rtn-w4-g32 auto eager", "rtn-w4-g32", "auto", "eager"),
    ("rtn-w4-g32 auto compiled", "rtn-w4-g32", "auto", "compiled"),
    ("rtn-w4-g32 int4pack compiled", "rtn-w4-g32", "int4pack", "compiled"),
]


def _recipe(threads: int, llamacpp: bool) -> dict:
    methods = [
        {"label": "float", "backend": "none"},
        {
            "label": "rtn-w4-g32",
            "backend": "rtn",
            "options": {"bits": 4, "group_size": 32, "sym": False},
        },
    ]
    if llamacpp:
        methods.append(
            {"label": "llamacpp-q4_0", "backend": "llamacpp", "options": {"type": "Q4_0"}}
        )
    return {
        "name": "bench-speed",
        "model": {"source": "smollm2-135m"},
        "threads": threads,
        "methods": methods,
        "eval": {"max_windows": 2, "divergence": {"enabled": False}, "speed": {"enabled": False}},
    }


def _export(out: Path, threads: int, llamacpp: bool) -> None:
    recipe = out / "bench_speed.yaml"
    out.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(_recipe(threads, llamacpp), sort_keys=False))
    subprocess.run(
        [sys.executable, "-m", "quantlab", "run", str(recipe), "--out", str(out / "run")],
        check=True,
    )


def _measure(
    out: Path, method: str, kernel: str, mode: str, prompt: torch.Tensor, bandwidth: float
) -> dict:
    """One measurement in a fresh process: what a compiled measurement leaves behind (inductor's
    worker pool, its OpenMP threads) must not slow the eager one after it."""
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        str(out),
        method,
        kernel,
        mode,
        json.dumps(prompt.tolist()),
        str(bandwidth),
        "--threads",
        str(torch.get_num_threads()),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"measuring {method} {kernel} {mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_here(
    out: Path, method: str, kernel: str, mode: str, prompt: torch.Tensor, bandwidth: float
) -> dict:
    from quantlab.bench.speed import decode_bound, measure_speed
    from quantlab.checkpoint import load_checkpoint
    from quantlab.models import quiet_progress_bars

    quiet_progress_bars()
    loaded = load_checkpoint(
        out / "run" / method / "checkpoint",
        dtype=torch.float32,
        device=torch.device("cpu"),
        verify=False,
        kernel=kernel,
    )
    m = measure_speed(
        loaded.model, prompt, new_tokens=NEW, warmup=WARMUP, repeats=REPEATS, mode=mode
    )
    m["bound"] = decode_bound(loaded.model, bandwidth)["decode_bound_tokens_per_s"]
    m["kernels"] = {
        k: (v["kernel"], v["max_tokens"]) for k, v in loaded.info["kernels"]["shapes"].items()
    }
    return m


def _llama_bench(gguf: Path, threads: int) -> float:
    from quantlab.engines.llamacpp import bench, find_llamacpp

    recs = bench(
        find_llamacpp(), [gguf], threads=threads, n_prompt=PROMPT, n_gen=NEW, repetitions=REPEATS
    )
    return next(r["tokens_per_s"] for r in recs if r["test"] == "decode")


def _rounds(out: Path, rounds: int, threads: int, llamacpp: bool) -> dict:
    from quantlab.bench.speed import memory_bandwidth
    from quantlab.data import load_text, tokenize
    from quantlab.models import load_model

    torch.set_num_threads(threads)
    tok = load_model(
        str(out / "run" / "float" / "checkpoint"), dtype=torch.float32, device=torch.device("cpu")
    ).tokenizer
    prompt = tokenize(load_text("pydoc", None, "evaluation"), tok)[:PROMPT]
    bandwidth = memory_bandwidth()
    ratios: dict[str, list[float]] = {c[0]: [] for c in CONFIGS[1:]}
    figures: dict[str, list[dict]] = {c[0]: [] for c in CONFIGS}
    if llamacpp:
        ratios["llama.cpp Q4_0"], figures["llama.cpp Q4_0"] = [], []
    for rnd in range(rounds):
        ref = _measure(out, *CONFIGS[0][1:], prompt, bandwidth)
        figures[CONFIGS[0][0]].append(ref)
        todo = [(c[0], lambda c=c: _measure(out, *c[1:], prompt, bandwidth)) for c in CONFIGS[1:]]
        if llamacpp:
            gguf = out / "run" / "llamacpp-q4_0" / "checkpoint" / "model.gguf"
            todo.append(
                ("llama.cpp Q4_0", lambda g=gguf: {"decode_tokens_per_s": _llama_bench(g, threads)})
            )
        for label, fn in todo:
            m = fn()
            nxt = _measure(out, *CONFIGS[0][1:], prompt, bandwidth)
            figures[label].append(m)
            figures[CONFIGS[0][0]].append(nxt)
            ratios[label].append(
                m["decode_tokens_per_s"]
                / statistics.fmean([ref["decode_tokens_per_s"], nxt["decode_tokens_per_s"]])
            )
            print(
                f"round {rnd + 1}: {label}: {m['decode_tokens_per_s']:.1f} tok/s, "
                f"{ratios[label][-1]:.2f}x float eager",
                flush=True,
            )
            ref = nxt
    return {"ratios": ratios, "figures": figures, "bandwidth": bandwidth}


def _median(ms: list[dict], key: str) -> float:
    return statistics.median(m[key] for m in ms)


def _targets(res: dict, llamacpp: bool) -> list[tuple[str, str, bool | None]]:
    r, f = res["ratios"], res["figures"]
    med = {k: statistics.median(v) for k, v in r.items()}
    fe, fc = f["float eager"], f["float compiled"]
    out = [
        (
            "compiled decode of the float model >= 2x eager",
            f"{med['float compiled']:.2f}x ({_median(fc, 'decode_tokens_per_s'):.1f} vs "
            f"{_median(fe, 'decode_tokens_per_s'):.1f} tok/s)",
            med["float compiled"] >= 2,
        ),
        (
            "compiled float decode >= 50% of its bandwidth bound",
            f"{_median(fc, 'decode_tokens_per_s') / fc[0]['bound']:.0%} of {fc[0]['bound']:.1f} "
            f"tok/s (eager: {_median(fe, 'decode_tokens_per_s') / fe[0]['bound']:.0%})",
            _median(fc, "decode_tokens_per_s") / fc[0]["bound"] >= 0.5,
        ),
    ]
    best = max(("rtn-w4-g32 auto compiled", "rtn-w4-g32 int4pack compiled"), key=lambda k: med[k])
    out.append(
        (
            f"4-bit auto+compiled >= 2.5x float eager ({best})",
            f"{med[best]:.2f}x (rounds {', '.join(f'{x:.2f}' for x in r[best])})",
            med[best] >= 2.5,
        )
    )
    if llamacpp:
        q4 = _median(f[best], "decode_tokens_per_s")
        lc = _median(f["llama.cpp Q4_0"], "decode_tokens_per_s")
        out.append(
            (
                "4-bit auto+compiled >= 0.4x llama.cpp's Q4_0",
                f"{q4 / lc:.2f}x ({q4:.1f} vs {lc:.1f} tok/s)",
                q4 / lc >= 0.4,
            )
        )
    kernels = f["rtn-w4-g32 auto eager"][0]["kernels"]
    out.append(
        (
            "auto keeps dense for prefill where dense is faster (choices per shape)",
            "; ".join(
                f"{k}: {v[0]}" + (f" <= {v[1]} tokens" if v[1] else "") for k, v in kernels.items()
            ),
            None,
        )
    )
    return out


def _burn(stop) -> None:  # keeps one core busy
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1_000_003


def _stability(out: Path, threads: int) -> list[tuple[str, str, bool | None]]:
    """The demo recipe's speed phase on the idle machine, then twice beside a busy core."""
    from quantlab.api import load_results

    run = out / "stability"
    results = []
    for i, load in enumerate((False, True, True)):
        stop = mp.Event()
        burner = mp.Process(target=_burn, args=(stop,)) if load else None
        if burner:
            burner.start()
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "quantlab",
                "run",
                str(ROOT / "recipes" / "awq_int4.yaml"),
                "--out",
                str(run),
                "--set",
                f"threads={threads}",
            ],
            check=True,
            capture_output=True,
        )
        if burner:
            stop.set()
            burner.join()
        frame = load_results(run)
        row = frame[frame["backend"] != "none"].iloc[0]
        results.append((load, row["decode_x_float"], row["decode_x_min"], row["decode_x_max"]))
        print(
            f"stability run {i + 1} ({'one core busy' if load else 'idle'}, "
            f"{time.perf_counter() - t0:.0f} s): x-speed {row['decode_x_float']:.3f} "
            f"({row['decode_x_min']:.3f}-{row['decode_x_max']:.3f})",
            flush=True,
        )
    idle, a, b = (x[1] for x in results)
    spread = max(abs(a - b) / b, abs(a - idle) / idle, abs(b - idle) / idle)
    return [
        (
            "x-speed under load within 10% of each other and of the idle run",
            f"idle {idle:.3f}, loaded {a:.3f} and {b:.3f}: largest gap {spread:.1%}",
            spread <= 0.10,
        )
    ]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":  # one measurement, in its own process
        out, method, kernel, mode, prompt, bandwidth = sys.argv[2:8]
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
        m = _measure_here(
            Path(out), method, kernel, mode, torch.tensor(json.loads(prompt)), float(bandwidth)
        )
        print(json.dumps(m))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--stability", action="store_true", help="also the speed phase's stability under load"
    )
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-speed"))
    args = ap.parse_args()
    out = Path(args.out)
    from quantlab.engines.llamacpp import find_llamacpp
    from quantlab.errors import QuantlabError

    try:
        find_llamacpp()
        llamacpp = True
    except QuantlabError as e:
        print(f"llama.cpp's tools not found ({e}); the llama.cpp comparison is skipped", flush=True)
        llamacpp = False
    _export(out, args.threads, llamacpp)
    res = _rounds(out, args.rounds, args.threads, llamacpp)
    targets = _targets(res, llamacpp)
    if args.stability:
        targets += _stability(out, args.threads)
    (out / "bench_speed.json").write_text(json.dumps(res, indent=1, default=str))
    print(
        f"\nmachine: {args.threads} threads, measured bandwidth {res['bandwidth'] / 1e9:.1f} GB/s; "
        f"decode at batch 1, {PROMPT}-token prompt, {NEW} new tokens, {WARMUP}+{REPEATS} repeats, "
        f"{args.rounds} rounds"
    )
    for label, figures in res["figures"].items():
        ms = [m["decode_tokens_per_s"] for m in figures]
        comp = [m.get("compile_s") for m in figures if m.get("compile_s")]
        extra = f", compile {statistics.median(comp):.0f} s" if comp else ""
        bound = f", bound {figures[0]['bound']:.0f} tok/s" if "bound" in figures[0] else ""
        print(
            f"  {label:32s} decode {statistics.median(ms):6.1f} tok/s (n={len(ms)}{bound}{extra})"
        )
    for what, figure, ok in targets:
        mark = {True: "MET", False: "NOT MET", None: "info"}[ok]
        print(f"[{mark}] {what}: {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
