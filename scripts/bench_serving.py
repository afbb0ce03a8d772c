"""Serving benchmark: the float model and quantized checkpoints served by vLLM's OpenAI server,
and GGUF files served by llama.cpp's llama-server, all loaded by vLLM's own load generator at
several concurrencies, in rounds (every server once per concurrency per round, the float
model beside each), with ratios to the float model served by the same engine, measured in
the same round.

    .venv/bin/python scripts/bench_serving.py --float runs/cmp/baseline/checkpoint \\
        --method awq-w4-g64=runs/cmp/awq-w4-g64/checkpoint --concurrency 1 8 32 \\
        --requests 64 --input-tokens 256 --output-tokens 128 --rounds 2 --out serving.json
    .venv/bin/python scripts/bench_serving.py --float runs/cmp/baseline/checkpoint \\
        --gguf-float runs/cmp/baseline/model.gguf --gguf q4_0=runs/cmp/rtn-w4/model.gguf

Every server stays up for the whole benchmark (started one after the other, loaded one at a
time) and is stopped with its process group at the end, on an error or on Ctrl-C; the logs
are in --log-dir. A checkpoint vLLM refuses is a row with vLLM's message; the others go on.
Needs .venv-vllm (bash scripts/vllm.sh). Only ratios from one run mean anything on a
machine shared with other work.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from quantlab.engines.llamacpp import find_llamacpp
from quantlab.engines.serving import serving_table
from quantlab.engines.vllm import cpu_isa, find_vllm
from quantlab.errors import QuantlabError

TARGETS = (
    "targets (issue 28), on a CPU whose vLLM build has the W4A16 kernel: AWQ/GPTQ W4 rows "
    ">= 1.5x the float model's output tokens/s at concurrency 8 and >= 1.1x at 1, same run"
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float", dest="float_dir", required=True, help="the float checkpoint")
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a quantized checkpoint (repeat)",
    )
    p.add_argument(
        "--float-dtype",
        nargs="+",
        default=["bfloat16", "float32"],
        help="dtypes the float model is served in; the fastest is the reference",
    )
    p.add_argument("--dtype", default="bfloat16", help="activation dtype of the quantized rows")
    p.add_argument(
        "--gguf-float",
        type=Path,
        help="the float model as a GGUF file: served by llama-server, its rows' reference",
    )
    p.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="LABEL=FILE",
        help="a GGUF file served by llama-server (repeat; needs --gguf-float)",
    )
    p.add_argument(
        "--no-vllm",
        action="store_true",
        help="serve only the GGUF files (--float then only gives the tokenizer)",
    )
    p.add_argument("--threads", type=int, help="threads of each server (default: the cores)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--input-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--eager",
        action="store_true",
        help="no torch.compile (faster start-up; not what a deployment runs)",
    )
    p.add_argument("--log-dir", type=Path, default=Path("runs/bench-serving"))
    p.add_argument("--out", type=Path, help="write every figure and raw sample here (JSON)")
    return p.parse_args(argv)


def _pair(text: str, flag: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise QuantlabError(f"{flag} takes LABEL=PATH, not {text!r}")
    return label, path


def rows_of(args) -> list[dict]:
    rows = []
    if not args.no_vllm:
        rows += [
            {"method": "float", "dtype": d, "dir": args.float_dir, "float": True}
            for d in args.float_dtype
        ]
        for m in args.method:
            label, path = _pair(m, "--method")
            rows.append({"method": label, "dtype": args.dtype, "dir": path, "float": False})
    for r in rows:
        if not (Path(r["dir"]) / "config.json").is_file():
            raise QuantlabError(f"'{r['dir']}' is not a checkpoint directory (no config.json)")
        r.update(engine="vllm", name=f"{r['method']}-{r['dtype']}")
    return rows + gguf_rows_of(args)


def gguf_rows_of(args) -> list[dict]:
    """llama-server's rows; the tokenizer the load generator counts with is --float's."""
    if args.gguf and not args.gguf_float:
        raise QuantlabError(
            "--gguf needs --gguf-float FILE (the float model's GGUF: the reference)"
        )
    files = [("float", str(args.gguf_float), True)] if args.gguf_float else []
    files += [(*_pair(g, "--gguf"), False) for g in args.gguf]
    rows = []
    for label, path, is_float in files:
        if not Path(path).is_file():
            raise QuantlabError(f"'{path}' is not a GGUF file")
        rows.append(
            {
                "engine": "llamacpp",
                "method": label,
                "dtype": "gguf",
                "dir": path,
                "tokenizer": args.float_dir,
                "float": is_float,
                "name": f"{label}-llamacpp",
            }
        )
    return rows


def table(records) -> str:
    head = (
        f"{'engine':>8} {'method':>14} {'dtype':>9} {'c':>3} {'out_tok/s':>9} {'req/s':>6} "
        f"{'TTFT p50':>9} {'p99':>8} {'TPOT p50':>8} {'p99':>7} {'x float':>7}"
    )
    lines = [head]
    for r in records:
        if "error" in r:
            lines.append(
                f"{r['engine']:>8} {r['method']:>14} {r['dtype']:>9} {r['concurrency']:>3}  "
                f"error: {r['error'][:160]}"
            )
            continue
        lines.append(
            f"{r['engine']:>8} {r['method']:>14} {r['dtype']:>9} {r['concurrency']:>3} "
            f"{r['output_tokens_per_s']:9.1f} {r['requests_per_s']:6.2f} "
            f"{r['ttft_ms_p50']:9.0f} {r['ttft_ms_p99']:8.0f} {r['tpot_ms_p50']:8.1f} "
            f"{r['tpot_ms_p99']:7.1f} {r.get('x_float', float('nan')):7.2f}"
        )
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Ctrl-C and a plain `kill` both unwind through the servers' cleanup (their groups stopped)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)

    def log(msg: str) -> None:
        print(f"bench_serving: {msg}", file=sys.stderr, flush=True)

    try:
        rows = rows_of(args)
        vllm = find_vllm()
        tools = find_llamacpp() if any(r["engine"] == "llamacpp" for r in rows) else None
        records = serving_table(
            vllm,
            rows,
            concurrency=args.concurrency,
            requests=args.requests,
            input_tokens=args.input_tokens,
            output_tokens=args.output_tokens,
            rounds=args.rounds,
            eager=args.eager,
            log_dir=args.log_dir,
            llamacpp=tools,
            threads=args.threads,
            log=log,
        )
    except QuantlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"error: interrupted; every server was stopped (logs: {args.log_dir})", file=sys.stderr
        )
        return 130
    print(
        f"serving: vLLM's OpenAI server ({vllm.label}, {'eager' if args.eager else 'compiled'})"
        + (f", llama-server ({tools.version})" if tools else "")
        + f", {records[0]['threads'] if records else '?'} threads per server;"
        " load from vllm.benchmarks.serve: random"
        f" {args.input_tokens}-in/{args.output_tokens}-out"
        f" tokens, ignore_eos, {args.requests} requests per load, {args.rounds} round(s);"
        f" CPU {cpu_isa()}; medians over rounds; x float: median per-round ratio of output"
        " tokens/s to the fastest float row of the same engine; TTFT/TPOT in ms"
    )
    print(table(records))
    print(TARGETS)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "serving": records,
                    "vllm": vllm.label,
                    "llamacpp": tools.version if tools else None,
                    "isa": cpu_isa(),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
