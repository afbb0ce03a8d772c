"""Records a run keeps: files written atomically, and the digest-checked records that say a
stage finished with given settings (what a resumed run may reuse).

The rules: a reader never sees half a file (write to a temporary name, then rename); a
record carries a digest of its own content (one edited by hand is not ours, the stage is
redone) and the key of everything that produced it (:func:`stage_key`: options as resolved,
code, versions); a full disk is one plain error, and what finished before stays on disk.
Where records live in a run directory is :class:`quantlab.rundir.RunDir`'s business.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError
from quantlab.layout import CHECKPOINT, EXPORT_RECORD, METRICS, SIDECAR


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QuantlabError(f"cannot write '{path}': {os_problem(e)}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


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
    record = read_record(method_dir / METRICS, key)
    ckpt = (record or {}).get("checkpoint")
    if isinstance(ckpt, str) and changes_since_export(method_dir.parent / ckpt):
        return None
    return record


def finished_stage(method_dir: Path, key: str) -> dict | None:
    """The export record if the method's checkpoint was exported with the same key and is
    complete (its sidecar, written last, exists), else None."""
    if not (Path(method_dir) / CHECKPOINT / SIDECAR).is_file():
        return None
    return read_record(Path(method_dir) / EXPORT_RECORD, key)


_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "a file grew past the size this process may write",
    errno.EDQUOT: "the disk quota is exhausted",
}


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
        raise QuantlabError(
            f"{problem} while writing into '{out_dir}'; free some space (or choose another --out) "
            "and run the same command again: finished methods are kept and reused"
        ) from None


def os_problem(e: OSError) -> str:
    """An OS error in words, with what to do for a full disk."""
    problem = storage_error(e)
    if problem:
        return f"{problem}; free some space (or choose another --out) and run again"
    return e.strerror or str(e)
