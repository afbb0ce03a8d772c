"""The one atomic directory writer: whole or nothing, and only provably-ours leftovers go."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from quantlab.atomicdir import TMP_MARKER, atomic_directory, remove_stale
from quantlab.errors import QuantlabError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_directory_appears_whole_and_without_its_marker(tmp_path):
    dest = tmp_path / "out"
    with atomic_directory(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("out.tmp-")
        assert (tmp / TMP_MARKER).is_file()
        (tmp / "a").write_text("x")
        assert not dest.exists()
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_leaves_nothing_and_keeps_what_was_there(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("kept")
    with pytest.raises(KeyboardInterrupt), atomic_directory(dest, replace=True) as tmp:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert [p.name for p in dest.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_existing_target_is_replaced_only_when_asked(tmp_path):
    dest = tmp_path / "out"
    dest.write_text("a user's file")
    with pytest.raises(QuantlabError, match="exists"), atomic_directory(dest):
        pass
    assert dest.read_text() == "a user's file"
    with atomic_directory(dest, replace=True) as tmp:
        (tmp / "new").write_text("x")
    assert dest.is_dir() and (dest / "new").is_file()


def test_hidden_temporaries_carry_no_marker_when_asked(tmp_path):
    with atomic_directory(tmp_path / "key", marker=False, hidden=True) as tmp:
        assert tmp.name.startswith(".key.tmp-") and not any(tmp.iterdir())


def test_only_marked_leftovers_of_dead_writers_are_removed(tmp_path):
    dest = tmp_path / "out"

    def leftover(name: str, pid: int | None, host: str = socket.gethostname()):
        d = tmp_path / name
        d.mkdir()
        if pid is not None:
            (d / TMP_MARKER).write_text(json.dumps({"pid": pid, "host": host}))
        return d

    dead = leftover("out.tmp-1-dead", _dead_pid())
    live = leftover("out.tmp-2-live", os.getpid())
    mine = leftover("out.tmp-mine", None)
    elsewhere = leftover("out.tmp-3-other", _dead_pid(), host="another-host")
    other = leftover("other.tmp-4-dead", _dead_pid())
    assert remove_stale(dest) == [dead]
    assert all(d.is_dir() for d in (live, mine, elsewhere, other))
