"""Reading run directories back: the results table, per-method metrics, recipe and
environment, with clear errors for anything that is not a readable quantlab run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from quantlab.errors import QuantlabError


@dataclass
class RunData:
    """One run directory as the reports see it."""

    path: Path
    frame: pd.DataFrame
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # method label -> metrics.json
    recipe: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.recipe.get("name") or self.path.name)

    @property
    def model(self) -> str:
        return str((self.recipe.get("model") or {}).get("source") or "?")


def _nested_runs(path: Path) -> list[str]:
    return sorted(str(p.parent) for p in path.glob("*/results.csv"))[:8]


def results_file(path: Path) -> Path:
    """The results table of a run directory (or the file itself), or a clear error."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise QuantlabError(f"'{path}' does not exist; pass a quantlab run directory (it holds results.csv)")
    csv = path / "results.csv"
    if csv.is_file():
        return csv
    nested = _nested_runs(path)
    hint = (f"; run directories inside it: {', '.join(nested)}" if nested
            else "; a run directory gets results.csv when its first method finishes (quantlab run RECIPE)")
    raise QuantlabError(f"'{path}' holds no results.csv, so it is not a quantlab run directory{hint}")


def read_results(path: Path) -> pd.DataFrame:
    """Read one results table (CSV, or Parquet by extension) with a clear error when it is
    not one."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path)
    except Exception as e:  # pandas raises many types for a damaged file
        raise QuantlabError(f"'{path}' cannot be read as a results table ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'empty'}); re-run the recipe to rewrite it") from None
    missing = [c for c in ("method", "backend", "ppl") if c not in frame.columns]
    if missing:
        raise QuantlabError(f"'{path}' is not a quantlab results table: no {', '.join(missing)} column; "
                            "re-run the recipe to rewrite it")
    if frame.empty:
        raise QuantlabError(f"'{path}' holds no results rows yet")
    if "group_size" in frame:
        frame["group_size"] = frame["group_size"].astype("Int64")
    return frame


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantlabError(f"'{path}' is damaged ({type(e).__name__}: {e}); re-run the recipe to rewrite it") from None
    if not isinstance(obj, dict):
        raise QuantlabError(f"'{path}' is damaged (expected a JSON object); re-run the recipe to rewrite it")
    return obj


def load_run(path: str | Path) -> RunData:
    """A run directory's results, metrics, recipe and environment."""
    csv = results_file(Path(path))
    run_dir = csv.parent
    frame = read_results(csv)
    recipe: dict[str, Any] = {}
    if (run_dir / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise QuantlabError(f"'{run_dir / 'recipe.yaml'}' is damaged ({type(e).__name__}); "
                                "re-run the recipe to rewrite it") from None
        if not isinstance(recipe, dict):
            recipe = {}
    env = _read_json(run_dir / "environment.json") if (run_dir / "environment.json").is_file() else {}
    metrics = {}
    for label in frame["method"].astype(str):
        mpath = run_dir / label / "metrics.json"
        if mpath.is_file():
            metrics[label] = _read_json(mpath)
    run = RunData(run_dir, frame, metrics, recipe, env)
    if "model" not in frame.columns or frame["model"].isna().all():
        frame["model"] = run.model
    return run


def load_runs(paths: str | Path | list[str | Path]) -> list[RunData]:
    """The runs at ``paths``; a directory that is not a run but holds runs (``runs/``) stands
    for every run directly inside it, in name order: a leaderboard across runs."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise QuantlabError("no run directories given")
    expanded: list[Path] = []
    for p in map(Path, paths):
        inner = sorted(d for d in p.iterdir() if (d / "results.csv").is_file()) if p.is_dir() and not (
            p / "results.csv").is_file() else []
        expanded += inner or [p]
    return [load_run(p) for p in expanded]


def combined_frame(runs: list[RunData]) -> pd.DataFrame:
    """The results of several runs in one table; a ``run`` column names each directory."""
    frames = [r.frame.assign(run=str(r.path)) for r in runs]
    return pd.concat(frames, ignore_index=True)
