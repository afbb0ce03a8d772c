"""Time and peak memory of streamed quantization and scoring at realistic model shapes.

Builds Llama models of real shapes with random weights on the fly (bfloat16 safetensors shards,
written layer by layer, so building never holds the whole model), in a temporary directory
that is removed afterwards (never committed), and measures, each in a fresh process (its peak
resident memory is the process's own, imports included):

- streamed RTN W4 g128 quantize + export (and GPTQ or AWQ W4 g128 where asked; GPTQ on 1B
  only by default);
- streamed perplexity of the export on 4 windows of 256 tokens (random token ids: the figure
  is about time and memory; random weights make the perplexity itself meaningless).

Shapes (what memory and time depend on; real checkpoints of these sizes are not available
offline here): 1b = TinyLlama-1.1B, 3b = Llama-3.2-3B (tied embeddings, 128k vocabulary;
its RoPE scaling is left out: it changes no shape), 7b = Llama-2-7B.

    python scripts/bench_scale.py --sizes 1b --methods rtn,gptq      # a 1B smoke run
    python scripts/bench_scale.py --sizes 1b,3b,7b                   # the full table (long)

Prints one row per (size, method) with ``quantize_s``, ``quantize_s_per_billion``,
``peak_rss_quantize_MiB``, ``ppl_s``, ``peak_rss_ppl_MiB`` and the export's size; ``--json``
writes the rows with the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
}
METHODS = {
    "rtn": dict(bits=4, group_size=128),
    "gptq": dict(bits=4, group_size=128, batch_size=8),
    "awq": dict(bits=4, group_size=128, batch_size=8),
}


def build(size: str, out: Path, layers: int | None = None) -> int:
    """A random-weight Llama of ``size``'s shape in ``out`` (bf16 shards); its parameter count."""
    import torch
    from transformers import LlamaConfig

    from quantlab.streaming.writer import ShardWriter

    shape = dict(SHAPES[size])
    if layers is not None:  # a truncated model: the same layers, fewer of them
        shape["num_hidden_layers"] = layers
    theta = shape.pop("rope_theta")
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    if hasattr(cfg, "rope_parameters") and isinstance(cfg.rope_parameters, dict):
        cfg.rope_parameters["rope_theta"] = theta
    else:
        cfg.rope_theta = theta
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    gen = torch.Generator().manual_seed(0)
    w = ShardWriter(out)
    count = 0

    def add(name, *shape, ones=False):
        nonlocal count
        t = torch.ones(shape) if ones else torch.randn(shape, generator=gen) * 0.02
        w.add(name, t.to(torch.bfloat16))
        count += t.numel()

    add("model.embed_tokens.weight", cfg.vocab_size, h)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        for name, shape_ in (
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ):
            add(p + name + ".weight", *shape_)
        add(p + "input_layernorm.weight", h, ones=True)
        add(p + "post_attention_layernorm.weight", h, ones=True)
    add("model.norm.weight", h, ones=True)
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", cfg.vocab_size, h)
    w.close()
    return count


def child(args) -> None:
    """One measurement in this (fresh) process; prints its JSON on the last line."""
    import torch

    from quantlab.bench.memory import PeakRSS
    from quantlab.bench.perplexity import make_plan
    from quantlab.streaming.layerwise import quantize_streaming
    from quantlab.streaming.methods import layer_method
    from quantlab.streaming.score import streaming_perplexity

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = Path(args.model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if args.child == "quantize":
            method = layer_method(args.method, METHODS[args.method])
            cal = torch.randint(3, vocab, (args.cal_samples, args.cal_len), generator=gen)
            res = quantize_streaming(
                model, Path(args.out), method, calibration=cal if method.needs_calibration else None
            )
            extra = {
                "export_bytes": sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors")),
                "shards": len(res.files),
            }
        else:
            ids = torch.randint(3, vocab, (4 * 256,), generator=gen)
            plan = make_plan("gptq", ids=ids, seq_len=256)
            ppl = streaming_perplexity(model, plan, batch_size=4)
            extra = {"ppl": ppl.ppl, "scored_tokens": ppl.scored_tokens}
        seconds = time.perf_counter() - t0
    life = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_bytes": mem.peak_bytes,
                "lifetime_peak_rss_bytes": life,
                **extra,
            }
        )
    )


