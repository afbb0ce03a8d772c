"""quantlab.cache's rule on real directories: an entry is reused only when every file matches
the digest recorded when it was written (and its meta the inputs asked for), else it is built
again; a failed build leaves nothing; pruning keeps the most recently used entries and never
removes one whose lock is held."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from quantlab.cache import RECORD, cached, locked, prune, read_entry


class Builder:
    """Writes two files and counts its calls (the cache must call it only when needed)."""

    def __init__(self, text: str = "weights"):
        self.text, self.calls = text, 0

    def __call__(self, tmp):
        self.calls += 1
        (tmp / "a.bin").write_text(self.text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
        return {"source_sha256": "s1"}


def test_an_entry_is_reused_only_while_it_matches_its_record(tmp_path, capsys):
    build = Builder()
    entry, meta, reused = cached(tmp_path, "k", build, what="thing")
    assert not reused and meta == {"source_sha256": "s1"} and build.calls == 1
    assert cached(tmp_path, "k", build, what="thing")[2] and build.calls == 1
    (entry / "a.bin").write_text("wEights")  # same size, other bytes
    entry, _, reused = cached(tmp_path, "k", build, what="thing")
    assert not reused and build.calls == 2 and (entry / "a.bin").read_text() == "weights"
    assert "thing at" in capsys.readouterr().err
    damages = [
        lambda e: (e / "extra.bin").write_text("x"),  # a file the record does not list
        lambda e: (e / "sub" / "b.json").unlink(),  # a listed file missing
        lambda e: (e / RECORD).write_text("{"),  # a record that does not parse
        lambda e: (e / RECORD).write_text('{"files": [], "meta": 3}'),
        lambda e: (e / RECORD).unlink(),
    ]  # written before records existed
    for n, damage in enumerate(damages, start=3):
        damage(entry)
        entry, _, reused = cached(tmp_path, "k", build, what="thing")
        assert not reused and build.calls == n
        assert read_entry(tmp_path, "k", what="thing") is not None


def test_an_entry_for_other_inputs_is_built_again(tmp_path):
    build = Builder()
    cached(tmp_path, "k", build, what="thing", expect={"source_sha256": "s1"})
    assert cached(tmp_path, "k", build, what="thing", expect={"source_sha256": "s1"})[2]
    _, meta, reused = cached(
        tmp_path,
        "k",
        lambda tmp: {"source_sha256": "s2"},
        what="thing",
        expect={"source_sha256": "s2"},
    )
    assert not reused and meta == {"source_sha256": "s2"}


def test_a_failed_build_leaves_nothing(tmp_path):
    def fail(tmp):
        (tmp / "half.bin").write_text("half")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        cached(tmp_path, "k", fail, what="thing")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_prune_keeps_the_most_recent_and_spares_a_locked_entry(tmp_path):
    for i, key in enumerate(["old", "locked", "mid", "new"]):
        entry = cached(tmp_path, key, Builder(), what="thing")[0]
        os.utime(entry, (1000 + i, 1000 + i))
    stale = tmp_path / ".gone.tmp-1-abcd"  # a dead writer's temporary directory
    stale.mkdir()
    with locked(tmp_path, "locked"):  # as another process reading it back would hold it
        prune(tmp_path, 2, what="thing")
    assert _entries(tmp_path) == ["locked", "mid", "new"] and not stale.exists()
    prune(tmp_path, 2, what="thing")
    assert _entries(tmp_path) == ["mid", "new"]


def _entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_builders_in_two_processes_build_once(tmp_path):
    """Two processes asking for one missing entry at once: one builds, the other waits for the
    lock and reuses it (without the lock both build, each replacing the other's entry)."""
    script = """
import sys, time
from pathlib import Path
from quantlab.cache import cached
root, go = Path(sys.argv[1]), Path(sys.argv[2])
def build(tmp):
    time.sleep(1.0)  # a build long enough for the other process to arrive meanwhile
    (tmp / "pid").write_text(str(__import__("os").getpid()))
while not go.exists():
    time.sleep(0.01)
entry, _, reused = cached(root, "k", build, what="thing")
print(int(reused), (entry / "pid").read_text())
"""
    go = tmp_path / "go"
    (tmp_path / "cache").mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "cache"), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)
    go.touch()
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["0", "1"] and outs[0][1] == outs[1][1]
    record = json.loads((tmp_path / "cache" / "k" / RECORD).read_text())
    assert set(record["files"]) == {"pid"}
