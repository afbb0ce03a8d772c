"""``RunDir``: every path of a run directory, in one place.

Layout::

    RUN/
      .quantlab-dir, .quantlab.lock     marker (see runs.prepare_run_dir) and the run's lock
      plan.json, plan.safetensors       the run plan (quantlab.plan): what every method reads
      recipe.yaml                       the recipe as resolved (every default filled in)
      environment.json, calibration.json
      reference/                        the base model's distributions (divergence)
      allocation/                       per-unit KLs of bits: auto, shared by the methods (quantlab.allocation)
      results.csv, results.parquet      one row per method, rewritten as methods finish
      report.html, results.md, plots/
      LABEL/                            one directory per method
        checkpoint/                     the exported checkpoint (quantlab.checkpoint)
        export.json, metrics.json       digest-checked records (runs.write_record)
        error.json                      why the method failed (distributed runs)
        model.gguf, model-f32.gguf, gguf.json, llamacpp/   GGUF export and llama.cpp's logs
        sensitivity.json, sensitivity.png, allocation.png

Every path a run writes is checked by :func:`quantlab.runs.owned_path` (never a link, never
an entry of the wrong kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from quantlab.runs import (
    EXPORT_RECORD,
    atomic_write_json,
    atomic_write_text,
    owned_path,
)


@dataclass(frozen=True)
class RunDir:
    root: Path

    PLAN_JSON = "plan.json"
    PLAN_TENSORS = "plan.safetensors"
    REFERENCE = "reference"
    ALLOCATION = "allocation"

    # ------------------------------------------------------------------ the run's own files
    @property
    def plan_json(self) -> Path:
        return owned_path(self.root, self.PLAN_JSON, directory=False, what="run plan")

    @property
    def plan_tensors(self) -> Path:
        return owned_path(self.root, self.PLAN_TENSORS, directory=False, what="run plan tensors")

    def reference(self) -> Path:
        return owned_path(self.root, self.REFERENCE, directory=True, what="divergence reference")

    def allocation_cache(self, key: str) -> Path:
        folder = owned_path(self.root, self.ALLOCATION, directory=True, what="allocation measurements")
        return owned_path(folder, f"{key[:32]}.json", directory=False, what="allocation measurements")

    def write_run_files(self, resolved: dict, env: dict, calibration: dict | None) -> None:
        """recipe.yaml, environment.json and calibration.json: written together with the
        results table, so a run that stops before its first method finishes leaves a
        finished run's description as it was, consistent with its results."""
        atomic_write_text(self.root / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(self.root / "environment.json", env)
        if calibration is not None:
            atomic_write_json(self.root / "calibration.json", calibration)

    # ------------------------------------------------------------------ one method's files
    def method(self, label: str, create: bool = True) -> Path:
        return owned_path(self.root, label, directory=True, what=f"method directory of '{label}'", create=create)

    def checkpoint(self, label: str) -> Path:
        return owned_path(self.method(label), "checkpoint", directory=True, what="checkpoint directory",
                          create=False)

    def metrics(self, label: str) -> Path:
        return self.method(label) / "metrics.json"

    def export_record(self, label: str) -> Path:
        return self.method(label) / EXPORT_RECORD

    def error(self, label: str) -> Path:
        return owned_path(self.method(label), "error.json", directory=False, what="method error record")

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))
