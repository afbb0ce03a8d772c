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
        raise QuantlabError(f"cannot write '{path}': {e.strerror or e}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def prepare_run_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` (a directory quantlab writes into) or say plainly why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QuantlabError(f"{what} '{path}' exists and is a file; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantlabError(f"cannot create {what} '{path}': {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise QuantlabError(f"{what} '{path}' is not writable; choose another --out")
    return path


def stage_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a method's results."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record(path: Path, key: str) -> dict | None:
    """A JSON record written with ``key``, or None (missing, unreadable, other key)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def finished_metrics(method_dir: Path, key: str) -> dict | None:
    """The method's metrics if it finished with the same key, else None."""
    return _record(Path(method_dir) / "metrics.json", key)


#: written after a method's checkpoint is exported: what a resumed run needs to skip the
#: sensitivity pass, quantization and export (options as resolved, stage times, layer stats)
EXPORT_RECORD = "export.json"


def finished_stage(method_dir: Path, key: str) -> dict | None:
    """The export record if the method's checkpoint was exported with the same key and is
    complete (its sidecar, written last, exists), else None."""
    from quantlab.checkpoint import SIDECAR

    if not (Path(method_dir) / "checkpoint" / SIDECAR).is_file():
        return None
    return _record(Path(method_dir) / EXPORT_RECORD, key)


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise QuantlabError(f"another quantlab run is writing into '{self.path.parent}' ({holder}); wait "
                                "for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        return False
