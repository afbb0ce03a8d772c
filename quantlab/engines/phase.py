"""The llama.cpp engine in a run: each method that exports GGUF writes ``LABEL/model.gguf``
(its own blocks) and ``LABEL/model-f32.gguf`` (the same weights dequantized, for the engine
cross-check); after every row is scored by torch, llama.cpp measures all GGUF rows together:

- ``llama-perplexity`` of the baseline's F32 GGUF saves its logits; each row's file is
  compared with them: PPL ± stderr, mean KLD, KLD p99, same top token (llama.cpp's own
  figures, columns ``llamacpp_*``);
- each row's F32 file gives ``llamacpp_f32_ppl``: llama.cpp's activation-quantization cost is
  ``llamacpp_ppl / llamacpp_f32_ppl - 1``, and where the run scores the llamacpp convention
  with the same context and chunks, the engine gap ``llamacpp_f32_ppl / ppl - 1``;
- ``llama-bench`` in rounds (baseline, A, B, ... once each per round): tokens/s medians and
  per-round ratios to the baseline measured in the same round.

Nothing here is reused from an earlier session: the phase runs whole every time (speed
figures of different sessions are never put side by side).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from quantlab.cache import sha256_file as _sha256
from quantlab.errors import QuantlabError
from quantlab.records import atomic_write_text, read_record, write_record
from quantlab.rundir import owned_path

GGUF = "model.gguf"
GGUF_F32 = "model-f32.gguf"
RECORD = "gguf.json"
#: a GGUF file being written: ``LABEL/.model.gguf.tmp-PID``, renamed into place when whole
_TMP_INFIX = ".tmp-"
#: columns the phase fills (cleared first, so a row never shows figures of another session)
COLUMNS = (
    "llamacpp_ppl",
    "llamacpp_ppl_stderr",
    "llamacpp_kld_mean",
    "llamacpp_kld_p99",
    "llamacpp_top1_agreement",
    "llamacpp_f32_ppl",
    "llamacpp_actq_cost_pct",
    "llamacpp_engine_gap_pct",
    "llamacpp_prefill_tokens_per_s",
    "llamacpp_decode_tokens_per_s",
    "llamacpp_decode_x_float",
    "llamacpp_decode_x_min",
    "llamacpp_decode_x_max",
    "llamacpp_prefill_x_float",
    "llamacpp_threads",
    "llamacpp_build",
    "llamacpp_ctx",
    "llamacpp_chunks",
)


def export_method_gguf(
    model,
    mdir: Path,
    template: Path,
    *,
    float_type: str,
    baseline: bool,
    key: str,
    log: Callable[[str], None],
) -> dict:
    """Write the method's GGUF files (reused when the record's key and the files' sha256 match);
    returns the record: files, GGUF types, bytes."""
    from quantlab.formats.gguf import export_gguf, gguf_type_counts

    _remove_stale_temporaries(mdir)
    record = read_record(mdir / RECORD, key)
    if record and _files_intact(mdir, record):
        return record
    native = mdir / "checkpoint" / GGUF  # a llama.cpp row: its checkpoint already is the GGUF file
    files = {GGUF: {"float_type": "F32" if baseline else float_type}}
    if not baseline:
        files[GGUF_F32] = {"float_type": "F32", "dequantized": True}
    for name, kw in files.items():
        owned_path(mdir, name, directory=False, what="GGUF file")
        tmp = _temporary(mdir, name)
        try:
            if name == GGUF and native.is_file():
                shutil.copyfile(native, tmp)
            else:
                export_gguf(model, tmp, template, **kw)
            os.replace(tmp, mdir / name)
        finally:
            tmp.unlink(missing_ok=True)
    counts = gguf_type_counts(mdir / GGUF)  # as the file holds them, read back
    record = {
        "key": key,
        "sha256": {f: _sha256(mdir / f) for f in files},
        "type_counts": counts,
        "bytes": (mdir / GGUF).stat().st_size,
    }
    write_record(mdir / RECORD, record)
    log(f"GGUF written: {', '.join(f'{n} x {t}' for t, n in sorted(counts.items()))}")
    return record


def _temporary(mdir: Path, name: str) -> Path:
    return mdir / f".{name}{_TMP_INFIX}{os.getpid()}"


def _remove_stale_temporaries(mdir: Path) -> None:
    """Half-written GGUF files of a writer that was killed (a SIGKILL leaves its ``finally``
    unrun): the run holds its lock, so no live writer of this method's files is left."""
    for name in (GGUF, GGUF_F32):
        for stale in mdir.glob(f".{name}{_TMP_INFIX}*"):
            if stale.is_symlink() or stale.is_file():
                stale.unlink(missing_ok=True)


def _files_intact(mdir: Path, record: dict) -> bool:
    return all((mdir / f).is_file() and _sha256(mdir / f) == h for f, h in record["sha256"].items())


def gguf_intact(mdir: Path) -> bool:
    """A reused row's GGUF files are the ones its (unedited) record hashed."""
    record = read_record(mdir / RECORD, None)
    return bool(record) and _files_intact(mdir, record)


def main_type(counts: dict[str, int]) -> str:
    """The GGUF type of most quantized tensors (F32 for a float file)."""
    quant = {t: n for t, n in counts.items() if t not in ("F32", "F16")}
    return max(quant, key=quant.get) if quant else "F32"


def _median_ratio(samples: list[float], base: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(samples, base) if b]
    return statistics.median(ratios), min(ratios), max(ratios)


