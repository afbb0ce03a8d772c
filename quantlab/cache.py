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
  and a killed writer leaves only a temporary directory that the next writer removes.

Verification reads every byte of an entry (about 1 s per GB here): the price of never trusting
a file by its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError
from quantlab.log import log

RECORD = ".quantlab-entry.json"
RECORD_FORMAT = 1
#: temporary directories of writers: ``ROOT/.KEY.tmp-<pid>-<random>`` (only quantlab writes here)
_TMP_INFIX = ".tmp-"


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
        var = "QUANTLAB_CACHE" if os.environ.get("QUANTLAB_CACHE") else "XDG_CACHE_HOME or QUANTLAB_CACHE"
        raise QuantlabError(f"the cache directory '{root}' cannot be used ({e.strerror or e} at "
                            f"'{path}'); set {var} to a writable directory") from None
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (models are larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def entry_files(entry: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` of every file of ``entry`` but its record."""
    entry = Path(entry)
    return {p.relative_to(entry).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(entry.rglob("*")) if p.is_file() and p.name != RECORD}


@contextlib.contextmanager
def locked(root: Path, key: str) -> Iterator[None]:
    """An exclusive lock on the entry ``root/key`` for the length of the block (the kernel's
    flock on ``root/.key.lock``: a killed holder leaves no stale lock)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: entries are still written atomically
        yield
        return
    path = Path(root) / f".{key}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise QuantlabError(f"cannot lock the cache entry '{Path(root) / key}' ({e.strerror or e}); "
                            "set QUANTLAB_CACHE to a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _problem(entry: Path) -> str | None:
    """Why ``entry`` is not a complete, unchanged entry, or None when it is."""
    try:
        record = json.loads((entry / RECORD).read_text(encoding="utf-8"))
        files = record["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except FileNotFoundError:
        return "it has no record (an unfinished write?)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"its record is unreadable ({type(e).__name__})"
    found = {p.relative_to(entry).as_posix() for p in entry.rglob("*")
             if p.is_file() and p.name != RECORD}
    if found != set(files):
        return f"its files differ from its record ({sorted(found ^ set(files))[:3]})"
    for name, want in files.items():
        path = entry / name
        if not isinstance(want, dict) or path.is_symlink():
            return f"'{name}' is not what its record says"
        if path.stat().st_size != want.get("bytes") or sha256_file(path) != want.get("sha256"):
            return f"'{name}' does not match the digest recorded when it was written"
    return None


def read_entry(root: Path, key: str, *, what: str,
               discard: bool = True) -> tuple[Path, dict] | None:
    """The entry ``root/key`` and its record's ``meta``, verified; None when there is none.
    An entry that fails verification is reported as absent (``discard``: also removed, with a
    log line naming why; only a holder of the entry's lock should discard), so that the caller
    recomputes it: a damaged cache costs time, never a wrong number."""
    entry = Path(root) / key
    if not entry.exists() and not entry.is_symlink():
        return None
    if entry.is_symlink() or not entry.is_dir():
        problem = "it is not a directory quantlab wrote"
    else:
        problem = _problem(entry)
    if problem is not None:
        if discard:
            log(f"cache: {what} at '{entry}' is discarded and recomputed: {problem}")
            _remove(entry)
        return None
    meta = json.loads((entry / RECORD).read_text(encoding="utf-8")).get("meta") or {}
    return entry, meta


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _stale_temporaries(root: Path, key: str) -> None:
    """Temporary directories of writers of ``key`` that died (we hold the lock: none is live)."""
    for tmp in Path(root).glob(f".{key}{_TMP_INFIX}*"):
        _remove(tmp)


def cached(root: Path, key: str, build: Callable[[Path], dict | None], *,
           what: str) -> tuple[Path, dict, bool]:
    """The verified entry ``root/key``, built by ``build(tmp_dir) -> meta`` when absent or
    damaged. Returns ``(entry, meta, reused)``. Builders of the same key in several processes
    wait for one another (the lock); the entry appears whole or not at all."""
    root = Path(root)
    if (found := read_entry(root, key, what=what, discard=False)) is not None:
        return found[0], found[1], True
    with locked(root, key):
        # another process may have written it while we waited for the lock
        if (found := read_entry(root, key, what=what)) is not None:
            return found[0], found[1], True
        _stale_temporaries(root, key)
        tmp = root / f".{key}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            meta = build(tmp) or {}
            record = {"format": RECORD_FORMAT, "key": key, "meta": meta, "files": entry_files(tmp)}
            (tmp / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
            entry = root / key
            _remove(entry)
            tmp.rename(entry)
        except BaseException:
            _remove(tmp)  # Ctrl-C or a failed build leaves nothing half-written behind
            raise
    return entry, meta, False
