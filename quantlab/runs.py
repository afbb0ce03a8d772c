"""The run directory: atomic writes and the per-method completion record.

    RUN_DIR/
      recipe.yaml         the resolved recipe (every default filled in)
      environment.json    versions, device, dtype, threads
      calibration.json    how the calibration windows were drawn (when a method used them)
      results.csv         one row per finished method (rewritten after each method)
      LABEL/checkpoint/   the exported checkpoint
      LABEL/metrics.json  the method's metrics; written last, it marks the method done
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QuantlabError(f"cannot write '{path}': {e.strerror or e}") from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def prepare_run_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QuantlabError(f"output directory '{path}' exists and is a file; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantlabError(f"cannot create output directory '{path}': {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise QuantlabError(f"output directory '{path}' is not writable; choose another --out")
    return path


def stage_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a method's results."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_metrics(method_dir: Path, key: str) -> dict | None:
    """The method's metrics if it finished with the same key, else None."""
    path = Path(method_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if metrics.get("key") == key else None
