"""The public Python API (re-exported by ``quantlab``). Heavy modules load on first use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantlab.direct import config, quantize, save
from quantlab.errors import QuantlabError
from quantlab.formats.kernels import DEFAULT_KERNEL
from quantlab.recipe import load_recipe, parse_recipe

__all__ = [
    "backends",
    "caveats",
    "config",
    "evaluate",
    "load",
    "load_checkpoint",
    "load_metrics",
    "load_model",
    "load_recipe",
    "load_results",
    "parse_recipe",
    "quantize",
    "run_recipe",
    "save",
    "summary_table",
    "write_report",
]


def run_recipe(recipe, out: str | Path | None = None, *, force: bool = False, echo: bool = True):
    """Run a :class:`~quantlab.recipe.Recipe` (or a path to a YAML recipe); returns a
    ``RunResult`` with ``path`` and ``results`` (a DataFrame). The report is written as the
    recipe says (``output.report``); ``echo`` prints the terminal summary."""
    from quantlab import arguments
    from quantlab.pipeline import run_recipe as _run
    from quantlab.recipe import Recipe
    from quantlab.report.publish import on_results, publish

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    if not isinstance(recipe, Recipe):
        raise QuantlabError(
            f"recipe must be a Recipe (quantlab.load_recipe / parse_recipe) or the "
            f"path of a YAML recipe, not {type(recipe).__name__}"
        )
    out = None if out is None else arguments.path("out", out)
    force, echo = arguments.flag("force", force), arguments.flag("echo", echo)
    result = _run(recipe, out, force=force, on_results=on_results(recipe))
    publish(recipe, result, echo=echo)
    return result


def load_results(paths: str | Path | list[str | Path]):
    """The results of one or more run directories (or results.csv files) as one DataFrame,
    one row per method, every column of ``results.csv``; a ``run`` column names the
    directory. A path that is not a readable run raises :class:`QuantlabError` saying why."""
    from quantlab.report.data import combined_frame, load_runs

    return combined_frame(load_runs(paths))


def load_metrics(run_dir: str | Path) -> dict[str, dict]:
    """Every method's ``metrics.json`` of a run directory (method label -> dict): raw speed
    samples, per-layer statistics, options, stage times..."""
    from quantlab.report.data import load_run

    return load_run(run_dir).metrics


def caveats(paths: str | Path | list[str | Path]) -> list[str]:
    """The warnings the report and ``quantlab compare`` print for these runs (rows or runs
    that differ in text, convention, context, tokens, dtype or device; speed from another
    session; quick-preset runs; engines that disagree...), one string each."""
    from quantlab.report.caveats import report_warnings
    from quantlab.report.data import combined_frame, load_runs

    runs = load_runs(paths)
    return report_warnings(runs, combined_frame(runs))


def write_report(
    paths: str | Path | list[str | Path], out: str | Path | None = None, *, title: str | None = None
) -> Path:
    """Write ``report.html`` (+ results.md, plots/) for a run directory (into it by default)
    or for several runs into ``out``; returns the report's path."""
    from quantlab.report.html import write_report as _write

    return _write(paths, out, title=title)


def summary_table(frame):
    """The readable table of :func:`load_results`' frame: baseline first, deltas against
    each run's baseline, units in the column names (strings, ready to print)."""
    import pandas as pd

    from quantlab.report.tables import summary_frame

    table = isinstance(frame, pd.DataFrame)
    missing = [c for c in ("method", "backend", "ppl") if not table or c not in frame]
    if missing:
        raise QuantlabError(
            "summary_table takes the DataFrame quantlab.load_results returns "
            f"(columns method, backend, ppl...), not {type(frame).__name__}"
            + (f" without {', '.join(missing)}" if table else "")
        )
    return summary_frame(frame)


def load_model(source: str, *, dtype: str = "auto", device: str = "auto", **kwargs: Any):
    """Load a model source (demo alias, Hub id, directory, .gguf, quantlab checkpoint);
    returns a ``LoadedModel`` with ``model``, ``tokenizer`` and ``info``."""
    from quantlab import arguments
    from quantlab.models import load_model as _load
    from quantlab.models import quiet_progress_bars, resolve_device, resolve_dtype

    arguments.known_keywords(_load, kwargs, "load_model")
    source = str(arguments.path("source", source))
    dtype, device = arguments.dtype(dtype), arguments.text("device", device)
    quiet_progress_bars()
    dev = resolve_device(device)
    return _load(source, dtype=resolve_dtype(dtype, dev), device=dev, **kwargs)


