"""Runs as jobs: the Ray executor on a real local Ray cluster (started by each run, as
``quantlab run --executor ray`` does without --address) gives the same numbers, bit for bit,
as the local executor; a worker killed mid-task is run again (the log says so) and the run
completes; with no retries left the method's row carries the error while the other methods
finish; requests the cluster cannot meet are errors before any work."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip(
    "ray", reason="the Ray executor's tests need Ray: pip install 'quantlab[ray]' torch==2.13.0"
)

ROOT = Path(__file__).resolve().parents[1]


def _recipe(path: Path, model_dir: Path, out: Path, **extra) -> Path:
    doc = {
        "name": "jobs",
        "model": {"source": str(model_dir)},
        "threads": 1,  # one thread everywhere: float sums in the same order in every process
        "calibration": {"samples": 48, "seq_len": 64},
        "methods": [
            {"label": "rtn-w4", "backend": "rtn", "options": {"bits": 4, "group_size": 32}},
            {"label": "gptq-w4", "backend": "gptq", "options": {"bits": 4, "group_size": 32}},
            {
                "label": "awq-w4",
                "backend": "awq",
                "options": {"bits": 4, "group_size": 32, "n_grid": 40},
            },
        ],
        "eval": {"seq_len": 64, "max_windows": 6, "batch_size": 3, "speed": {"enabled": False}},
        "output": {"dir": str(out), "report": False},
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


def _run(recipe: Path, *args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "quantlab", "run", str(recipe), *args]
    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _results(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "results.csv").set_index("method")


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    rc, _, err = _run(_recipe(tmp / "r.yaml", tiny_model_dir, tmp / "run"))
    assert rc == 0, err
    return _results(tmp / "run")


def test_ray_gives_the_local_executors_numbers_bit_for_bit(local_run, tiny_model_dir, tmp_path):
    rc, _, err = _run(
        _recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "run"), "--executor", "ray"
    )
    assert rc == 0, err
    got = _results(tmp_path / "run")
    assert list(got.index) == list(local_run.index) == ["baseline", "rtn-w4", "gptq-w4", "awq-w4"]
    for col in ("ppl", "kld_mean", "top1_agreement", "size_bytes"):
        assert got[col].tolist() == local_run[col].tolist(), col  # exact, not approximate
    assert got["worker"].notna().all() and got["error"].isna().all()
    assert "ray: 4 methods submitted" in err
    # a second run reuses every row, on either executor
    rc, _, err = _run(tmp_path / "r.yaml", "--executor", "ray")
    assert rc == 0 and err.count("finished earlier with the same settings") == 4, err


def _kill_first_worker(run: Path, proc, label: str) -> int:
    """SIGKILL the process that writes ``label/running.json`` (a Ray worker), once it exists."""
    note = run / label / "running.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            pid = json.loads(note.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
            continue
        assert pid != proc.pid  # a worker, not the driver
        os.kill(pid, signal.SIGKILL)
        return pid
    raise AssertionError(f"no worker started {label}: {proc.communicate()[1][-2000:]}")


def test_a_worker_killed_mid_task_is_run_again(local_run, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = _run(_recipe(tmp_path / "r.yaml", tiny_model_dir, run), "--executor", "ray", wait=False)
    pid = _kill_first_worker(run, proc, "awq-w4")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    got = _results(run)
    assert got["error"].isna().all()
    assert got["ppl"].tolist() == local_run["ppl"].tolist()
    # the retry is a progress line of the driver: the method, the attempt and why
    line = r"^quantlab \d\d:\d\d:\d\d \+\S+: awq-w4: Ray runs it again, attempt 2 of 3 .*$"
    retry = re.search(line, err, re.M)
    assert retry, err[-3000:]
    host = socket.gethostname()
    assert f"attempt 1's worker (on {host}, pid {pid}) died before the method finished" in retry[0]
    assert not list(run.glob("*/running.json"))


def test_with_no_retries_left_the_row_carries_the_error(local_run, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    recipe = _recipe(
        tmp_path / "r.yaml", tiny_model_dir, run, executor={"kind": "ray", "max_retries": 0}
    )
    proc = _run(recipe, wait=False)
    _kill_first_worker(run, proc, "awq-w4")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    assert (
        "error: method awq-w4 failed:" in err and "Traceback" not in err.split("error: method")[-1]
    )
    got = _results(run)
    assert isinstance(got.loc["awq-w4", "error"], str) and pd.isna(got.loc["awq-w4", "ppl"])
    for label in ("baseline", "rtn-w4", "gptq-w4"):  # the others finished, with the local numbers
        assert got.loc[label, "ppl"] == local_run.loc[label, "ppl"]
    assert (
        json.loads((run / "awq-w4" / "error.json").read_text())["error"]
        == got.loc["awq-w4", "error"]
    )
    assert not (run / "awq-w4" / "running.json").exists()  # its worker died: the driver removed it


def test_requests_the_cluster_cannot_meet_are_errors_before_work(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "run")
    doc = json.loads(recipe.read_text())
    doc["methods"][0]["resources"] = {"cpus": 64}
    recipe.write_text(json.dumps(doc))
    rc, _, err = _run(recipe, "--executor", "ray")
    assert rc == 2, err
    assert (
        "error: method 'rtn-w4' asks for 64 CPUs and 0 GPUs; no node of the Ray cluster has them"
        in err
    )
    assert not (tmp_path / "run" / "rtn-w4" / "checkpoint").exists()
    rc, _, err = _run(recipe, "--executor", "ray", "--address", "127.0.0.1:1")
    assert rc == 2 and "error: cannot connect to Ray at 127.0.0.1:1" in err, err


def test_without_ray_the_executor_says_how_to_get_it(monkeypatch):
    """Ray's absence, as a machine without the extra has it: the import fails."""
    from quantlab.errors import MissingDependencyError
    from quantlab.executors import _ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(
        MissingDependencyError, match=r"pip install 'quantlab\[ray\]' torch==2.13.0"
    ):
        _ray()
