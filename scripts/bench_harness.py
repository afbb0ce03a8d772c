"""quantlab's perplexity pass against llama.cpp's ``llama-perplexity``, side by side on the
same model, text, context and threads.

The demo model ships as a Q4_1 GGUF; quantlab loads it as float32. llama.cpp gets the same
weights as an F32 GGUF (and an F16 one) made with ``llama-quantize --allow-requantize``.
Both score the WikiText-2 test split by llama.cpp's convention (512-token chunks, second
half scored). Printed per engine: PPL ± stderr, tokens through the model per second.
Both rates time the scoring loop only (forward passes, log-softmax, accumulation), from
llama.cpp's own log time stamps and quantlab's timer; model loading and tokenization are
excluded from both.

llama.cpp is not part of quantlab: build it from the llama-cpp-python source distribution
(``pip download --no-deps --no-binary :all: llama-cpp-python``, then in vendor/llama.cpp:
``cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && cmake --build build -j2
--target llama-perplexity llama-quantize``) and pass ``--llama-bin build/bin``.

Usage: python scripts/bench_harness.py --llama-bin DIR [--chunks 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from quantlab.bench.perplexity import make_plan, perplexity
from quantlab.data import load_text, tokenize
from quantlab.models import _demo_gguf, load_model

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def llama_perplexity(
    binary: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int
) -> dict:
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "-f",
        str(text),
        "-c",
        str(ctx),
        "-b",
        str(4 * ctx),
        "--chunks",
        str(chunks),
        "-t",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"llama-perplexity failed:\n{log[-2000:]}")
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    # log lines start with a time stamp M.SS.mmm.uuu; time the scoring loop from its first
    # line to the final estimate (model load and tokenization excluded, as for quantlab)
    stamp = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I perplexity: calculating perplexity over (\d+) chunks"
    start = re.search(stamp, log)
    end = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I Final estimate", log)
    if not (final and start and end):
        sys.exit(f"could not read llama-perplexity's output:\n{log[-2000:]}")

    def secs(m) -> float:
        return (
            int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6
        )

    seconds = secs(end) - secs(start)
    tokens = int(start.group(5)) * ctx
    return {
        "ppl": float(final.group(1)),
        "ppl_stderr": float(final.group(2)),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--llama-bin",
        required=True,
        type=Path,
        help="directory with llama-perplexity, llama-quantize",
    )
    ap.add_argument(
        "--chunks", type=int, default=100, help="512-token chunks scored (WikiText-2 test has ~560)"
    )
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="quantlab: chunks per forward pass")
    ap.add_argument("--f16", action="store_true", help="also run llama.cpp on an F16 GGUF")
    args = ap.parse_args()
    if not WIKITEXT.is_dir():
        sys.exit(f"needs the WikiText-2 test split at {WIKITEXT}")
    torch.set_num_threads(args.threads)
    text_path = WIKITEXT / "test.txt"
    tmp = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    q41 = _demo_gguf("smollm2-135m")
    rows = []

    lm = load_model("smollm2-135m", dtype=torch.float32, device=torch.device("cpu"))
    text = load_text(str(WIKITEXT), "test", "evaluation")
    plan = make_plan(
        "llamacpp",
        ids=tokenize(text, lm.tokenizer),
        tokenizer=lm.tokenizer,
        seq_len=args.ctx,
        max_windows=args.chunks,
    )
    perplexity(
        lm.model,
        make_plan(
            "llamacpp",
            ids=plan.segments[0].input_ids.repeat(2),
            seq_len=args.ctx,
            tokenizer=lm.tokenizer,
        ),
    )  # warm-up
    r = perplexity(lm.model, plan, args.batch_size)
    rows.append(
        {
            "engine": "quantlab (PyTorch)",
            "dtype": "float32",
            "ppl": r.ppl,
            "ppl_stderr": r.ppl_stderr,
            "tokens": r.input_tokens,
            "seconds": r.seconds,
            "tokens_per_s": r.tokens_per_s,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    del lm

    for dtype in ["F32"] + (["F16"] if args.f16 else []):
        gguf = tmp / f"smollm2-{dtype.lower()}.gguf"
        subprocess.run(
            [
                str(args.llama_bin / "llama-quantize"),
                "--allow-requantize",
                str(q41),
                str(gguf),
                dtype,
            ],
            check=True,
            capture_output=True,
        )
        res = llama_perplexity(
            args.llama_bin / "llama-perplexity",
            gguf,
            text_path,
            args.ctx,
            args.chunks,
            args.threads,
        )
        rows.append({"engine": "llama.cpp llama-perplexity", "dtype": dtype.lower(), **res})
        print(json.dumps(rows[-1]), flush=True)
        gguf.unlink()

    print(
        f"\nWikiText-2 test, llamacpp convention, ctx {args.ctx}, {args.chunks} chunks, "
        f"{args.threads} threads"
    )
    for row in rows:
        ratio = rows[0]["tokens_per_s"] / row["tokens_per_s"]
        print(
            f"{row['engine']:28s} {row['dtype']:8s} PPL {row['ppl']:.4f} ± {row['ppl_stderr']:.4f} "
            f" {row['tokens_per_s']:7.1f} tok/s  (quantlab / this = {ratio:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
