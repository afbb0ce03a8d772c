"""One atomic directory writer: a directory appears whole or not at all.

Checkpoint exports (whole-model and streamed), compressed-tensors exports and cache entries
are all built the same way, here: in a fresh temporary directory beside the target, renamed
into place when the builder finished without error, removed on any failure (a full disk,
Ctrl-C). A reader therefore never finds half a directory under the target's name.

Temporary names are ``NAME.tmp-PID-RANDOM`` (``.NAME.tmp-…`` with ``hidden``, so that a
listing of entries skips them). With ``marker`` the temporary directory holds
:data:`TMP_MARKER` (pid and host of its writer) from its first moment; leftovers of killed
writers are removed only when that marker proves them quantlab's and their writer gone
(:func:`remove_stale`): a user's ``NAME.tmp-mine/``, or an export another process is still
writing, is never touched. Writers that serialize on a lock of their own (the cache) clean
their temporaries themselves and write no marker (it would join the entry's files).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from quantlab.errors import QuantlabError

#: the infix of every temporary directory: ``NAME.tmp-PID-RANDOM``
TMP_INFIX = ".tmp-"
#: written first into a marked temporary directory: the proof that quantlab made it, with the
#: pid and host that did (so a live writer of another process is left alone)
TMP_MARKER = ".quantlab-export"


@contextlib.contextmanager
def atomic_directory(
    dest: Path, *, replace: bool = False, marker: bool = True, hidden: bool = False
) -> Iterator[Path]:
    """Yield a fresh, empty temporary directory that becomes ``dest`` when the block ends
    without error, and is removed otherwise.

    ``replace``: an existing ``dest`` (directory, file or link) is removed just before the
    rename; whether it may be is the caller's rule, checked before. Without it an existing
    ``dest`` is an error. ``marker``: write :data:`TMP_MARKER` first and clear marked
    leftovers of dead writers beside ``dest`` (:func:`remove_stale`); the marker is removed
    once the directory is in place (a leftover one would be harmless)."""
    dest = Path(dest)
    if not replace and (dest.exists() or dest.is_symlink()):
        raise QuantlabError(f"'{dest}' exists; choose another name or move it away")
    if marker:
        remove_stale(dest, hidden=hidden)
    tmp = fresh_tmp(dest, hidden=hidden)
    try:
        if marker:
            record = {"pid": os.getpid(), "host": socket.gethostname()}
            (tmp / TMP_MARKER).write_text(json.dumps(record), encoding="utf-8")
        yield tmp
        if dest.exists() or dest.is_symlink():
            _remove(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if marker:
        (dest / TMP_MARKER).unlink(missing_ok=True)


def tmp_prefix(dest: Path, *, hidden: bool = False) -> str:
    """The name every temporary directory of ``dest`` starts with."""
    return f"{'.' if hidden else ''}{Path(dest).name}{TMP_INFIX}"


def fresh_tmp(dest: Path, *, hidden: bool = False) -> Path:
    """A new, empty temporary directory beside ``dest``: an entry that happens to bear the
    name is never taken over (nor, on failure, removed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = dest.with_name(
            f"{tmp_prefix(dest, hidden=hidden)}{os.getpid()}-{secrets.token_hex(4)}"
        )
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
    raise QuantlabError(f"cannot create a temporary directory beside '{dest}'")


def remove_stale(dest: Path, *, hidden: bool = False) -> list[Path]:
    """Remove the half-written directories of killed writers beside ``dest``.

    The rule: quantlab deletes only what it can prove it wrote. An entry is removed when it
    bears ``dest``'s temporary prefix, is a real directory (not a link), holds
    :data:`TMP_MARKER`, and the marker names a process of this host that no longer runs.
    Anything else is left as it is."""
    dest = Path(dest)
    removed = []
    for stale in dest.parent.glob(f"{glob.escape(tmp_prefix(dest, hidden=hidden))}*"):
        if stale.is_symlink() or not stale.is_dir() or not _dead_writer(stale / TMP_MARKER):
            continue
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def _dead_writer(marker: Path) -> bool:
    """True when ``marker`` is a temporary directory's marker whose process, on this host, has
    ended; False when it is not one, or the writer may still run (or cannot be told)."""
    try:
        rec = json.loads(marker.read_text(encoding="utf-8")) if not marker.is_symlink() else None
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict) or type(rec.get("pid")) is not int:
        return False
    if rec.get("host") != socket.gethostname():
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
