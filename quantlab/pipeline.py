"""One run: load the base model, then for every method quantize, export, RELOAD the
checkpoint from disk and score the reloaded model. Scores never come from the object that
was quantized in memory: a lab that does so never proves its export works."""

from __future__ import annotations

import datetime as _dt
import gc
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from quantlab import __version__
from quantlab.bench.memory import PeakRSS
from quantlab.bench.perplexity import model_context
from quantlab.bench.size import (
    checkpoint_bits_per_weight,
    checkpoint_quantized_bytes,
    checkpoint_tensor_bytes,
    directory_bytes,
)
from quantlab.bench.speed import decode_bound, measure_speed, memory_bandwidth
from quantlab.checkpoint import (
    export_checkpoint,
    load_checkpoint,
    read_sidecar,
    verify_checkpoint,
    weight_bytes,
)
from quantlab.data import load_text, sample_calibration, tokenize
from quantlab.env import environment
from quantlab.errors import QuantlabError
from quantlab.models import (
    classify,
    content_digest,
    load_model,
    quiet_progress_bars,
    resolve_device,
    resolve_dtype,
)
from quantlab.recipe import Recipe, recipe_to_dict
from quantlab.registry import get_backend
from quantlab.report.tables import format_summary, results_frame
from quantlab.runs import (
    EXPORT_RECORD,
    RunLock,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    code_digest,
    finished_metrics,
    finished_stage,
    owned_path,
    prepare_run_dir,
    stage_key,
    storage_errors,
    write_record,
)
from quantlab.scoring import (
    EvalSettings,
    build_plan,
    compute_reference,
    evaluate,
    labels,
    plan_key,
)


def _kernel_label(m) -> str:
    """What executes a quantized layer: quantlab's own label, else the library's class (and
    the weight's tensor subclass, for torchao)."""
    if hasattr(m, "kernel"):
        return m.kernel
    lib = type(m).__module__.split(".")[0]
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and type(w.data if isinstance(w, torch.nn.Parameter) else w).__module__.startswith("torchao"):
        return f"torchao:{type(w.data).__name__}"
    if lib == "torch" and "dynamic" in type(m).__module__:
        return "torch.ao:dynamic-int8(fbgemm)"
    return f"{lib}:{type(m).__name__}"


def _sensitivity(method, backend, spec, model, cal_ids, cal_text, calibration, mdir: Path):
    """Run the sensitivity pass for one method; return the backend to quantize with (its skip
    list resolved when the method says ``skip: auto``) and the pass's result."""
    from quantlab.sensitivity import run_sensitivity

    windows = sample_calibration(cal_ids, cal_text, spec.windows, spec.seq_len, spec.seed).ids
    cls = type(backend)
    auto = method.auto_skip()

    def make(skip: list[str]):
        return cls(backend.config.model_copy(update={"skip": skip}))

    result = run_sensitivity(model, make, windows, base_skip=backend.config.skip_list(),
                             granularity=spec.granularity, kl_budget=spec.kl_budget if auto else None,
                             calibration=calibration, log=_log)
    atomic_write_json(mdir / "sensitivity.json", result.as_dict())
    _plot_sensitivity(result, mdir / "sensitivity.png", method.label)
    if auto:
        backend = make(backend.config.skip_list() + result.skip_patterns())
    return backend, result


