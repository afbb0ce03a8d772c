"""``RunDir``: every path of a run directory, in one place.

Layout::

    RUN/
      .quantlab-dir, .quantlab.lock     marker (see prepare_run_dir) and the run's lock
      plan.json, plan.safetensors       the run plan (quantlab.plan): what every method reads
      recipe.yaml                       the recipe as resolved (every default filled in)
      environment.json, calibration.json
      reference/                        the base model's distributions (divergence)
      noise_floor.json                  the float model's own KL in another dtype
      allocation/                       per-unit KLs of bits: auto (quantlab.allocation)
      results.csv, results.parquet      one row per method, rewritten as methods finish
      report.html, results.md, plots/
      LABEL/                            one directory per method
        checkpoint/                     the exported checkpoint (quantlab.checkpoint)
        export.json, metrics.json       digest-checked records (records.write_record)
        error.json                      why the method failed (distributed runs)
        running.json                    who works on the method now (runner.note_running)
        model.gguf, model-f32.gguf, gguf.json, llamacpp/   GGUF export and llama.cpp's logs
        sensitivity.json, sensitivity.png, allocation.png

Every path a run writes is checked by :func:`owned_path` (never a link, never
an entry of the wrong kind).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from quantlab.errors import QuantlabError
from quantlab.layout import (
    ALLOCATION,
    CALIBRATION,
    CHECKPOINT,
    ENVIRONMENT,
    ERROR,
    EXPORT_RECORD,
    METRICS,
    NOISE_FLOOR,
    PLAN_JSON,
    PLAN_TENSORS,
    PLOTS,
    RECIPE,
    REFERENCE,
    REPORT_HTML,
    RESULTS_CSV,
    RESULTS_MD,
    RESULTS_PARQUET,
    SENSITIVITY,
    SIDECAR,
)
from quantlab.records import atomic_write_json, atomic_write_text, os_problem

#: the marker file quantlab writes into every directory it owns; it names the kind of output
MARKER = ".quantlab-dir"
#: what a run directory of an earlier quantlab (before the marker) always holds
_LEGACY_RUN = ".quantlab.lock"
#: what a report directory may hold; an unmarked directory holding only these (a comparison
#: written before the marker existed) is taken as a report directory
_REPORT_FILES = frozenset({REPORT_HTML, RESULTS_MD, RESULTS_CSV, RESULTS_PARQUET, PLOTS, MARKER})


def _owner_kind(path: Path) -> str | None:
    """The kind of quantlab output ``path`` holds ("run", "report", "checkpoint"), or None."""
    try:
        kind = json.loads((path / MARKER).read_text(encoding="utf-8")).get("kind")
        if isinstance(kind, str):
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    if (path / _LEGACY_RUN).exists():
        return "run"
    if (path / SIDECAR).is_file():
        return "checkpoint"
    return None


#: a directory of runs (a recipe with several models): the one kind that holds other output
CONTAINER = "models"


def _enclosing_output(path: Path, *, through_containers: bool = True) -> tuple[Path, str] | None:
    """The nearest directory above ``path`` that holds quantlab output, with its kind (a
    container of runs is looked through when ``through_containers``: its runs and report
    live inside it)."""
    for parent in path.parents:
        kind = _owner_kind(parent)
        if kind == CONTAINER and through_containers:
            continue
        if kind is not None:
            return parent, kind
    return None


def refuse_inside_output(path: Path, what: str) -> None:
    """The rule of :func:`prepare_run_dir` for entry points that write one tree of their
    own (``quantlab.save``): ``path`` (links resolved) is inside no run, report, checkpoint
    or directory of runs. A run's files are written only by the run that owns them, under
    its lock: anything else writing there would change what the run measured, or mix with
    it."""
    outer = _enclosing_output(Path(os.path.realpath(path)), through_containers=False)
    if outer is not None:
        raise QuantlabError(
            f"{what} '{path}' is inside the quantlab {outer[1]} directory '{outer[0]}'; quantlab "
            "writes there only when it runs that output's own command: choose a path outside it"
        )


def prepare_run_dir(
    path: Path, what: str = "output directory", kind: str = "run", allow: Path | None = None
) -> Path:
    """Create ``path`` (a directory quantlab writes ``kind`` output into) or say plainly why
    it cannot be.

    The rule: quantlab writes only into a directory it created or one that holds its marker
    for the same kind of output, never inside another run, report or checkpoint. ``allow``
    is a run directory a report may be written into (``quantlab report RUN``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QuantlabError(f"{what} '{path}' exists and is a file; choose another --out")
    real = Path(os.path.realpath(path))
    outer = _enclosing_output(real)
    if outer is not None:
        raise QuantlabError(
            f"{what} '{path}' is inside the quantlab {outer[1]} directory '{outer[0]}'; "
            "writing there would mix with its files: choose a directory outside it"
        )
    existed = path.is_dir() and any(path.iterdir())
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantlabError(f"cannot create {what} '{path}': {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise QuantlabError(f"{what} '{path}' is not writable; choose another --out")
    if allow is not None and real == Path(os.path.realpath(allow)):
        return path
    found = _owner_kind(path)
    if (
        found is None
        and existed
        and not (kind == "report" and {p.name for p in path.iterdir()} <= _REPORT_FILES)
    ):
        raise QuantlabError(
            f"{what} '{path}' already holds files that quantlab did not write; choose a new "
            "or empty directory (quantlab writes only into directories it created)"
        )
    if found is not None and found != kind:
        raise QuantlabError(
            f"{what} '{path}' holds a quantlab {found}, not a {kind}; choose another directory"
        )
    if found is None:
        atomic_write_json(path / MARKER, {"kind": kind})
    return path


def owned_path(root: Path, name: str, *, directory: bool, what: str, create: bool = True) -> Path:
    """``root/name`` for quantlab to write: never a symbolic link (quantlab does not follow
    links out of its directories) and never an entry of the wrong kind (a file where a
    directory belongs or the reverse). A directory is created unless ``create`` is off."""
    path = Path(root) / name
    if path.is_symlink():
        raise QuantlabError(
            f"{what} '{path}' is a symbolic link; quantlab does not write through links "
            "out of its directories: remove the link (or choose another --out)"
        )
    if path.exists() and path.is_dir() != directory:
        kind = "directory" if path.is_dir() else "file"
        raise QuantlabError(
            f"{what} '{path}' is a {kind} where quantlab keeps a "
            f"{'directory' if directory else 'file'}; move it away (or choose another --out)"
        )
    if directory and create:
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise QuantlabError(f"cannot create {what} '{path}': {e.strerror or e}") from None
    return path


class RunLock:
    """An exclusive lock on a run directory for the length of a run: a second run into the
    same directory refuses with a clear message instead of corrupting the first. The lock
    is the kernel's (flock), so a killed run leaves no stale lock behind."""

    NAME = ".quantlab.lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run without the lock
            return self
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise QuantlabError(
                f"lock file '{self.path}' is not a plain file (a directory or a link); remove "
                "it: quantlab creates it again"
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise QuantlabError(
                f"cannot create the lock file '{self.path}': {os_problem(e)}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise QuantlabError(
                f"another quantlab run is writing into '{self.path.parent}' ({holder}); wait "
                "for it to finish, or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(
                fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
            )
        except OSError as e:  # a full disk: the lock itself is held, only its note is missing
            os.close(fd)
            raise QuantlabError(
                f"cannot write the lock file '{self.path}': {os_problem(e)}"
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        return False


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (every entry named in :mod:`quantlab.layout`). Each
    path a run writes goes through :func:`owned_path`."""

    root: Path

    # ------------------------------------------------------------------ the run's own files
    @property
    def plan_json(self) -> Path:
        return owned_path(self.root, PLAN_JSON, directory=False, what="run plan")

    @property
    def plan_tensors(self) -> Path:
        return owned_path(self.root, PLAN_TENSORS, directory=False, what="run plan tensors")

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    def reference(self) -> Path:
        return owned_path(self.root, REFERENCE, directory=True, what="divergence reference")

    def noise_floor(self) -> Path:
        return owned_path(self.root, NOISE_FLOOR, directory=False, what="noise floor")

    def allocation_cache(self, key: str) -> Path:
        folder = owned_path(self.root, ALLOCATION, directory=True, what="allocation measurements")
        return owned_path(
            folder, f"{key[:32]}.json", directory=False, what="allocation measurements"
        )

    def results(self, suffix: str = "csv") -> Path:
        """The results table: ``csv``, ``parquet`` or ``md``."""
        name = {"csv": RESULTS_CSV, "parquet": RESULTS_PARQUET, "md": RESULTS_MD}[suffix]
        return owned_path(self.root, name, directory=False, what="results table")

    def write_run_files(self, resolved: dict, env: dict, calibration: dict | None) -> None:
        """recipe.yaml, environment.json and calibration.json: written together with the
        results table, so a run that stops before its first method finishes leaves a
        finished run's description as it was, consistent with its results."""
        atomic_write_text(self.recipe, yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(self.root / ENVIRONMENT, env)
        if calibration is not None:
            atomic_write_json(self.root / CALIBRATION, calibration)

    # ------------------------------------------------------------------ one method's files
    def method(self, label: str, create: bool = True) -> Path:
        return owned_path(
            self.root, label, directory=True, what=f"method directory of '{label}'", create=create
        )

    def checkpoint(self, label: str) -> Path:
        return owned_path(
            self.method(label),
            CHECKPOINT,
            directory=True,
            what="checkpoint directory",
            create=False,
        )

    def metrics(self, label: str) -> Path:
        return self.method(label) / METRICS

    def export_record(self, label: str) -> Path:
        return self.method(label) / EXPORT_RECORD

    def error(self, label: str) -> Path:
        return owned_path(self.method(label), ERROR, directory=False, what="method error record")

    def sensitivity(self, label: str) -> Path:
        # written atomically (rename): a link planted there is replaced, never written through
        return self.method(label) / SENSITIVITY

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))
