"""Orchestration under failure, for real (issue #26): checks promised "before any work" run
before the model is loaded; Ctrl-C of a run (local or Ray) keeps every finished method in
results.csv/.parquet/.md and leaves no ``running.json``; a method that fails removes its
marker. Ray runs on a real local cluster, the runs in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from quantlab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _recipe(path: Path, model_dir: Path, out: Path, **extra) -> Path:
    doc = {
        "name": "orchestration",
        "model": {"source": str(model_dir)},
        "threads": 1,
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
        "output": {"dir": str(out)},
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


def _start(recipe: Path, *args: str) -> subprocess.Popen:
    """``quantlab run`` in its own process group, as a terminal runs a command (Ctrl-C
    signals the whole group)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    cmd = [sys.executable, "-m", "quantlab", "run", str(recipe), *args]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_any(paths: list[Path], proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in paths:
            if p.exists():
                return p
        if proc.poll() is not None:
            err = proc.communicate()[1]
            pytest.fail(f"the run ended (rc {proc.returncode}) first:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"none of {[p.name for p in paths]} appeared in {timeout} s")


def _ctrl_c(proc: subprocess.Popen) -> str:
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


def _assert_finished_methods_kept(run: Path) -> list[str]:
    """Every method whose metrics.json is complete is a row of results.csv, .parquet and .md;
    no running.json is left. Returns the finished methods."""
    labels = ["baseline", "rtn-w4", "gptq-w4", "awq-w4"]
    done = [label for label in labels if (run / label / "metrics.json").is_file()]
    assert done, "no method finished before the interruption"
    assert sorted(pd.read_csv(run / "results.csv")["method"]) == sorted(done)
    assert sorted(pd.read_parquet(run / "results.parquet")["method"]) == sorted(done)
    md = (run / "results.md").read_text()
    assert [label for label in labels if f"| {label} |" in md] == done
    left = [p.read_text() for p in run.glob("*/running.json")]
    assert not left, left
    return done


# --------------------------------------------------------------------------- before any work


def test_gguf_export_without_llamacpp_fails_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A GGUF export from a model directory needs llama.cpp's converter for the file's
    metadata: missing, it is one error before the model loads (it used to come after the
    baseline was scored), and the run directory is not created."""
    empty = tmp_path / "no-llamacpp"
    empty.mkdir()
    monkeypatch.setenv("QUANTLAB_LLAMACPP", str(empty))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "run")
    doc = json.loads(recipe.read_text())
    doc["methods"] = [dict(doc["methods"][0], export=["native", "gguf"])]
    recipe.write_text(json.dumps(doc))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"error: llama.cpp's tools are not found in '{empty}'" in err
    assert "bash scripts/llamacpp.sh" in err
    assert "loading model" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # no reference, no baseline metrics, nothing
    assert main(["validate", str(recipe)]) == 2  # validate says the same
    assert "llama.cpp's tools are not found" in capsys.readouterr().err


def test_ray_address_and_resources_fail_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    """An address nobody answers on and resources no node has: errors before the model is
    loaded and before the run directory exists; the local cluster started for the check is
    shut down again."""
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'quantlab[ray]' torch==2.13.0")
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "run")
    t0 = time.monotonic()
    assert main(["run", str(recipe), "--executor", "ray", "--address", "127.0.0.1:1"]) == 2
    assert time.monotonic() - t0 < 60  # a refused connection, not Ray's minutes of retries
    err = capsys.readouterr().err
    assert "error: cannot connect to Ray at 127.0.0.1:1" in err and "loading model" not in err, err
    assert not (tmp_path / "run").exists()

    doc = json.loads(recipe.read_text())
    doc["methods"][1]["resources"] = {"cpus": 64}
    recipe.write_text(json.dumps(doc))
    assert main(["run", str(recipe), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert (
        "error: method 'gptq-w4' asks for 64 CPUs and 0 GPUs; no node of the Ray cluster has them"
    ) in err
    assert "loading model" not in err
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()


# --------------------------------------------------------------------------- Ctrl-C and failures


def test_ctrl_c_of_a_ray_run_keeps_finished_methods_and_leaves_no_marker(tiny_model_dir, tmp_path):
    """Ctrl-C once a method finished (others still running on Ray): the outstanding tasks are
    cancelled, every method whose row is complete is in results.csv/.parquet/.md, no
    running.json is left, and the command ends as Ctrl-C does (exit 130)."""
    pytest.importorskip("ray", reason="needs Ray: pip install 'quantlab[ray]' torch==2.13.0")
    run = tmp_path / "run"
    proc = _start(_recipe(tmp_path / "r.yaml", tiny_model_dir, run), "--executor", "ray")
    labels = ["baseline", "rtn-w4", "gptq-w4", "awq-w4"]
    _wait_for_any([run / label / "metrics.json" for label in labels], proc)
    err = _ctrl_c(proc)
    assert "ray: interrupted: cancelling" in err and "to resume, run the same command again" in err
    done = _assert_finished_methods_kept(run)
    assert len(done) < len(labels), "every method finished before Ctrl-C: nothing was cancelled"


def test_ctrl_c_of_a_local_run_leaves_no_marker(tiny_model_dir, tmp_path):
    """Ctrl-C while a method runs in the local executor: its running.json is removed and the
    finished methods are in results.csv/.parquet/.md."""
    run = tmp_path / "run"
    proc = _start(_recipe(tmp_path / "r.yaml", tiny_model_dir, run))
    _wait_for_any([run / "gptq-w4" / "running.json"], proc)
    _ctrl_c(proc)
    done = _assert_finished_methods_kept(run)
    assert done[:2] == ["baseline", "rtn-w4"] and "awq-w4" not in done


def test_a_method_that_fails_removes_its_marker(tiny_model_dir, tmp_path, capsys):
    """A method that stops with an error (here: a file where its checkpoint directory
    belongs) leaves no running.json; the methods before it are kept."""
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    from quantlab.rundir import prepare_run_dir

    (prepare_run_dir(run, kind="run") / "rtn-w4").mkdir()  # a run directory, as quantlab makes one
    (run / "rtn-w4" / "checkpoint").write_text("not a checkpoint")
    assert main(["run", str(recipe)]) == 2
    assert "is a file where quantlab keeps a directory" in capsys.readouterr().err
    assert not (run / "rtn-w4" / "running.json").exists()
    assert list(pd.read_csv(run / "results.csv")["method"]) == ["baseline"]