def _plot_sensitivity(result, path: Path, label: str) -> None:
    """Bar chart of per-candidate sensitivity (log scale), chosen candidates highlighted.
    Skipped when matplotlib is not installed (the numbers are in the JSON)."""
    from quantlab.report.plots import pyplot

    try:
        plt = pyplot()
    except QuantlabError:
        return
    names = list(result.sensitivity)
    values = [max(result.sensitivity[n], 1e-8) for n in names]
    chosen = set(result.chosen)
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), values, color=["#c0392b" if n in chosen else "#2c7fb8" for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("KL(float || quantized), nats/token")
    ax.set_title(f"{label}: sensitivity per {result.granularity} ({len(chosen)} left in float, red)")
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), [n.replace("model.layers.", "L") for n in names], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("layers in model order")
    if result.kl_budget is not None:
        ax.axhline(result.kl_budget, color="black", lw=0.8, ls="--", label=f"kl_budget {result.kl_budget}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # replaces a link in the run, never writes through it


def _quantize_and_export(i: int, n: int, method, backend, work, spec, cal_ids, cal_text, calibration,
                         tokenizer, source_info: dict, mdir: Path, device: torch.device) -> dict:
    """Sensitivity pass (when asked), quantization and export of one method; returns the
    export record (what a resumed run needs to skip these stages) and the backend used."""
    sens = None
    if spec is not None:
        _log(f"[{i}/{n}] {method.label}: sensitivity pass ({spec.granularity}, "
             f"{spec.windows} x {spec.seq_len} calibration tokens)")
        backend, result = _sensitivity(method, backend, spec, work, cal_ids, cal_text,
                                       calibration.ids if calibration is not None else None, mdir)
        sens = result.as_dict()
    if hasattr(backend, "context"):  # llamacpp: the source's GGUF metadata, calibration as text
        backend.context = {"source_info": source_info, "tokenizer": tokenizer}
    _log(f"[{i}/{n}] {method.label}: quantize ({backend.name})")
    with _Peak(device) as mem:
        t0 = time.perf_counter()
        work = backend.quantize(work, calibration.ids if (calibration and backend.needs_calibration) else None)
        quantize_s = time.perf_counter() - t0
    _log(f"[{i}/{n}] {method.label}: export")
    t0 = time.perf_counter()
    export_checkpoint(work, tokenizer, backend, mdir / "checkpoint", source=source_info, label=method.label)
    export_s = time.perf_counter() - t0
    return {"backend": backend, "options": backend.config.model_dump(mode="json"), "quantize_s": quantize_s,
            "export_s": export_s, "stage_seconds": dict(backend.stage_seconds), "layers": backend.layer_stats,
            "peak_rss_quantize_bytes": mem.rss, "peak_cuda_quantize_bytes": mem.cuda, "sensitivity": sens}


@dataclass
class RunResult:
    path: Path
    results: pd.DataFrame


def _log(msg: str) -> None:
    print(f"quantlab: {msg}", file=sys.stderr, flush=True)


class _Peak:
    """Peak resident memory of the process (and peak CUDA memory) during a block."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        self._rss.__exit__(*exc)
        self.rss = self._rss.peak_bytes
        self.cuda = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return False


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


def check_sources(recipe: Recipe, backends: dict | None = None) -> None:
    """The cheap checks, before anything is loaded (``quantlab validate`` runs them too):
    the backends' libraries are installed, the model source exists, lm-eval tasks are
    known, and local text sources exist and read as text."""
    if backends is None:
        backends = {m.label: get_backend(m.backend)(m.config()) for m in recipe.all_methods()}
    for label, b in backends.items():
        try:
            b.check_dependencies()
        except QuantlabError as e:
            e.args = (f"method '{label}': {e}",)
            raise
    classify(recipe.model.source)
    _check_gguf(recipe, backends)
    if recipe.eval.tasks:
        from quantlab.bench.tasks import check_tasks

        check_tasks(recipe.eval.tasks, recipe.eval.task_paths)
    need_cal = any(b.needs_calibration for b in backends.values()) or any(m.sensitivity_spec() for m in recipe.methods)
    texts = [(recipe.eval, "evaluation")] + ([(recipe.calibration, "calibration")] if need_cal else [])
    for spec, role in texts:
        if spec.source != "wikitext2":  # online: checked when the run loads it
            load_text(spec.source, spec.split, role, spec.text_field)


def _check_gguf(recipe: Recipe, backends: dict) -> None:
    """GGUF exports whose grids GGUF cannot hold, and the llama.cpp engine without its tools:
    errors before anything loads."""
    from quantlab.formats.gguf import check_gguf_options

    for m in recipe.all_methods():
        if "gguf" in m.export:
            b = backends[m.label]
            if b.name != "llamacpp":  # its checkpoint is a GGUF file already
                check_gguf_options(m.label, b.name, b.config.model_dump(mode="json"))
    if "llamacpp" in recipe.eval.engines:
        from quantlab.engines.llamacpp import find_llamacpp

        find_llamacpp()


def _gguf_stage(method, backend, loaded, mdir: Path, out_dir: Path, base_info: dict, ev, key: str) -> dict:
    """The method's GGUF files (when it exports GGUF), written from the checkpoint reloaded
    from disk; returns the columns they add to the row."""
    if "gguf" not in method.export:
        return {}
    from quantlab.engines.phase import GGUF, GGUF_F32, export_method_gguf, main_type
    from quantlab.formats.gguf import template_for

    path = base_info.get("path")
    template = template_for(base_info, Path(path) if path else None)
    baseline = backend.name == "none"
    rec = export_method_gguf(loaded.model, mdir, template, float_type=ev.llamacpp.float_type, baseline=baseline,
                             key=stage_key({"gguf": key, "float_type": ev.llamacpp.float_type}),
                             log=lambda msg: _log(f"{method.label}: {msg}"))
    rel = mdir.relative_to(out_dir)
    return {"gguf_file": str(rel / GGUF), "gguf_f32_file": None if baseline else str(rel / GGUF_F32),
            "gguf_type": main_type(rec["type_counts"]), "gguf_bytes": rec["bytes"],
            "gguf_float_type": "F32" if baseline else ev.llamacpp.float_type}


def _absolute_sources(recipe: Recipe) -> Recipe:
    """The recipe with every path source (model, texts) made absolute: a result is identified
    by what it measured, and a relative path means another thing from another directory."""
    from quantlab.models import DEMO_MODELS

    def absolute(source: str) -> str:
        path = Path(source).expanduser()
        if source in DEMO_MODELS or source in ("pydoc", "wikitext2") or not path.exists():
            return source
        return str(path.resolve())

    model = recipe.model.model_copy(update={"source": absolute(recipe.model.source)})
    cal = recipe.calibration.model_copy(update={"source": absolute(recipe.calibration.source)})
    ev = recipe.eval.model_copy(update={"source": absolute(recipe.eval.source)})
    return recipe.model_copy(update={"model": model, "calibration": cal, "eval": ev})


def _check_lengths(recipe: Recipe, backends: dict, max_pos: int | None) -> None:
    """Every window quantlab will run fits the model's context, each named by the key that
    sets it (checked before any work, so nothing runs past the model's positions)."""
    if not max_pos:
        return
    cal, speed = recipe.calibration, recipe.eval.speed
    if any(b.needs_calibration for b in backends.values()) and cal.seq_len > max_pos:
        raise QuantlabError(f"calibration.seq_len={cal.seq_len} is longer than the model's context ({max_pos} tokens)")
    for i, m in enumerate(recipe.methods):
        spec = m.sensitivity_spec()
        if spec is not None and spec.seq_len > max_pos:
            raise QuantlabError(f"methods[{i}].sensitivity.seq_len={spec.seq_len} ({m.label}) is longer than the "
                                f"model's context ({max_pos} tokens)")
    if speed.enabled and speed.prompt_tokens + speed.new_tokens > max_pos:
        raise QuantlabError(f"eval.speed.prompt_tokens + eval.speed.new_tokens = {speed.prompt_tokens} + "
                            f"{speed.new_tokens} tokens decode past the model's context ({max_pos} tokens); "
                            "lower them")


def _backend_versions(backends: dict) -> dict:
    """Versions of everything that computes a result: torch, transformers, and the libraries
    the backends use (their pip extras' packages, where installed)."""
    env = environment()["packages"]
    keep = ("torch", "transformers", "safetensors", "tokenizers", "accelerate", "numpy")
    return {k: env.get(k) for k in keep} | {f"extra:{b.extra}": _extra_versions(b.extra)
                                            for b in backends.values() if b.extra}


def _extra_versions(extra: str) -> dict:
    import importlib.metadata

    from quantlab.env import extra_packages

    out = {}
    for name in extra_packages(extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _reusable_stage(stage: dict, backend, ckpt: Path, log_prefix: str):
    """The backend rebuilt from an export record, when the record agrees with the
    checkpoint it describes (same options as its sidecar, valid options); else None: the
    stage is done again."""
    cls = type(backend)
    try:
        verify_checkpoint(ckpt)
        if read_sidecar(ckpt).get("options") != stage["options"]:
            raise QuantlabError("its export record and its sidecar disagree on the options")
        again = cls(cls.Config(**stage["options"]))  # the options as resolved then (skip: auto)
        again.layer_stats, again.stage_seconds = dict(stage["layers"]), dict(stage["stage_seconds"])
    except QuantlabError as e:
        _log(f"{log_prefix}: the checkpoint exported earlier cannot be reused ({e}); quantizing again")
        return None
    except (KeyError, TypeError, ValueError) as e:
        _log(f"{log_prefix}: the export record is not readable ({type(e).__name__}); quantizing again")
        return None
    return again


def _measure_with_llamacpp(out_dir: Path, rows: list[dict], eval_text, recipe: Recipe, plan) -> None:
    """The llama.cpp phase over every GGUF row; each row's metrics.json is rewritten with the
    engine's figures (same key: they were measured for the same settings)."""
    import os

    from quantlab.engines.phase import llamacpp_phase

    spec = recipe.eval.llamacpp
    threads = spec.threads or recipe.threads or os.cpu_count() or 1
    convention = (plan.convention, plan.params.get("seq_len"), recipe.eval.max_windows)
    llamacpp_phase(out_dir, rows, eval_text.joined(), spec, threads, convention=convention, log=_log)
    for r in rows:
        label = r["method"]
        write_record(out_dir / label / "metrics.json", r)


def _gguf_files_intact(out_dir: Path, row: dict) -> bool:
    from quantlab.engines.phase import gguf_intact

    return gguf_intact((out_dir / row["gguf_file"]).parent)


def _write_run_files(out_dir: Path, resolved: dict, env: dict, calibration) -> None:
    """recipe.yaml, environment.json and calibration.json: written together with the results
    table, so a run that stops before its first method finishes (a late error, Ctrl-C) leaves
    a finished run's description as it was, consistent with its results."""
    atomic_write_text(out_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_json(out_dir / "environment.json", env)
    if calibration is not None:
        atomic_write_json(out_dir / "calibration.json", calibration.record())


def run_recipe(recipe: Recipe, out: str | Path | None = None, *, force: bool = False,
               echo: bool = True) -> RunResult:
    """Run every method of ``recipe`` into ``out`` (default: the recipe's output.dir)."""
    recipe = _absolute_sources(recipe)
    methods = recipe.all_methods()
    backends = {m.label: get_backend(m.backend)(m.config()) for m in methods}
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)

    check_sources(recipe, backends)
    quiet_progress_bars()
    ev = recipe.eval
    eval_text = load_text(ev.source, ev.split, "evaluation", ev.text_field)
    cal = recipe.calibration
    sens_specs = {m.label: m.sensitivity_spec() for m in methods}
    need_cal = any(b.needs_calibration for b in backends.values()) or any(sens_specs.values())
    cal_text = load_text(cal.source, cal.split, "calibration", cal.text_field) if need_cal else None
    out_dir = prepare_run_dir(Path(out) if out else recipe.output_dir(), kind="run")
    _refuse_foreign_run(out_dir, recipe, force)
    for label in backends:  # a method directory of the wrong kind or a link: refused before any work
        owned_path(out_dir, label, directory=True, what=f"method directory of '{label}'", create=False)

    with RunLock(out_dir), storage_errors(out_dir):
        _log(f"loading model '{recipe.model.source}' ({str(dtype).removeprefix('torch.')} on {device})")
        if recipe.model.trust_remote_code:
            _log("trust_remote_code is ON (recipe model.trust_remote_code): code from the model "
                 "repository may run in this process; the report says so")
        t0 = time.perf_counter()
        base = load_model(recipe.model.source, dtype=dtype, device=device, revision=recipe.model.revision,
                          trust_remote_code=recipe.model.trust_remote_code)
        base_load_s = time.perf_counter() - t0
        qc = getattr(base.model.config, "quantization_config", None)
        if qc:
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
            raise QuantlabError(f"model '{recipe.model.source}' is already quantized (quant_method "
                                f"'{method}'); quantlab quantizes float models: give the unquantized one "
                                "(score this one with `quantlab eval`)")
        _check_lengths(recipe, backends, model_context(base.model))
        settings = EvalSettings(convention=ev.convention, seq_len=ev.seq_len, stride=ev.stride, bos=ev.bos,
                                max_windows=ev.max_windows, batch_size=ev.batch_size)
        plan = build_plan(settings, eval_text, base.tokenizer, base.model)
        for label, b in backends.items():
            try:
                b.check(base.model)
            except QuantlabError as e:  # same class, the method named
                e.args = (f"method '{label}' ({b.name}): {e}",)
                raise

        # the speed prompt: the first tokens of the evaluation text (the plan holds its own ids)
        prompt = tokenize(eval_text, base.tokenizer)[: ev.speed.prompt_tokens] if ev.speed.enabled else None
        calibration = None
        cal_ids = None
        if need_cal:
            cal_ids = tokenize(cal_text, base.tokenizer)
            if any(b.needs_calibration for b in backends.values()):
                calibration = sample_calibration(cal_ids, cal_text, cal.samples, cal.seq_len, cal.seed)

        env = environment(device, dtype)
        if ev.speed.enabled:
            env["memory_bandwidth_bytes_per_s"] = memory_bandwidth(device)
        resolved = recipe_to_dict(recipe)

        # what determines every method's results; the calibration set joins the keys of only
        # the methods that use it, so adding a GPTQ method does not invalidate finished RTN rows
        shared = {k: v for k, v in resolved.items()
                  if k not in ("methods", "output", "name", "description", "calibration")}
        # the code and library versions that compute results, the model by content, where it ran
        shared.update(quantlab=__version__, code=code_digest(), versions=_backend_versions(backends),
                      runtime={"device": str(device), "dtype": str(dtype)}, eval_sha256=eval_text.sha256,
                      model_info={k: v for k, v in base.info.items() if k != "path"},
                      task_files={p: content_digest(Path(p)) for p in ev.task_paths if Path(p).is_dir()})
        # what determines a checkpoint (not the evaluation settings: changing those re-scores the
        # checkpoints already exported instead of quantizing again)
        export_shared = {"model": resolved["model"], "model_info": shared["model_info"], "quantlab": __version__,
                         "code": shared["code"], "versions": shared["versions"], "runtime": shared["runtime"]}
        export_cal = {"calibration": resolved["calibration"], "calibration_text_sha256": cal_text.sha256 if cal_text else None}
        source_info = dict(base.info, dtype=str(dtype).removeprefix("torch."))
        eval_labels = labels(plan, eval_text, base.tokenizer, base.model)
        reference = None
        if ev.divergence.enabled:
            part = plan.head(ev.divergence.max_windows)
            ref_key = plan_key(part, eval_text, {"model": shared["model_info"], "runtime": shared["runtime"],
                                                 "code": shared["code"], "versions": shared["versions"]})
            _log(f"base model distributions on {part.scored_tokens} tokens ({len(part.segments)} windows) "
                 "for divergence")
            ref_dir = owned_path(out_dir, "reference", directory=True, what="divergence reference")
            reference = compute_reference(base.model, part, ref_dir, ev.batch_size, ref_key)
            shared["reference_key"] = ref_key
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
        session = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        rows: list[dict] = []
        for i, method in enumerate(methods, 1):
            backend = backends[method.label]
            uses_cal = backend.needs_calibration or sens_specs[method.label] is not None
            method_cal = (dict(export_cal, calibration_sha256=calibration.sha256 if backend.needs_calibration else None)
                          if uses_cal else None)
            # the options as resolved (every default filled in): a changed default is a changed key
            what = {"calibration": method_cal, "backend_version": backend.Config.version,
                    "method": dict(method.model_dump(mode="json"), options=backend.config.model_dump(mode="json"))}
            key = stage_key({"shared": shared, **what})
            mdir = owned_path(out_dir, method.label, directory=True, what=f"method directory of '{method.label}'")
            done = None if force else finished_metrics(mdir, key)
            if done is not None and done.get("gguf_file") and not _gguf_files_intact(out_dir, done):
                done = None
            if done is not None:
                _log(f"[{i}/{len(methods)}] {method.label}: finished earlier with the same settings; reusing it")
                rows.append(done)
                continue
            export_key = stage_key({"export": export_shared, **what})
            ckpt = owned_path(mdir, "checkpoint", directory=True, what="checkpoint directory", create=False)
            stage = None if force else finished_stage(mdir, export_key)
            reused = _reusable_stage(stage, backend, ckpt, f"[{i}/{len(methods)}] {method.label}") if stage else None
            if reused:
                _log(f"[{i}/{len(methods)}] {method.label}: quantized and exported earlier with the same "
                     "settings; reusing the checkpoint")
                backend = reused
            else:
                stage = _quantize_and_export(i, len(methods), method, backend, take_base_model(), sens_specs[method.label],
                                             cal_ids, cal_text, calibration, base.tokenizer, source_info, mdir, device)
                backend = stage.pop("backend")
                write_record(mdir / EXPORT_RECORD, dict(stage, key=export_key))
            quantize_s, export_s = stage["quantize_s"], stage["export_s"]
            sens = stage["sensitivity"]
            gc.collect()

            _log(f"[{i}/{len(methods)}] {method.label}: reload from disk and score")
            # a reused checkpoint was verified above; a fresh one was just hashed for its manifest
            with _Peak(device) as mem_load:
                t0 = time.perf_counter()
                loaded = load_checkpoint(ckpt, dtype=dtype, device=device, verify=False)
                load_s = time.perf_counter() - t0
            with _Peak(device) as mem_eval:
                ppl, div = evaluate(loaded.model, plan, ev.batch_size, reference)
            div = div or {}
            sizes = checkpoint_tensor_bytes(ckpt, loaded.model)
            qmodules = read_sidecar(ckpt).get("modules", [])
            speed, bound = {}, {}
            if ev.speed.enabled:
                speed = measure_speed(loaded.model, prompt, new_tokens=ev.speed.new_tokens,
                                      batch_sizes=(1, ev.speed.batch_size), warmup=ev.speed.warmup,
                                      repeats=ev.speed.repeats)
                stored = {n: checkpoint_quantized_bytes(sizes, [n]) + sizes.get(f"{n}.bias", 0) for n in qmodules
                          if getattr(loaded.model.get_submodule(n), "kernel", None) != "dense-dequant"}
                bound = decode_bound(loaded.model, env["memory_bandwidth_bytes_per_s"], stored=stored)
            batch_speed = speed.get("by_batch", {}).get(f"b{ev.speed.batch_size}", {}) if ev.speed.batch_size > 1 else {}
            tasks = {}
            if ev.tasks:
                from quantlab.bench.tasks import run_tasks

                _log(f"[{i}/{len(methods)}] {method.label}: lm-eval tasks {', '.join(ev.tasks)}")
                tasks = run_tasks(loaded.model, loaded.tokenizer, ev.tasks, ev.task_paths, limit=ev.task_limit,
                                  num_fewshot=ev.task_fewshot, batch_size=ev.batch_size)
            # keyed like the checkpoint it is written from: new eval settings do not rewrite it
            gguf_cols = _gguf_stage(method, backend, loaded, mdir, out_dir, base.info, ev, export_key)
            fields = backend.config.table_fields()
            kernels = sorted({_kernel_label(loaded.model.get_submodule(n)) for n in qmodules})
            metrics = {
                "method": method.label,
                "model": recipe.model.source,
                "backend": backend.name,
                "bits": fields.get("bits", _dtype_bits(dtype)),
                "group_size": fields.get("group_size"),
                "ppl": ppl.ppl,
                "ppl_stderr": ppl.ppl_stderr,
                "ppl_convention": ppl.convention,
                "eval_source": eval_text.name,
                "eval_sha256": eval_text.sha256,
                "eval_seq_len": ppl.seq_len,
                "eval_windows": ppl.windows,
                "eval_tokens": ppl.scored_tokens,
                "tokenizer": base.tokenizer.__class__.__name__,
                "kld_mean": div.get("kld_mean"),
                "kld_p99": div.get("kld_p99"),
                "top1_agreement": div.get("top1_agreement"),
                "dp_rms": div.get("dp_rms"),
                "kld_tokens": div.get("kld_tokens"),
                "size_bytes": weight_bytes(ckpt),
                "checkpoint_bytes": directory_bytes(ckpt),
                "quantized_tensor_bytes": checkpoint_quantized_bytes(sizes, qmodules),
                "bits_per_weight": checkpoint_bits_per_weight(loaded.model, sizes),
                "prefill_tokens_per_s": speed.get("prefill_tokens_per_s"),
                "ttft_ms": speed.get("ttft_ms"),
                "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
                "decode_tokens_per_s_min": speed.get("decode_tokens_per_s_min"),
                "decode_tokens_per_s_max": speed.get("decode_tokens_per_s_max"),
                "latency_p50_ms": speed.get("latency_p50_ms"),
                "latency_p95_ms": speed.get("latency_p95_ms"),
                "decode_bound_tokens_per_s": bound.get("decode_bound_tokens_per_s"),
                "decode_fraction_of_bound": (speed["decode_tokens_per_s"] / bound["decode_bound_tokens_per_s"]
                                             if speed else None),
                "decode_batch_size": batch_speed.get("batch_size"),
                "decode_tokens_per_s_batch": batch_speed.get("decode_tokens_per_s"),
                "peak_rss_quantize_bytes": stage["peak_rss_quantize_bytes"],
                "peak_rss_load_bytes": mem_load.rss,
                "peak_rss_eval_bytes": mem_eval.rss,
                "peak_cuda_quantize_bytes": stage["peak_cuda_quantize_bytes"],
                "peak_cuda_eval_bytes": mem_eval.cuda,
                "quantize_s": quantize_s,
                "export_s": export_s,
                "load_s": load_s,
                "eval_s": ppl.seconds,
                "eval_tokens_per_s": ppl.tokens_per_s,
                "dtype": str(dtype).removeprefix("torch."),
                "device": str(device),
                "threads": torch.get_num_threads(),
                "kernel": ",".join(kernels) or "dense",
                "checkpoint": str(ckpt.relative_to(out_dir)),
                "options": backend.config.model_dump(mode="json"),
                "eval_labels": eval_labels,
                "perplexity": ppl.as_dict(),
                "divergence": div,
                "speed": speed,
                "decode_bound": bound,
                "tasks": tasks,
                "layers": backend.layer_stats,
                "skipped_layers": len(sens["chosen"]) if sens else None,
                "sensitivity_s": sens["seconds"] if sens else None,
                "sensitivity": sens,
                # named stages of quantization; "other" is the rest (forward passes, packing...)
                "quantize_stages": dict(backend.stage_seconds,
                                        other=quantize_s - sum(backend.stage_seconds.values())),
                "base_load_s": base_load_s,
                # when this row was measured, and by which run (a resumed run reuses older rows)
                "measured_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "session": session,
                "key": key,
                "source_gguf": base.info.get("gguf"),  # a quantized source's history (report caveat)
                **gguf_cols,
            }
            for task, values in tasks.items():
                for metric, value in values.items():
                    metrics[f"task_{task}_{metric}"] = value
            write_record(mdir / "metrics.json", metrics)
            rows.append(metrics)
            _write_run_files(out_dir, resolved, env, calibration)
            _write_results(out_dir, results_frame(rows))
            del loaded
            gc.collect()
            kl = f", KL {div['kld_mean']:.4f}" if div else ""
            _log(f"[{i}/{len(methods)}] {method.label}: ppl {ppl.ppl:.3f} ({ppl.convention}, "
                 f"{ppl.scored_tokens} tokens of {eval_text.name}){kl}")

        if "llamacpp" in ev.engines:
            _measure_with_llamacpp(out_dir, rows, eval_text, recipe, plan)
        frame = results_frame(rows)
        _write_run_files(out_dir, resolved, env, calibration)
        _write_results(out_dir, frame)
        report = None
        if recipe.output.report:
            from quantlab.report.html import write_report

            _log("writing report.html and plots")
            try:
                report = write_report(out_dir)
            except QuantlabError as e:  # e.g. matplotlib missing: the results are already on disk
                _log(f"no report: {e}")
        if echo:
            print(format_summary(frame, env))
            print(f"\nrun directory: {out_dir}  (results.csv/.parquet/.md, per-method metrics.json and checkpoints)")
            if report:
                print(f"report: {report}")
        return RunResult(out_dir, frame)


def _write_results(out_dir: Path, frame: pd.DataFrame) -> None:
    """results.csv (and results.parquet where pyarrow is installed), rewritten after every
    method so a crash keeps what finished."""
    from quantlab.report.tables import write_parquet

    atomic_write_text(out_dir / "results.csv", frame.to_csv(index=False))
    write_parquet(frame, out_dir / "results.parquet")
