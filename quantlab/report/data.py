"""Reading run directories back: the results table, per-method metrics, recipe and
environment, with clear errors for anything that is not a readable quantlab run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from quantlab.errors import QuantlabError
from quantlab.layout import ENVIRONMENT, METRICS, RECIPE, RESULTS_CSV, RESULTS_PARQUET


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

    #: what the report says about the run's own files (a damaged results.parquet...)
    notes: list[str] = field(default_factory=list)
    _changes: dict[str, list[str] | None] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> str:
        return str((self.recipe.get("model") or {}).get("source") or "?")

    def checkpoint_changes(self, label: str) -> list[str] | None:
        """What changed in ``label``'s checkpoint since it was exported and scored (empty:
        nothing), or None when its row names no checkpoint or it is gone. Asked once per
        label (:func:`quantlab.checkpoint.changes_since_export`: size and time, sha256 where
        they differ)."""
        if label not in self._changes:
            from quantlab.checkpoint import changes_since_export

            rel = (self.metrics.get(label) or {}).get("checkpoint")
            ckpt = self.path / rel if isinstance(rel, str) and rel else None
            self._changes[label] = changes_since_export(ckpt) if ckpt and ckpt.exists() else None
        return self._changes[label]


def _nested_runs(path: Path) -> list[str]:
    return sorted(str(p.parent) for p in path.glob(f"*/{RESULTS_CSV}"))[:8]


def results_file(path: Path) -> Path:
    """The results table of a run directory (or the file itself), or a clear error."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise QuantlabError(
            f"'{path}' does not exist; pass a quantlab run directory (it holds results.csv)"
        )
    csv = path / RESULTS_CSV
    if csv.is_file():
        return csv
    nested = _nested_runs(path)
    hint = (
        f"; run directories inside it: {', '.join(nested)}"
        if nested
        else "; a run directory gets results.csv when its first method finishes (quantlab run "
        "RECIPE)"
    )
    raise QuantlabError(
        f"'{path}' holds no results.csv, so it is not a quantlab run directory{hint}"
    )


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
        raise QuantlabError(
            f"'{path}' cannot be read as a results table ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'empty'}); re-run the recipe to rewrite it"
        ) from None
    missing = [c for c in ("method", "backend", "ppl") if c not in frame.columns]
    if missing:
        raise QuantlabError(
            f"'{path}' is not a quantlab results table: no {', '.join(missing)} column; "
            "re-run the recipe to rewrite it"
        )
    if frame.empty:
        raise QuantlabError(f"'{path}' holds no results rows yet")
    if "group_size" in frame:
        frame["group_size"] = frame["group_size"].astype("Int64")
    return frame


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantlabError(
            f"'{path}' is damaged ({type(e).__name__}: {e}); re-run the recipe to rewrite it"
        ) from None
    if not isinstance(obj, dict):
        raise QuantlabError(
            f"'{path}' is damaged (expected a JSON object); re-run the recipe to rewrite it"
        )
    return obj


def load_run(path: str | Path) -> RunData:
    """A run directory's results, metrics, recipe and environment."""
    csv = results_file(Path(path))
    run_dir = csv.parent
    frame = read_results(csv)
    recipe: dict[str, Any] = {}
    if (run_dir / RECIPE).is_file():
        try:
            recipe = yaml.safe_load((run_dir / RECIPE).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise QuantlabError(
                f"'{run_dir / RECIPE}' is damaged ({type(e).__name__}); "
                "re-run the recipe to rewrite it"
            ) from None
        if not isinstance(recipe, dict):
            recipe = {}
    env = _read_json(run_dir / ENVIRONMENT) if (run_dir / ENVIRONMENT).is_file() else {}
    metrics = {}
    for label in frame["method"].astype(str):
        mpath = run_dir / label / METRICS
        if mpath.is_file():
            metrics[label] = _read_json(mpath)
    run = RunData(run_dir, frame, metrics, recipe, env)
    if csv.suffix != ".parquet":
        run.notes += _parquet_problem(run_dir, frame)
    if "model" not in frame.columns or frame["model"].isna().all():
        frame["model"] = run.model
    return run


def _parquet_problem(run_dir: Path, frame: pd.DataFrame) -> list[str]:
    """results.parquet is a second copy of results.csv, the table every report reads. The
    rule: a copy that cannot be read, or that disagrees with the CSV (other methods or
    perplexities), is said in the report's warnings, never silently trusted or ignored."""
    path = run_dir / RESULTS_PARQUET
    if not path.is_file():
        return []
    redo = (
        "the report uses results.csv; run the recipe again (finished methods are reused) to "
        "rewrite both"
    )
    try:
        other = pd.read_parquet(path)
    except ImportError:  # no Parquet engine here: nothing to compare with
        return []
    except Exception as e:  # pyarrow raises many types for a damaged file
        detail = (str(e).splitlines() or [""])[0][:120]
        return [f"'{path}' cannot be read ({type(e).__name__}: {detail}); {redo}"]
    if not _same_rows(frame, other):
        return [f"'{path}' does not match results.csv (other methods or perplexities); {redo}"]
    return []


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if any(c not in df.columns for c in ("method", "ppl") for df in (a, b)) or len(a) != len(b):
        return False
    ppl_a, ppl_b = (pd.to_numeric(df["ppl"], errors="coerce").to_numpy(float) for df in (a, b))
    return list(a["method"].astype(str)) == list(b["method"].astype(str)) and bool(
        np.allclose(ppl_a, ppl_b, rtol=1e-9, atol=0, equal_nan=True)
    )


def load_runs(paths: str | Path | list[str | Path]) -> list[RunData]:
    """The runs at ``paths``; a directory that is not a run but holds runs (``runs/``) stands
    for every run directly inside it, in name order: a leaderboard across runs."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not all(
        isinstance(p, (str, os.PathLike)) for p in paths
    ):
        raise QuantlabError(
            "run directories must be a path or a list of paths (str or "
            f"pathlib.Path), not {type(paths).__name__}"
        )
    if not paths:
        raise QuantlabError("no run directories given")
    expanded: list[Path] = []
    for p in map(Path, paths):
        inner = (
            sorted(d for d in p.iterdir() if (d / RESULTS_CSV).is_file())
            if p.is_dir() and not (p / RESULTS_CSV).is_file()
            else []
        )
        expanded += inner or [p]
    return [load_run(p) for p in expanded]


def combined_frame(runs: list[RunData]) -> pd.DataFrame:
    """The results of several runs in one table; a ``run`` column names each directory."""
    frames = [r.frame.assign(run=str(r.path)) for r in runs]
    return pd.concat(frames, ignore_index=True)