def load_checkpoint(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    verify: bool = True,
    kernel: str = DEFAULT_KERNEL,
):
    """Reload a checkpoint quantlab exported; ``verify`` checks every file against the
    sha256 manifest in its quantlab.json first; ``kernel`` (auto, dense, int4pack, int8pack)
    chooses what executes its packed layers (``info["kernels"]`` records the choice)."""
    from quantlab import arguments
    from quantlab.checkpoint import load_checkpoint as _load
    from quantlab.models import quiet_progress_bars, resolve_device, resolve_dtype

    path = arguments.path("path", path)
    dtype, device = arguments.dtype(dtype), arguments.text("device", device)
    verify, kernel = arguments.flag("verify", verify), arguments.text("kernel", kernel)
    quiet_progress_bars()
    dev = resolve_device(device)
    return _load(path, dtype=resolve_dtype(dtype, dev), device=dev, verify=verify, kernel=kernel)


# : ``quantlab.load(path)``: the counterpart of :func:`quantlab.save` (GPTQModel's and torchao's
# name)
load = load_checkpoint


def evaluate(model: str | Path, **options: Any) -> dict:
    """Score a model source or exported checkpoint without quantizing anything, as
    ``quantlab eval`` does: ``evaluate("smollm2-135m", data="pydoc", convention="llamacpp",
    seq_len=512, max_windows=20, base=None, speed=False)``. Returns the JSON object the
    command prints (``ppl``, ``ppl_stderr``, ``scored_tokens``, labels, divergence with
    ``base``)."""
    from quantlab import arguments
    from quantlab.evalcmd import evaluate_source

    model = str(arguments.path("model", model))
    _check_evaluate(options)
    return evaluate_source(model, **options)


#: evaluate's options by kind (the rest are checked where they are read: convention, kernel...)
_EVAL_COUNTS = ("seq_len", "stride", "max_windows", "max_docs", "kl_windows")
_EVAL_FLAGS = ("speed", "trust_remote_code", "verify", "cache_base")
_EVAL_TEXTS = ("data", "text_field", "convention", "device", "kernel")


def _check_evaluate(options: dict[str, Any]) -> None:
    """evaluate's options: known names, types and ranges, and only options that apply to the
    others: the scoring options by their one rule (quantlab.evalspec), the rest by the rule
    ``quantlab eval`` applies to its flags (evalcmd.check_command_flags)."""
    from types import SimpleNamespace

    from quantlab import arguments
    from quantlab.evalcmd import check_command_flags, evaluate_source
    from quantlab.evalspec import ScoringSpec

    arguments.known_keywords(evaluate_source, options, "evaluate")
    given = dict(_defaults(evaluate_source), **options)
    for name in _EVAL_COUNTS:
        arguments.count(name, given[name], optional=True)
    arguments.count("batch_size", given["batch_size"])
    for name in _EVAL_FLAGS:
        arguments.flag(name, given[name])
    for name in _EVAL_TEXTS:
        arguments.text(name, given[name])
    for name in ("split", "base"):
        arguments.text(name, given[name], optional=True)
    arguments.dtype(given["dtype"])
    arguments.choice("speed_mode", given["speed_mode"], ("eager", "compiled"))
    if given["bos"] is not None:
        arguments.flag("bos", given["bos"])
    args = SimpleNamespace(
        **dict(
            given,
            bos={None: "auto", True: "yes", False: "no"}[given["bos"]],
            no_cache_base=not given["cache_base"],
        )
    )
    ScoringSpec.checked("api", **{k: given[k] for k in ScoringSpec.model_fields})
    try:
        check_command_flags(args)
    except QuantlabError as e:  # the command's flags, said as this function's arguments
        raise QuantlabError(_as_arguments(str(e))) from None


def _defaults(func) -> dict[str, Any]:
    import inspect

    return {
        k: p.default
        for k, p in inspect.signature(func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _as_arguments(message: str) -> str:
    """A message of ``quantlab eval`` with its flags as :func:`evaluate`'s arguments."""
    import re

    message = message.replace("--no-cache-base", "cache_base=False")
    message = message.replace("--base MODEL", "base=MODEL")
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


def backends() -> list[dict[str, Any]]:
    """Name, description, calibration need and option schema of every registered backend."""
    from quantlab.registry import backend_names, get_backend

    out = []
    for name in backend_names():
        cls = get_backend(name)
        out.append(
            dict(
                {
                    "name": name,
                    "description": cls.description,
                    # a property where the options decide (llamacpp: imatrix)
                    "needs_calibration": cls.needs_calibration
                    if isinstance(cls.needs_calibration, bool)
                    else "with some options",
                    "extra": cls.extra,
                    "options": {
                        k: {
                            "default": f.default
                            if f.default_factory is None
                            else f.default_factory(),
                            "description": f.description or "",
                        }
                        for k, f in cls.Config.model_fields.items()
                    },
                },
                usable=_usable(cls),
            )
        )
    return out


def _usable(cls) -> bool | str:
    """True when the backend's library is installed (with its default options), else why not."""
    from quantlab.errors import QuantlabError

    try:
        cls().check_dependencies()
    except QuantlabError as e:
        return str(e)
    return True