def measure(kind: str, model: Path, out: Path | None, method: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        str(model),
        "--method",
        method,
        "--threads",
        str(args.threads),
        "--cal-samples",
        str(args.cal_samples),
        "--cal-len",
        str(args.cal_len),
    ]
    if out is not None:
        cmd += ["--out", str(out)]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True
    )  # its progress lines: stderr, as they come
    if proc.returncode:
        raise SystemExit(f"{kind} {method} on {model.name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_size(size: str, methods: list[str], root: Path, args) -> list[dict]:
    model = root / f"llama-{size}"
    t0 = time.perf_counter()
    params = build(size, model, args.layers)
    print(
        f"built {size}: {params / 1e9:.2f} B parameters, "
        f"{sum(f.stat().st_size for f in model.glob('*.safetensors')) / 1e9:.1f} GB bf16 "
        f"in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    rows = []
    try:
        for method in methods:
            out = root / f"{size}-{method}"
            q = measure("quantize", model, out, method, args)
            p = measure("ppl", out, None, method, args)
            rows.append(
                {
                    "size": size,
                    "layers": _layers(size, args),
                    "method": method,
                    "params_B": params / 1e9,
                    "quantize_s": q["seconds"],
                    "quantize_s_per_billion": q["seconds"] / (params / 1e9),
                    "peak_rss_quantize_MiB": q["lifetime_peak_rss_bytes"] / 2**20,
                    "export_GB": q["export_bytes"] / 1e9,
                    "ppl_s": p["seconds"],
                    "peak_rss_ppl_MiB": p["lifetime_peak_rss_bytes"] / 2**20,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(model, ignore_errors=True)
    return rows


def _layers(size: str, args) -> int:
    return args.layers or SHAPES[size]["num_hidden_layers"]


#: bytes on disk per parameter while a size is measured: the bf16 model and a W4 g128 export
#: (embeddings and head written in float32)
_DISK_PER_PARAM = 2 + 1.2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1b,3b,7b")
    ap.add_argument(
        "--methods", default="rtn", help="rtn, gptq, awq (gptq on 1b only unless --gptq-all)"
    )
    ap.add_argument("--gptq-all", action="store_true")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cal-samples", type=int, default=128)
    ap.add_argument("--cal-len", type=int, default=512)
    ap.add_argument(
        "--dir", default=None, help="where the models are built (default: the temp dir)"
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="build only this many decoder layers: streaming holds one layer at a time, so the "
        "peak memory is the full model's; the time is per layer (rows say 'layers')",
    )
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", choices=["quantize", "ppl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="rtn", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    # a kill (SIGTERM) unwinds like Ctrl-C: the temporary models are removed, never left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = os.getloadavg()
    avail = _meminfo("MemAvailable")
    print(
        f"machine at start: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"{avail / 2**30:.1f} GiB available of {_meminfo('MemTotal') / 2**30:.1f} GiB",
        file=sys.stderr,
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-scale-", dir=args.dir) as tmp:
        for size in args.sizes.split(","):
            need = _DISK_PER_PARAM * {"1b": 1.1e9, "3b": 3.2e9, "7b": 6.7e9}[size]
            free = shutil.disk_usage(tmp).free
            if free < need * 1.1:
                print(
                    f"skipping {size}: needs about {need / 1e9:.0f} GB of disk, "
                    f"{free / 1e9:.0f} GB free "
                    f"in {tmp}",
                    file=sys.stderr,
                )
                continue
            methods = [
                m for m in args.methods.split(",") if m != "gptq" or size == "1b" or args.gptq_all
            ]
            rows += run_size(size, methods, Path(tmp), args)
    _print(rows, args)


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _print(rows: list[dict], args) -> None:
    import pandas as pd

    from quantlab.env import environment

    print(
        f"streamed quantize+export and perplexity (4 x 256 tokens), random-weight Llama shapes; "
        f"{args.threads} threads, calibration {args.cal_samples} x {args.cal_len} tokens (GPTQ); "
        "peak RSS: each measurement's own process, its lifetime peak (imports included)"
    )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "environment": environment()}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
