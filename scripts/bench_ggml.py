"""Issue #30 parts 2 and 3, measured: llama.cpp's Q4_0 / IQ4_NL / Q4_K_M + imatrix files
against quantlab's ``ggml`` files (search none, search awq, and ``type: auto``: a type per
tensor at the size of llama.cpp's file), judged by llama.cpp's own ``llama-perplexity
--kl-divergence`` against the F32 export of the demo model (WikiText-2 v1 test, ctx 512, the
first N chunks, the same chunks for every row). One importance matrix (32 x 512 pydoc
calibration windows, seed 0) is handed to both quantizers as the same file.

    .venv/bin/python scripts/bench_ggml.py [--chunks 100] [--threads 2] [--n-grid 20]
        [--types Q4_0,IQ4_NL] [--imatrix FILE] [--out runs/bench-ggml]
        [--rows preset,pure,ours,awq,auto] [--auto-sizes Q4_0,Q4_K_M] [--reuse-base]
        [--alloc-units fused] [--alloc-probe scaled] [--alloc-windows 1] [--alloc-seq-len 256]

``auto`` rows: for each type of ``--auto-sizes``, ``llama-quantize --imatrix`` writes its
preset file (a row of its own with ``preset`` in ``--rows``), and quantlab's ``type: auto``
file gets the bytes of that file's 2-D tensors as its size_target (the per-unit KLs are
measured once for all sizes, or read from ``--alloc-kl``).

Rows are printed (and appended to OUT/rows.jsonl) as each is measured. Needs llama.cpp's tools
(bash scripts/llamacpp.sh) and ../shared/data/wikitext-2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
CPU = torch.device("cpu")


def _setup(args, out: Path):
    """(model, calibration ids, template, F32 file, imatrix, imatrix file)."""
    from quantlab.data import pydoc_text, sample_calibration, tokenize
    from quantlab.formats.gguf import export_gguf
    from quantlab.imatrix import compute_imatrix, read_imatrix, write_imatrix
    from quantlab.models import _demo_gguf, load_model
    from quantlab.quantizers.ggml import gguf_names_of

    lm = load_model("smollm2-135m", dtype=torch.float32, device=CPU)
    text = pydoc_text("calibration")
    cal = sample_calibration(tokenize(text, lm.tokenizer), text, args.samples, 512, 0).ids
    template = _demo_gguf("smollm2-135m")
    f32 = out / "f32.gguf"
    export_gguf(lm.model, f32, template)
    if args.imatrix:
        im_file = Path(args.imatrix)
        im = read_imatrix(im_file)
    else:
        im = compute_imatrix(lm.model, cal, gguf_names_of(lm.model))
        im_file = write_imatrix(im, out / "imatrix.gguf")
    return lm.model, cal, template, f32, im, im_file


def _files(args, out: Path, model, cal, template, f32: Path, im, im_file: Path):
    """Yield (label, GGUF file) of every row, each written just before it is yielded."""
    rows = set(args.rows.split(","))
    for qtype in args.types.split(","):
        yield from _fixed_type_files(args, rows, out, model, cal, template, f32, im, im_file, qtype)
    if "auto" in rows:
        yield from _auto_files(args, out, model, cal, template, f32, im, im_file)


def _preset(out: Path, f32: Path, im_file: Path, qtype: str) -> Path:
    """llama-quantize --imatrix's preset file of ``qtype`` (written once)."""
    from quantlab.engines.llamacpp import find_llamacpp
    from quantlab.procs import run_tool

    preset = out / f"llamacpp-{qtype}-imatrix.gguf"
    quantize = find_llamacpp().tool("llama-quantize")
    run_tool(
        [quantize, "--imatrix", im_file, f32, preset, qtype], what="llama-quantize", timeout_s=600
    )
    return preset


def _auto_files(args, out: Path, model, cal, template, f32: Path, im, im_file: Path):
    """quantlab's type: auto file at the size of each --auto-sizes preset (after the preset)."""
    import gguf

    from quantlab.log import log
    from quantlab.quantizers.ggml import Ggml, _block_linears
    from quantlab.quantizers.ggml_alloc import allocate_gguf, write_mixed_gguf

    importance = {n: im.importance(n) for n in im.sums}
    kl = json.loads(Path(args.alloc_kl).read_text())["kl"] if args.alloc_kl else None
    for qtype in args.auto_sizes.split(","):
        preset = _preset(out, f32, im_file, qtype)
        if qtype not in args.types.split(",") and "preset" in args.rows.split(","):
            yield f"llama-quantize --imatrix {qtype} (preset)", preset
        tensors = gguf.GGUFReader(str(preset)).tensors
        size = sum(int(t.n_bytes) for t in tensors if len(t.shape) == 2)
        cfg = Ggml.Config(
            type="auto",
            size_target=f"{size}B",
            imatrix=True,
            units=args.alloc_units,
            probe=args.alloc_probe,
            probe_windows=args.alloc_windows,
            probe_seq_len=args.alloc_seq_len,
            candidates=args.alloc_candidates.split(",") if args.alloc_candidates else None,
        )
        rec = allocate_gguf(model, _block_linears(model), cal, template, importance, cfg, log, kl)
        kl = rec["kl"]
        path = out / f"quantlab-auto-{qtype}-size.gguf"
        write_mixed_gguf(model, path, template, rec["gguf_tensor_types"], importance)
        (out / f"quantlab-auto-{qtype}-size.json").write_text(json.dumps(rec, indent=1))
        mix = ", ".join(f"{c} x {t}" for t, c in rec["type_counts"].items())
        print(
            f"  type: auto at {qtype}'s {size} tensor bytes: {rec['bits_per_weight']:.4f} bits/"
            f"weight ({rec['bytes']} bytes); {mix}; probe KL ({rec['probe']}, "
            f"{rec['windows']} x {rec['seq_len']} pydoc tokens) predicted "
            f"{rec['predicted_kl']:.4f}, measured {rec['measured_kl']:.4f}; {rec['seconds']:.0f} s",
            flush=True,
        )
        yield (
            (
                f"quantlab ggml type: auto + imatrix at {qtype}'s size ({args.alloc_units} units, "
                f"probe {args.alloc_probe})"
            ),
            path,
        )


