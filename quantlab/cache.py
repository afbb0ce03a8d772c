"""quantlab's cache ($QUANTLAB_CACHE, else $XDG_CACHE_HOME/quantlab): converted models, GGUF
templates, base-model references. Entries are keyed by what produced them.

The rule, for every entry: **what is read back is verified against a digest recorded when it
was written, or it is recomputed.** A name (a key, a path) says where an entry should be; only
its recorded content says that it is the entry. So:

- an entry is a directory ``ROOT/KEY/`` whose record ``ROOT/KEY/.quantlab-entry.json`` is
  written last and lists every file with its size and sha256 (:func:`entry_files`);
- :func:`read_entry` returns an entry only when its record is readable and every file matches
  it (size and sha256, no file missing, none added); anything else is removed (under the lock)
  and reported as absent, so the caller recomputes it and says so;
- :func:`cached` builds a missing entry in a temporary directory beside it, under an exclusive
  lock on ``ROOT/.KEY.lock`` (two processes filling the same entry wait for each other instead
  of racing), writes the record, then renames it into place: a reader never sees a half entry,
  and a killed writer leaves only a temporary directory that the next writer removes;
- an entry keyed by a prefix of a digest, or whose inputs are not all in its key, records them
  in its ``meta``; ``expect`` (same items in the meta, or recomputed) makes that check part of
  reading it;
- :func:`prune` keeps the most recently used entries of a root and removes the others (and the
  temporary directories of dead writers), each under its lock, never one that is being built.

An entry written before these records existed (no record) is one like any damaged entry:
removed and recomputed, with one log line.

Verification reads every byte of an entry (about 1 s per GB here): the price of never trusting
a file by its name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from quantlab.atomicdir import TMP_INFIX, atomic_directory, tmp_prefix
from quantlab.errors import QuantlabError
from quantlab.log import log

RECORD = ".quantlab-entry.json"
RECORD_FORMAT = 1


def cache_dir() -> Path:
    """Where downloads and converted models live: $QUANTLAB_CACHE, else $XDG_CACHE_HOME/quantlab."""
    if os.environ.get("QUANTLAB_CACHE"):
        return Path(os.environ["QUANTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantlab"


def cache_subdir(name: str) -> Path:
    """``cache_dir()/name``, created, or one clear error naming the variable to change."""
    root = cache_dir()
    path = root / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        var = (
            "QUANTLAB_CACHE"
            if os.environ.get("QUANTLAB_CACHE")
            else "XDG_CACHE_HOME or QUANTLAB_CACHE"
        )
        raise QuantlabError(
            f"the cache directory '{root}' cannot be used ({e.strerror or e} at "
            f"'{path}'); set {var} to a writable directory"
        ) from None
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (models are larger than memory)."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)


def sha256_stream(f: BinaryIO, chunk: int = 1 << 22) -> str:
    """sha256 of what is left to read in an open binary file (a reader that keeps the file open
    verifies the very bytes it will read, not a file a path names later)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def entry_files(entry: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` of every file of ``entry`` but its record."""
    entry = Path(entry)
    return {
        p.relative_to(entry).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(entry.rglob("*"))
        if p.is_file() and p.name != RECORD
    }


@contextlib.contextmanager
def locked(root: Path, key: str, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on the entry ``root/key`` for the length of the block (the kernel's
    flock on ``root/.key.lock``: a killed holder leaves no stale lock). Yields True when held;
    ``wait=False``: yields False at once when another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: entries are still written atomically
        yield True
        return
    path = Path(root) / f".{key}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise QuantlabError(
            f"cannot lock the cache entry '{Path(root) / key}' ({e.strerror or e}); "
            "set QUANTLAB_CACHE to a writable directory"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _problem(entry: Path, expect: dict | None) -> tuple[str | None, dict]:
    """Why ``entry`` is not a complete, unchanged entry (with ``expect`` in its meta), or None
    when it is; and its meta."""
    try:
        record = json.loads((entry / RECORD).read_text(encoding="utf-8"))
        files, meta = record["files"], record.get("meta") or {}
        if not isinstance(files, dict) or not isinstance(meta, dict):
            raise TypeError("files or meta is not a mapping")
    except FileNotFoundError:
        return "it has no record (written by an earlier quantlab, or an unfinished write)", {}
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"its record is unreadable ({type(e).__name__})", {}
    differs = sorted(k for k, v in (expect or {}).items() if meta.get(k) != v)
    if differs:
        return f"it was written for other inputs ({', '.join(differs)} differ)", meta
    try:
        return _files_problem(entry, files), meta
    except OSError as e:  # removed or changed while being read
        return f"it cannot be read ({e.strerror or type(e).__name__})", meta


def _files_problem(entry: Path, files: dict) -> str | None:
    found = {
        p.relative_to(entry).as_posix()
        for p in entry.rglob("*")
        if p.is_file() and p.name != RECORD
    }
    if found != set(files):
        return f"its files differ from its record ({sorted(found ^ set(files))[:3]})"
    for name, want in files.items():
        path = entry / name
        if not isinstance(want, dict) or path.is_symlink():
            return f"'{name}' is not what its record says"
        if path.stat().st_size != want.get("bytes") or sha256_file(path) != want.get("sha256"):
            return f"'{name}' does not match the digest recorded when it was written"
    return None


def read_entry(
    root: Path, key: str, *, what: str, discard: bool = True, expect: dict | None = None
) -> tuple[Path, dict] | None:
    """The entry ``root/key`` and its record's ``meta``, verified; None when there is none.
    An entry that fails verification, or whose meta lacks an item of ``expect``, is reported as
    absent (``discard``: also removed, with a log line naming why; only a holder of the entry's
    lock should discard), so that the caller recomputes it: a damaged cache costs time, never
    a wrong number."""
    entry = Path(root) / key
    if not entry.exists() and not entry.is_symlink():
        return None
    meta: dict = {}
    if entry.is_symlink() or not entry.is_dir():
        problem = "it is not a directory quantlab wrote"
    else:
        problem, meta = _problem(entry, expect)
    if problem is not None:
        if discard:
            log(f"cache: {what} at '{entry}' is discarded and recomputed: {problem}")
            _remove(entry)
        return None
    return entry, meta


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _stale_temporaries(root: Path, key: str) -> None:
    """Temporary directories of writers of ``key`` that died (we hold the lock: none is live)."""
    for tmp in Path(root).glob(f"{glob.escape(tmp_prefix(Path(root) / key, hidden=True))}*"):
        _remove(tmp)


def recorded_files(entry: Path) -> dict[str, dict[str, Any]]:
    """The ``{relative path: {sha256, bytes}}`` recorded for an entry that :func:`read_entry`
    or :func:`cached` just verified (a digest of its content without reading it again)."""
    return json.loads((Path(entry) / RECORD).read_text(encoding="utf-8"))["files"]


def cached(
    root: Path,
    key: str,
    build: Callable[[Path], dict | None],
    *,
    what: str,
    expect: dict | None = None,
) -> tuple[Path, dict, bool]:
    """The verified entry ``root/key`` (``root``: an existing directory, as :func:`cache_subdir`
    gives), built by ``build(tmp_dir) -> meta`` when absent, damaged or written for other inputs
    (``expect``: items its meta must hold; the builder's meta should hold them). Returns
    ``(entry, meta, reused)``. Builders of the same key in several processes wait for one
    another (the lock); the entry appears whole or not at all."""
    root = Path(root)
    if (found := read_entry(root, key, what=what, discard=False, expect=expect)) is not None:
        return found[0], found[1], True
    with locked(root, key):
        # another process may have written it while we waited for the lock
        if (found := read_entry(root, key, what=what, expect=expect)) is not None:
            return found[0], found[1], True
        _stale_temporaries(root, key)
        entry = root / key
        # no marker: it would join the entry's files; the lock keeps other writers out
        with atomic_directory(entry, replace=True, marker=False, hidden=True) as tmp:
            meta = build(tmp) or {}
            record = {"format": RECORD_FORMAT, "key": key, "meta": meta, "files": entry_files(tmp)}
            (tmp / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return entry, meta, False


def prune(root: Path, keep: int, *, what: str) -> None:
    """Keep the ``keep`` most recently used entries of ``root`` (by modification time: touch an
    entry when using it) and remove the others, each under its lock; an entry whose lock is held
    (being read back or rebuilt) is left for a later prune. Temporary directories of writers
    that died go too (a live writer holds its entry's lock)."""
    root = Path(root)
    entries = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=_mtime,
        reverse=True,
    )
    for old in entries[keep:]:
        with locked(root, old.name, wait=False) as held:
            if held:
                log(f"cache: {what} at '{old}' removed (the {keep} most recently used are kept)")
                _remove(old)
    for tmp in root.glob(f".*{TMP_INFIX}*"):
        key = tmp.name[1:].split(TMP_INFIX)[0]
        with locked(root, key, wait=False) as held:
            if held:
                _remove(tmp)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed by another process meanwhile
        return 0.0
