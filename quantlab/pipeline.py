"""One run: load the base model, then for every method quantize, export, RELOAD the
checkpoint from disk and score the reloaded model. Scores never come from the object that
was quantized in memory: a lab that does so never proves its export works."""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from quantlab import __version__
from quantlab.bench.perplexity import perplexity_gptq
from quantlab.bench.size import linear_bits_per_weight
from quantlab.bench.speed import decode_speed
from quantlab.checkpoint import export_checkpoint, load_checkpoint, weight_bytes
from quantlab.data import load_text, sample_calibration, tokenize
from quantlab.env import environment
from quantlab.errors import QuantlabError
from quantlab.models import classify, load_model, resolve_device, resolve_dtype
from quantlab.recipe import Recipe, recipe_to_dict
from quantlab.registry import get_backend
from quantlab.report.tables import format_summary, results_frame
from quantlab.runs import (
    atomic_write_json,
    atomic_write_text,
    finished_metrics,
    prepare_run_dir,
    stage_key,
)


@dataclass
class RunResult:
    path: Path
    results: pd.DataFrame


def _log(msg: str) -> None:
    print(f"quantlab: {msg}", file=sys.stderr, flush=True)


def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def _refuse_foreign_run(out_dir: Path, recipe: Recipe, force: bool) -> None:
    """Do not let another recipe's run replace this directory's results table."""
    previous = out_dir / "recipe.yaml"
    if force or not previous.is_file():
        return
    try:
        name = (yaml.safe_load(previous.read_text()) or {}).get("name")
    except (yaml.YAMLError, OSError, AttributeError):
        name = None
    if name != recipe.name:
        raise QuantlabError(
            f"'{out_dir}' holds the results of recipe '{name}', not '{recipe.name}'; choose another "
            "--out, or pass --force to replace them")


