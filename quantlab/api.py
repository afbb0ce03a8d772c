"""The public Python API (re-exported by ``quantlab``). Heavy modules load on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError
from quantlab.recipe import load_recipe, parse_recipe

__all__ = ["backends", "evaluate", "load_checkpoint", "load_model", "load_recipe", "load_results",
           "parse_recipe", "run_recipe"]


def run_recipe(recipe, out: str | Path | None = None, *, force: bool = False, echo: bool = True):
    """Run a :class:`~quantlab.recipe.Recipe` (or a path to a YAML recipe); returns a
    ``RunResult`` with ``path`` and ``results`` (a DataFrame)."""
    from quantlab.pipeline import run_recipe as _run

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    return _run(recipe, out, force=force, echo=echo)


def load_results(paths: str | Path | list[str | Path]):
    """Concatenate the ``results.csv`` of one or more run directories into a DataFrame
    (a ``run`` column names the directory)."""
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for p in paths:
        csv = Path(p) / "results.csv" if Path(p).is_dir() else Path(p)
        if not csv.is_file():
            raise QuantlabError(f"'{p}' holds no results.csv; is it a quantlab run directory?")
        try:
            frame = pd.read_csv(csv)
        except Exception as e:
            raise QuantlabError(f"'{csv}' cannot be read as a results table: {e}") from None
        if "method" not in frame.columns or "ppl" not in frame.columns:
            raise QuantlabError(f"'{csv}' is not a quantlab results table (no method/ppl columns)")
        frames.append(frame.assign(run=str(Path(p))))
    return pd.concat(frames, ignore_index=True)


def load_model(source: str, *, dtype: str = "auto", device: str = "auto", **kwargs: Any):
    """Load a model source (demo alias, Hub id, directory, .gguf, quantlab checkpoint);
    returns a ``LoadedModel`` with ``model``, ``tokenizer`` and ``info``."""
    from quantlab.models import load_model as _load
    from quantlab.models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return _load(source, dtype=resolve_dtype(dtype, dev), device=dev, **kwargs)


def load_checkpoint(path: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """Reload a checkpoint quantlab exported."""
    from quantlab.checkpoint import load_checkpoint as _load
    from quantlab.models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return _load(Path(path), dtype=resolve_dtype(dtype, dev), device=dev)


def evaluate(model: str | Path, **options: Any) -> dict:
    """Score a model source or exported checkpoint without quantizing anything, as
    ``quantlab eval`` does: ``evaluate("smollm2-135m", data="pydoc", convention="llamacpp",
    seq_len=512, max_windows=20, base=None, speed=False)``. Returns the JSON object the
    command prints (``ppl``, ``ppl_stderr``, ``scored_tokens``, labels, divergence with ``base``)."""
    from quantlab.evalcmd import evaluate_source

    return evaluate_source(str(model), **options)


def backends() -> list[dict[str, Any]]:
    """Name, description, calibration need and option schema of every registered backend."""
    from quantlab.registry import backend_names, get_backend

    out = []
    for name in backend_names():
        cls = get_backend(name)
        out.append({"name": name, "description": cls.description,
                    "needs_calibration": cls.needs_calibration, "extra": cls.extra,
                    "options": {k: {"default": f.default if f.default_factory is None else f.default_factory(),
                                    "description": f.description or ""}
                                for k, f in cls.Config.model_fields.items()}})
    return out
