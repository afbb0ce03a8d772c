"""One run: prepare the plan, run every method (quantize, export, RELOAD the checkpoint from
disk, score the reloaded model), collect the rows, write the results files, return the rows.

The run draws and prints nothing: the report, the plots and the terminal summary are the
caller's (:mod:`quantlab.report.publish`, used by the command line and the Python API), made
from what the run wrote. ``on_results`` lets the caller add its own files (results.md) each
time the results are rewritten.

The pieces: :mod:`quantlab.plan` (what the methods share, written to the run directory),
:mod:`quantlab.runner` (one method), :mod:`quantlab.executors` (local or Ray),
:mod:`quantlab.results` (the row schema), :mod:`quantlab.rundir` (the run directory's paths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from quantlab.data import load_spec_text
from quantlab.errors import QuantlabError
from quantlab.executors import check_executor, execute
from quantlab.layout import RESULTS_CSV, RESULTS_PARQUET
from quantlab.models import classify, quiet_progress_bars
from quantlab.plan import RunPlan, needs_calibration, prepare, setup
from quantlab.recipe import Recipe, recipe_to_dict
from quantlab.records import atomic_write_text, storage_errors, write_record
from quantlab.registry import get_backend
from quantlab.results import MethodResult, results_frame, write_parquet
from quantlab.rundir import RunLock
from quantlab.runner import log as _log
from quantlab.speedphase import speed_phase


@dataclass
class RunResult:
    """What a run returns: its directory and its rows. With several models (``runs``: one
    directory per model), ``results`` holds every model's rows with a ``run`` column and a
    ``model_label`` column, and ``table`` the method x model perplexities."""

    path: Path
    results: pd.DataFrame
    runs: list[Path] = field(default_factory=list)
    table: pd.DataFrame | None = None


#: called with the run directory each time results.csv/.parquet are rewritten
OnResults = Callable[[Path], None]


def run_recipe(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    force: bool = False,
    on_results: OnResults | None = None,
) -> RunResult:
    """Run every method of ``recipe`` into ``out`` (default: the recipe's output.dir) with the
    executor the recipe names (``executor.kind``); with several models, see :func:`run_models`."""
    if recipe.models:
        return run_models(recipe, out, force=force, on_results=on_results)
    s = setup(_absolute_sources(recipe), out, force, check_before_work)
    quiet_progress_bars()
    with RunLock(s.run_dir.root), storage_errors(s.run_dir.root):
        plan, base = prepare(s, force, _log)
        collected = _Collector(plan, on_results)
        execute(plan, base, collected.add)  # the executor owns the base model from here on
        frame = _finish(plan, collected.rows(), s.eval_text, on_results)
    return RunResult(plan.run_dir.root, frame)


def run_models(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    force: bool = False,
    on_results: OnResults | None = None,
) -> RunResult:
    """A recipe with ``models``: one run per model in ``OUT/LABEL`` (each method compared with
    that model's own baseline) and the method x model table ``OUT/methods_x_models.csv``."""
    from quantlab.rundir import CONTAINER, prepare_run_dir

    root = prepare_run_dir(Path(out) if out else recipe.output_dir(), kind=CONTAINER)
    subs = recipe.per_model()
    done = []
    for i, (label, sub) in enumerate(subs, 1):
        _log(f"model {i}/{len(subs)}: {sub.model.source} -> {root / label}")
        done.append(run_recipe(sub, root / label, force=force, on_results=on_results))
    frame = pd.concat(
        [r.results.assign(run=str(r.path), model_label=r.path.name) for r in done],
        ignore_index=True,
    )
    table = methods_by_models(frame)
    atomic_write_text(root / "methods_x_models.csv", table.to_csv())
    return RunResult(root, frame, runs=[r.path for r in done], table=table)


def methods_by_models(frame: pd.DataFrame) -> pd.DataFrame:
    """Perplexity per method (rows) and model (columns), each with its change against that
    model's own baseline: ``14.86 (+0.0%)``."""
    cells = {}
    for model, part in frame.groupby("model_label", sort=False):
        base = part.loc[part["backend"] == "none", "ppl"]
        ref = float(base.iloc[0]) if len(base) else None
        cells[model] = {
            r["method"]: (
                f"{r['ppl']:.3f}" + (f" ({100 * (r['ppl'] / ref - 1):+.1f}%)" if ref else "")
            )
            if pd.notna(r["ppl"])
            else f"error: {r.get('error')}"
            for _, r in part.iterrows()
        }
    table = pd.DataFrame(cells).fillna("")
    # what the numbers are, in the table itself (its CSV too)
    label = lambda col: ", ".join(sorted(frame[col].dropna().astype(str).unique()))  # noqa: E731
    table.index.name = (
        f"perplexity ({label('ppl_convention')} convention, {label('eval_source')}, "
        f"{label('eval_tokens')} scored tokens; Δ% vs each model's own baseline)"
    )
    return table


class _Collector:
    """Rows as methods finish, in the recipe's order; the results table (csv, parquet, and
    md when the recipe writes a report) is rewritten after each, so a crash or Ctrl-C keeps
    what finished, on either executor, and the three files always agree."""

    def __init__(self, plan: RunPlan, on_results: OnResults | None):
        self.plan = plan
        self.on_results = on_results
        self.order = [m.label for m in plan.recipe.all_methods()]
        self.backends = {m.label: m.backend for m in plan.recipe.all_methods()}
        self.by_label: dict[str, dict] = {}

    def add(self, result: MethodResult) -> None:
        self.by_label[result.label] = result.as_row(self.backends[result.label])
        _write_run_files(self.plan)
        plan = self.plan
        _write_results(plan.run_dir.root, results_frame(self.rows()), self.on_results)

    def rows(self) -> list[dict]:
        return [self.by_label[label] for label in self.order if label in self.by_label]


def _finish(
    plan: RunPlan, rows: list[dict], eval_text, on_results: OnResults | None
) -> pd.DataFrame:
    """The speed phase, the llama.cpp and vLLM phases and the serving benchmark (when asked)
    and the final results files."""
    ok = [r for r in rows if not r.get("error")]
    speed_phase(plan, ok, _log)
    if "llamacpp" in plan.recipe.eval.engines and ok:
        _measure_with_llamacpp(plan, ok, eval_text)
    if "vllm" in plan.recipe.eval.engines and ok:
        from quantlab.engines.vllm_phase import vllm_phase

        vllm_phase(plan, ok, _log)
        for r in ok:
            write_record(plan.run_dir.metrics(r["method"]), r)
    if plan.recipe.eval.serving is not None and ok:
        from quantlab.engines.serving_phase import serving_phase

        serving_phase(plan, ok, _log, lambda r: write_record(plan.run_dir.metrics(r["method"]), r))
    frame = results_frame(rows)
    _write_run_files(plan)
    _write_results(plan.run_dir.root, frame, on_results)
    return frame


def check_before_work(recipe: Recipe, backends: dict, device) -> None:
    """What `quantlab run` checks before it loads the model (and before it creates or
    touches the run directory): :func:`check_sources`, then the executor (Ray installed,
    its cluster answering, every method's resources on one of its nodes)."""
    check_sources(recipe, backends)
    check_executor(recipe, device)


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
    _check_architecture(recipe, backends)
    _check_gguf(recipe, backends)
    if recipe.eval.tasks:
        from quantlab.bench.tasks import check_tasks

        check_tasks(recipe.eval.tasks, recipe.eval.task_paths)
    need_cal = needs_calibration(recipe, backends)
    texts = [(recipe.eval, "evaluation")] + (
        [(recipe.calibration, "calibration")] if need_cal else []
    )
    for spec, role in texts:
        if spec.source != "wikitext2":  # online: checked when the run loads it
            load_spec_text(spec, role)


def _check_architecture(recipe: Recipe, backends: dict) -> None:
    """Every method's check against the model's architecture, built on the meta device from
    its config.json (no weights read): a group size that does not divide a layer's width, a
    layer the layout cannot hold, a window longer than the context are errors before work."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlab.bench.perplexity import model_context
    from quantlab.models import check_no_remote_code, local_model_dir
    from quantlab.plan import check_lengths, check_methods

    where = local_model_dir(recipe.model.source)
    if where is None or recipe.model.trust_remote_code:  # validating never runs a model's own code
        return
    check_no_remote_code(where, recipe.model.source, trust_remote_code=False)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture this transformers does not know: the run says so
        _log(
            f"cannot build '{recipe.model.source}' from its config to check the methods "
            f"({type(e).__name__})"
        )
        return
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    check_lengths(recipe, backends, model_context(model))
    check_methods(backends, model)


def _check_gguf(recipe: Recipe, backends: dict) -> None:
    """GGUF exports whose grids GGUF cannot hold, and the llama.cpp or vLLM engine (or the
    serving benchmark) without its tools: errors before anything loads."""
    from quantlab.formats.gguf import check_gguf_grid

    for m in recipe.all_methods():
        b = backends[m.label]
        if "gguf" not in m.export or b.gguf_checkpoint or not b.quantizes:
            continue  # a GGUF checkpoint is exported as it is; a float model exports as float
        grid = b.grid()
        if grid is None:
            raise QuantlabError(
                f"method '{m.label}': backend '{b.name}' cannot export GGUF (its "
                "layers are not on a grid GGUF blocks hold: rtn, gptq, awq and hqq's "
                "are; llama.cpp's own types: backend llamacpp)"
            )
        check_gguf_grid(m.label, grid)
    if "llamacpp" in recipe.eval.engines:
        from quantlab.engines.llamacpp import find_llamacpp

        find_llamacpp()
    if "vllm" in recipe.eval.engines or recipe.eval.serving is not None:
        from quantlab.engines.vllm import find_vllm

        find_vllm()  # the serving benchmark's load generator runs there for every engine
    if "llamacpp" in recipe.eval.serving_engines():
        from quantlab.engines.llamacpp import find_llamacpp

        find_llamacpp().server()
    methods = recipe.all_methods()
    if any("gguf" in m.export or backends[m.label].gguf_checkpoint for m in methods):
        _check_gguf_metadata(recipe.model.source)


def _check_gguf_metadata(source: str) -> None:
    """A method that writes GGUF takes the file's metadata and tokenizer from a GGUF file of
    the source: a GGUF source's (or the demo model's) own, else the file llama.cpp's
    converter writes from the model directory (cached by content). Before anything loads:
    without the converter, and without that file in the cache, the error says how to get
    llama.cpp. (A Hub model's cache key, its commit, is known only once it is loaded: there
    the converter is required.)"""
    from quantlab.engines.llamacpp import find_llamacpp
    from quantlab.formats.gguf import template_for
    from quantlab.models import classify, content_digest

    kind, where = classify(source)
    if kind in ("demo", "gguf"):
        return
    try:
        tools = find_llamacpp()
    except QuantlabError:
        if kind == "hub":
            raise
        tools = None
    if tools is not None and tools.converter is not None:
        return  # the run writes the file when a method first needs it
    if kind == "hub":
        raise QuantlabError(
            f"GGUF export of '{source}' needs llama.cpp's converter "
            f"(convert_hf_to_gguf.py), which is not next to '{tools.bin_dir}'; "
            "rebuild with `bash scripts/llamacpp.sh`"
        )
    # no converter: fine only when the file is cached; else template_for says what is missing
    template_for({"content_sha256": content_digest(Path(where))}, Path(where), tools)


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


def _measure_with_llamacpp(plan: RunPlan, rows: list[dict], eval_text) -> None:
    """The llama.cpp phase over every GGUF row; each row's metrics.json is rewritten with the
    engine's figures (same key: they were measured for the same settings)."""
    import os

    from quantlab.engines.phase import llamacpp_phase

    recipe, out_dir = plan.recipe, plan.run_dir.root
    spec = recipe.eval.llamacpp
    threads = spec.threads or recipe.threads or os.cpu_count() or 1
    convention = (
        plan.eval_plan.convention,
        plan.eval_plan.params.get("seq_len"),
        recipe.eval.max_windows,
    )
    llamacpp_phase(
        out_dir, rows, eval_text.joined(), spec, threads, convention=convention, log=_log
    )
    for r in rows:
        write_record(plan.run_dir.metrics(r["method"]), r)


def _write_run_files(plan: RunPlan) -> None:
    calibration = plan.calibration.record() if plan.calibration is not None else None
    plan.run_dir.write_run_files(recipe_to_dict(plan.recipe), plan.env, calibration)


def _write_results(out_dir: Path, frame: pd.DataFrame, on_results: OnResults | None) -> None:
    """results.csv (and results.parquet where pyarrow is installed), rewritten after every
    method so a crash keeps what finished; then the caller's ``on_results`` (results.md)."""
    atomic_write_text(out_dir / RESULTS_CSV, frame.to_csv(index=False))
    write_parquet(frame, out_dir / RESULTS_PARQUET)
    if on_results is not None:
        on_results(out_dir)