def run_recipe(recipe: Recipe, out: str | Path | None = None, *, force: bool = False,
               echo: bool = True) -> RunResult:
    """Run every method of ``recipe`` into ``out`` (default: the recipe's output.dir)."""
    methods = recipe.all_methods()
    backends = {m.label: get_backend(m.backend)(m.config()) for m in methods}
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)

    # Cheap checks first: the model source and texts exist before anything is loaded.
    classify(recipe.model.source)
    if not sys.stderr.isatty():  # progress bars only where a person watches them
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    ev = recipe.eval
    eval_text = load_text(ev.source, ev.split, "evaluation", ev.text_field)
    cal = recipe.calibration
    need_cal = any(b.needs_calibration for b in backends.values())
    cal_text = load_text(cal.source, cal.split, "calibration", cal.text_field) if need_cal else None
    out_dir = prepare_run_dir(Path(out) if out else recipe.output_dir())
    _refuse_foreign_run(out_dir, recipe, force)

    _log(f"loading model '{recipe.model.source}' ({str(dtype).removeprefix('torch.')} on {device})")
    t0 = time.perf_counter()
    base = load_model(recipe.model.source, dtype=dtype, device=device, revision=recipe.model.revision,
                      trust_remote_code=recipe.model.trust_remote_code)
    base_load_s = time.perf_counter() - t0
    max_pos = getattr(base.model.config, "max_position_embeddings", None)
    for what, n in (("eval.seq_len", ev.seq_len), ("calibration.seq_len", cal.seq_len if need_cal else 0)):
        if max_pos and n > max_pos:
            raise QuantlabError(f"{what}={n} is longer than the model's context ({max_pos} tokens)")
    for label, b in backends.items():
        try:
            b.check(base.model)
        except QuantlabError as e:
            raise QuantlabError(f"method '{label}' ({b.name}): {e}") from None

    eval_ids = tokenize(eval_text, base.tokenizer)
    calibration = None
    if need_cal:
        calibration = sample_calibration(tokenize(cal_text, base.tokenizer), cal_text,
                                         cal.samples, cal.seq_len, cal.seed)
        atomic_write_json(out_dir / "calibration.json", calibration.record())

    env = environment(device, dtype)
    resolved = recipe_to_dict(recipe)
    atomic_write_text(out_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_json(out_dir / "environment.json", env)

    shared = {k: v for k, v in resolved.items() if k not in ("methods", "output", "name", "description")}
    shared.update(quantlab=__version__, eval_sha256=eval_text.sha256,
                  calibration_sha256=calibration.sha256 if calibration else None,
                  model_info={k: v for k, v in base.info.items() if k != "path"})
    source_info = dict(base.info, dtype=str(dtype).removeprefix("torch."))
    spare = [base.model]

    def take_base_model():
        """A float model to quantize: the loaded one first, then fresh loads from its source.
        Reloading (under a second for local sources) keeps one model in memory, not two."""
        if spare:
            return spare.pop()
        gc.collect()
        return load_model(recipe.model.source, dtype=dtype, device=device, revision=recipe.model.revision,
                          trust_remote_code=recipe.model.trust_remote_code).model

    base.model = None  # the methods own it from here on
    rows: list[dict] = []
    for i, method in enumerate(methods, 1):
        backend = backends[method.label]
        key = stage_key({"shared": shared, "method": method.model_dump(mode="json"),
                         "backend_version": backend.Config.version})
        mdir = out_dir / method.label
        done = None if force else finished_metrics(mdir, key)
        if done is not None:
            _log(f"[{i}/{len(methods)}] {method.label}: finished earlier with the same settings; reusing it")
            rows.append(done)
            continue
        _log(f"[{i}/{len(methods)}] {method.label}: quantize ({backend.name})")
        mdir.mkdir(parents=True, exist_ok=True)
        work = take_base_model()
        t0 = time.perf_counter()
        work = backend.quantize(work, calibration.ids if (calibration and backend.needs_calibration) else None)
        quantize_s = time.perf_counter() - t0
        _log(f"[{i}/{len(methods)}] {method.label}: export")
        t0 = time.perf_counter()
        ckpt = export_checkpoint(work, base.tokenizer, backend, mdir / "checkpoint",
                                 source=source_info, label=method.label)
        export_s = time.perf_counter() - t0
        del work
        gc.collect()

        _log(f"[{i}/{len(methods)}] {method.label}: reload from disk and score")
        t0 = time.perf_counter()
        loaded = load_checkpoint(ckpt, dtype=dtype, device=device)
        load_s = time.perf_counter() - t0
        ppl = perplexity_gptq(loaded.model, eval_ids, ev.seq_len, max_windows=ev.max_windows,
                              batch_size=ev.batch_size)
        speed = {}
        if ev.speed.enabled:
            prompt = eval_ids[: ev.speed.prompt_tokens].unsqueeze(0)
            speed = decode_speed(loaded.model, prompt, ev.speed.new_tokens, ev.speed.warmup, ev.speed.repeats)
        fields = backend.config.table_fields()
        kernels = sorted({m.kernel for m in loaded.model.modules() if hasattr(m, "kernel")})
        metrics = {
            "method": method.label,
            "backend": backend.name,
            "bits": fields.get("bits", _dtype_bits(dtype)),
            "group_size": fields.get("group_size"),
            "ppl": ppl.ppl,
            "ppl_convention": ppl.convention,
            "eval_source": eval_text.name,
            "eval_sha256": eval_text.sha256,
            "eval_seq_len": ppl.seq_len,
            "eval_windows": ppl.windows,
            "eval_tokens": ppl.scored_tokens,
            "tokenizer": base.tokenizer.__class__.__name__,
            "size_bytes": weight_bytes(ckpt),
            "bits_per_weight": linear_bits_per_weight(loaded.model),
            "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
            "decode_tokens_per_s_min": speed.get("decode_tokens_per_s_min"),
            "decode_tokens_per_s_max": speed.get("decode_tokens_per_s_max"),
            "quantize_s": quantize_s,
            "export_s": export_s,
            "load_s": load_s,
            "eval_s": ppl.seconds,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "kernel": ",".join(kernels) or "dense",
            "checkpoint": str(ckpt.relative_to(out_dir)),
            "options": backend.config.model_dump(mode="json"),
            "speed": speed,
            "perplexity": ppl.as_dict(),
            "layers": backend.layer_stats,
            "base_load_s": base_load_s,
            "key": key,
        }
        atomic_write_json(mdir / "metrics.json", metrics)
        rows.append(metrics)
        atomic_write_text(out_dir / "results.csv", results_frame(rows).to_csv(index=False))
        del loaded
        gc.collect()
        _log(f"[{i}/{len(methods)}] {method.label}: ppl {ppl.ppl:.3f} ({ppl.convention}, "
             f"{ppl.scored_tokens} tokens of {eval_text.name})")

    frame = results_frame(rows)
    atomic_write_text(out_dir / "results.csv", frame.to_csv(index=False))
    if echo:
        print(format_summary(frame, env))
        print(f"\nrun directory: {out_dir}  (results.csv, per-method metrics.json and checkpoints)")
    return RunResult(out_dir, frame)