def _fixed_type_files(args, rows, out, model, cal, template, f32, im, im_file, qtype):
    """The rows of one type: llama.cpp's preset and --pure files, quantlab's, with search."""
    from quantlab.engines.llamacpp import find_llamacpp
    from quantlab.formats.gguf import export_ggml
    from quantlab.procs import run_tool
    from quantlab.quantizers.ggml import Ggml, gguf_names_of
    from quantlab.quantizers.ggml_awq import awq_fold

    if "preset" in rows:
        yield f"llama-quantize --imatrix {qtype} (preset)", _preset(out, f32, im_file, qtype)
    if "pure" in rows:
        pure = out / f"llamacpp-pure-{qtype}-imatrix.gguf"
        quantize = find_llamacpp().tool("llama-quantize")
        embedding = ["--token-embedding-type", "q8_0"]
        run_tool(
            [quantize, "--pure", *embedding, "--imatrix", im_file, f32, pure, qtype],
            what="llama-quantize --pure",
            timeout_s=600,
        )
        yield f"llama-quantize --pure --token-embedding-type q8_0 --imatrix {qtype}", pure
    if "ours" in rows:
        ours = out / f"quantlab-{qtype}-imatrix.gguf"
        export_ggml(model, ours, template, qtype, importance={n: im.importance(n) for n in im.sums})
        yield f"quantlab ggml {qtype} + imatrix", ours
    if "awq" not in rows:
        return
    folded, im_s, stats = copy.deepcopy(model), copy.deepcopy(im), {}
    cfg = Ggml.Config(type=qtype, imatrix=True, search="awq", n_grid=args.n_grid)
    awq_fold(folded, cal, qtype, im_s, gguf_names_of(folded), cfg, stats)
    searched = out / f"quantlab-{qtype}-imatrix-awq.gguf"
    importance = {n: im_s.importance(n) for n in im_s.sums}
    export_ggml(folded, searched, template, qtype, importance=importance)
    gain = sum(v["search_loss_identity"] / v["search_loss_best"] for v in stats.values())
    print(
        f"  search: mean identity/best loss ratio {gain / len(stats):.3f} over "
        f"{len(stats)} linears",
        flush=True,
    )
    del folded
    yield f"quantlab ggml {qtype} + imatrix + search awq (n_grid {args.n_grid})", searched


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    p.add_argument("--n-grid", type=int, default=20)
    p.add_argument("--types", default="Q4_0,IQ4_NL")
    p.add_argument("--imatrix", help="an imatrix file to use instead of computing one")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-ggml"))
    p.add_argument("--rows", default="preset,pure,ours,awq,auto", help="which rows to measure")
    p.add_argument("--auto-sizes", default="Q4_0,Q4_K_M", help="type: auto at these files' sizes")
    p.add_argument("--alloc-units", default="tensor", choices=["tensor", "fused"])
    p.add_argument("--alloc-probe", default="full", choices=["full", "scaled"])
    p.add_argument("--alloc-windows", type=int, default=4, help="probe windows (pydoc)")
    p.add_argument("--alloc-seq-len", type=int, default=256, help="tokens per probe window")
    p.add_argument("--alloc-candidates", help="comma-separated types (default: ggml's)")
    p.add_argument(
        "--alloc-kl", help="an earlier auto row's JSON record: its per-unit KLs, not measured again"
    )
    p.add_argument(
        "--reuse-base",
        action="store_true",
        help="keep OUT/f32.kld from an earlier run with the same --chunks (no F32 rerun)",
    )
    args = p.parse_args()
    if not WIKITEXT.is_file():
        print(f"bench_ggml: {WIKITEXT} is missing (WikiText-2 v1 test)", file=sys.stderr)
        return 2
    from quantlab.engines.llamacpp import find_llamacpp, perplexity

    tools = find_llamacpp()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = _setup(args, out)
    base = out / "f32.kld"
    kw = dict(ctx=512, chunks=args.chunks, threads=args.threads, kld_base=base)
    if args.reuse_base and base.is_file():
        print(f"WikiText-2 v1 test, ctx 512, {args.chunks} chunks; F32 logits of {base}")
    else:
        f32 = perplexity(tools, setup[3], WIKITEXT, **kw)
        print(
            f"WikiText-2 v1 test, ctx 512, {args.chunks} chunks, llama-perplexity; F32 PPL "
            f"{f32['ppl']:.4f}",
            flush=True,
        )
    for label, path in _files(args, out, *setup):
        r = perplexity(tools, path, WIKITEXT, kld=True, **kw)
        row = {"file": label, "bytes": path.stat().st_size, **r}
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"| {label} | {row['bytes']} | {r['ppl']:.4f} | {r['kld_mean']:.6f} ± "
            f"{r['kld_stderr']:.6f} | {r['kld_p99']:.4f} | {100 * r['top1_agreement']:.2f}% |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