def llamacpp_phase(
    out_dir: Path,
    rows: list[dict],
    text: str,
    spec,
    threads: int,
    *,
    convention: tuple[str, int | None, int | None],
    log: Callable[[str], None],
) -> None:
    """Measure every GGUF row with llama.cpp and write the figures into the rows (in place)."""
    from quantlab.engines.llamacpp import find_llamacpp, perplexity

    tools = find_llamacpp()
    gguf_rows = [r for r in rows if r.get("gguf_file")]
    base = next((r for r in gguf_rows if r["backend"] == "none"), None)
    if base is None:
        raise QuantlabError("the llama.cpp engine needs the float baseline's GGUF (baseline: true)")
    for r in rows:
        for c in COLUMNS:
            r.pop(c, None)
    work = owned_path(out_dir, ".llamacpp", directory=True, what="llama.cpp working directory")
    text_file = work / "eval.txt"
    atomic_write_text(text_file, text)  # replaces a link planted there, never writes through it
    kld_file = work / "base.kld"
    kw = {"ctx": spec.ctx, "chunks": spec.chunks, "threads": threads}
    t0 = time.perf_counter()
    log(
        f"llama.cpp ({tools.version}, {threads} threads): perplexity of {len(gguf_rows)} GGUF "
        f"files, ctx {spec.ctx}{f', {spec.chunks} chunks' if spec.chunks else ''}"
    )
    try:
        base.update(
            _prefixed(
                perplexity(tools, out_dir / base["gguf_file"], text_file, kld_base=kld_file, **kw)
            )
        )
        for r in gguf_rows:
            if r is base:
                continue
            log(f"llama.cpp: {r['method']}")
            r.update(
                _prefixed(
                    perplexity(
                        tools,
                        out_dir / r["gguf_file"],
                        text_file,
                        kld_base=kld_file,
                        kld=True,
                        **kw,
                    )
                )
            )
            r["llamacpp_f32_ppl"] = perplexity(
                tools, out_dir / r["gguf_f32_file"], text_file, **kw
            )["ppl"]
    finally:
        kld_file.unlink(
            missing_ok=True
        )  # ctx/2 x vocab x 2 bytes per chunk: gigabytes, cheap to redo
    base["llamacpp_f32_ppl"] = base["llamacpp_ppl"]
    same = (
        convention[0] == "llamacpp" and convention[1] == spec.ctx and convention[2] == spec.chunks
    )
    for r in gguf_rows:
        r["llamacpp_actq_cost_pct"] = 100 * (r["llamacpp_ppl"] / r["llamacpp_f32_ppl"] - 1)
        r["llamacpp_engine_gap_pct"] = (
            100 * (r["llamacpp_f32_ppl"] / r["ppl"] - 1) if same else None
        )
        r.update(
            llamacpp_threads=threads,
            llamacpp_build=tools.version,
            llamacpp_ctx=spec.ctx,
            llamacpp_chunks=spec.chunks,
        )
    _speed_rounds(tools, out_dir, gguf_rows, base, spec.bench, threads, log)
    log(f"llama.cpp phase done in {time.perf_counter() - t0:.0f} s")


def _prefixed(figures: dict) -> dict:
    keep = {"ppl", "ppl_stderr", "kld_mean", "kld_p99", "top1_agreement"}
    return {f"llamacpp_{k}": v for k, v in figures.items() if k in keep}


def _speed_rounds(
    tools, out_dir: Path, gguf_rows: list[dict], base: dict, spec, threads: int, log
) -> None:
    """llama-bench in rounds: baseline first, then every row, one repetition each per round."""
    from quantlab.engines.llamacpp import bench

    files = [out_dir / r["gguf_file"] for r in gguf_rows]
    samples: dict[tuple[int, str], list[float]] = {}
    for k in range(spec.rounds):
        log(
            f"llama.cpp: llama-bench round {k + 1}/{spec.rounds} ({len(files)} files, prefill "
            f"{spec.n_prompt}, decode {spec.n_gen} tokens)"
        )
        records = bench(
            tools, files, threads=threads, n_prompt=spec.n_prompt, n_gen=spec.n_gen, repetitions=1
        )
        for i, rec in enumerate(_in_order(records, files)):
            for test, value in rec.items():
                samples.setdefault((i, test), []).append(value)
    b = gguf_rows.index(base)
    for i, r in enumerate(gguf_rows):
        for test in ("prefill", "decode"):
            r[f"llamacpp_{test}_tokens_per_s"] = statistics.median(samples[(i, test)])
        x, lo, hi = _median_ratio(samples[(i, "decode")], samples[(b, "decode")])
        r.update(llamacpp_decode_x_float=x, llamacpp_decode_x_min=lo, llamacpp_decode_x_max=hi)
        r["llamacpp_prefill_x_float"] = _median_ratio(
            samples[(i, "prefill")], samples[(b, "prefill")]
        )[0]
        r["llamacpp_speed_samples"] = {t: samples[(i, t)] for t in ("prefill", "decode")}


def _in_order(records: list[dict], files: list[Path]) -> list[dict[str, float]]:
    """llama-bench's records grouped per file, in the order the files were given."""
    out: list[dict[str, float]] = [{} for _ in files]
    pos = {str(f): i for i, f in enumerate(files)}
    for rec in records:
        i = pos.get(str(rec["model"]))
        if i is None:
            raise QuantlabError(f"llama-bench reported a file it was not given: {rec['model']}")
        out[i][rec["test"]] = rec["tokens_per_s"]
    if any(set(o) != {"prefill", "decode"} for o in out):
        raise QuantlabError("llama-bench did not report prefill and decode for every file")
    return out
