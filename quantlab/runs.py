"""The run directory: atomic writes and the per-method completion record.

    RUN_DIR/
      recipe.yaml         the resolved recipe (every default filled in)
      environment.json    versions, device, dtype, threads
      calibration.json    how the calibration windows were drawn (when a method used them)
      results.csv         one row per finished method (rewritten after each method)
      LABEL/checkpoint/   the exported checkpoint (its quantlab.json, written last, holds the
                          sha256 of every file)
      LABEL/export.json   written once the checkpoint is exported: a resumed run skips
                          quantization and export when its key matches
      LABEL/metrics.json  the method's metrics; written last, it marks the method done
      .quantlab.lock      held (flock) while a run writes into the directory
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QuantlabError(f"cannot write '{path}': {_os_problem(e)}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


#: the marker file quantlab writes into every directory it owns; it names the kind of output
MARKER = ".quantlab-dir"
#: what a run directory of an earlier quantlab (before the marker) always holds
_LEGACY_RUN = ".quantlab.lock"
#: what a report directory may hold; an unmarked directory holding only these (a comparison
#: written before the marker existed) is taken as a report directory
_REPORT_FILES = frozenset({"report.html", "results.md", "results.csv", "results.parquet", "plots", MARKER})


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
    if (path / "quantlab.json").is_file():
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
        raise QuantlabError(f"{what} '{path}' is inside the quantlab {outer[1]} directory "
                            f"'{outer[0]}'; quantlab writes there only when it runs that "
                            "output's own command: choose a path outside it")


def prepare_run_dir(path: Path, what: str = "output directory", kind: str = "run",
                    allow: Path | None = None) -> Path:
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
        raise QuantlabError(f"{what} '{path}' is inside the quantlab {outer[1]} directory '{outer[0]}'; "
                            "writing there would mix with its files: choose a directory outside it")
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
    if found is None and existed and not (kind == "report" and {p.name for p in path.iterdir()} <= _REPORT_FILES):
        raise QuantlabError(f"{what} '{path}' already holds files that quantlab did not write; choose a new "
                            "or empty directory (quantlab writes only into directories it created)")
    if found is not None and found != kind:
        raise QuantlabError(f"{what} '{path}' holds a quantlab {found}, not a {kind}; choose another directory")
    if found is None:
        atomic_write_json(path / MARKER, {"kind": kind})
    return path


def owned_path(root: Path, name: str, *, directory: bool, what: str, create: bool = True) -> Path:
    """``root/name`` for quantlab to write: never a symbolic link (quantlab does not follow
    links out of its directories) and never an entry of the wrong kind (a file where a
    directory belongs or the reverse). A directory is created unless ``create`` is off."""
    path = Path(root) / name
    if path.is_symlink():
        raise QuantlabError(f"{what} '{path}' is a symbolic link; quantlab does not write through links "
                            "out of its directories: remove the link (or choose another --out)")
    if path.exists() and path.is_dir() != directory:
        kind = "directory" if path.is_dir() else "file"
        raise QuantlabError(f"{what} '{path}' is a {kind} where quantlab keeps a "
                            f"{'directory' if directory else 'file'}; move it away (or choose another --out)")
    if directory and create:
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise QuantlabError(f"cannot create {what} '{path}': {e.strerror or e}") from None
    return path


def stage_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a method's results.

    The rule for what goes in: a key identifies *what* was measured, never only where it
    was: content hashes of the weights and texts, sources resolved to absolute paths, the
    options as resolved (every default filled in), the code (:func:`code_digest`) and the
    versions of the libraries that compute the numbers."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of quantlab's own source code, every module but the report's (reports are
    regenerated from results, they compute none). Part of every result's key: changed code
    is never assumed to give the same numbers."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if not rel.startswith("report/"):
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_record(path: Path, record: dict) -> None:
    """Write a stage record with a digest of its own content, so a record edited by hand is
    recognised as not ours (and the stage redone) instead of trusted."""
    record = json.loads(json.dumps(record, default=str))  # the form it will be read back in
    atomic_write_json(path, dict(record, digest=_digest(record)))


def read_record(path: Path, key: str | None) -> dict | None:
    """A JSON record written by :func:`write_record` with ``key``, else None (missing,
    unreadable, edited since it was written, or written for other settings): the stage is
    then done again."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("digest") != _digest(record):
        return None
    if key is not None and record.get("key") != key:
        return None
    return record


def finished_metrics(method_dir: Path, key: str) -> dict | None:
    """The method's metrics if it finished with the same key and the checkpoint it scored
    is as it was exported, else None: a checkpoint changed since (edited in place, a file
    replaced or removed) is never reused with numbers that describe another one; the method
    is done again (its export is verified again and, changed, redone)."""
    from quantlab.checkpoint import changes_since_export

    method_dir = Path(method_dir)
    record = read_record(method_dir / "metrics.json", key)
    ckpt = (record or {}).get("checkpoint")
    if isinstance(ckpt, str) and changes_since_export(method_dir.parent / ckpt):
        return None
    return record


#: written after a method's checkpoint is exported: what a resumed run needs to skip the
#: sensitivity pass, quantization and export (options as resolved, stage times, layer stats)
EXPORT_RECORD = "export.json"


def finished_stage(method_dir: Path, key: str) -> dict | None:
    """The export record if the method's checkpoint was exported with the same key and is
    complete (its sidecar, written last, exists), else None."""
    from quantlab.checkpoint import SIDECAR

    if not (Path(method_dir) / "checkpoint" / SIDECAR).is_file():
        return None
    return read_record(Path(method_dir) / EXPORT_RECORD, key)


_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file grew past the size "
                   "this process may write", errno.EDQUOT: "the disk quota is exhausted"}


def storage_error(exc: BaseException) -> str | None:
    """A plain description when ``exc`` means the disk (or quota, or file-size limit) is
    full, else None. Also recognises libraries that wrap the OS error in their own exception
    (safetensors: "... (os error 28)")."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[e.errno]
        text = str(e) if e is not None else ""
        for code, what in _STORAGE_ERRNOS.items():
            if f"(os error {code})" in text or os.strerror(code) in text:
                return what
    return None


@contextmanager
def storage_errors(out_dir: Path):
    """Turn a full disk (quota, file-size limit) anywhere in the block into one clear
    QuantlabError; what finished before stays on disk."""
    try:
        yield
    except Exception as e:
        problem = storage_error(e)
        if problem is None:
            raise
        raise QuantlabError(f"{problem} while writing into '{out_dir}'; free some space (or choose "
                            "another --out) and run the same command again: finished methods are "
                            "kept and reused") from None


def _os_problem(e: OSError) -> str:
    """An OS error in words, with what to do for a full disk."""
    problem = storage_error(e)
    if problem:
        return f"{problem}; free some space (or choose another --out) and run again"
    return e.strerror or str(e)


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
            raise QuantlabError(f"lock file '{self.path}' is not a plain file (a directory or a link); remove "
                                "it: quantlab creates it again")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise QuantlabError(f"cannot create the lock file '{self.path}': {_os_problem(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise QuantlabError(f"another quantlab run is writing into '{self.path.parent}' ({holder}); wait "
                                "for it to finish, or choose another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        except OSError as e:  # a full disk: the lock itself is held, only its note is missing
            os.close(fd)
            raise QuantlabError(f"cannot write the lock file '{self.path}': {_os_problem(e)}") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        return False
