"""Interruption and resume, for real: runs in subprocesses killed with SIGKILL or SIGINT
mid-method, a disk that fills up (a file-size limit), and two runs on one directory."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from quantlab.cli import main

# columns that must be identical between an interrupted-and-resumed run and a clean one
# (speed and wall times are measurements, not results)
DETERMINISTIC = [
    "method",
    "backend",
    "bits",
    "group_size",
    "ppl",
    "kld_mean",
    "kld_p99",
    "top1_agreement",
    "size_bytes",
    "quantized_tensor_bytes",
    "bits_per_weight",
    "eval_tokens",
]


def _recipe(path: Path, model: Path, out: Path, speed: bool = False) -> Path:
    path.write_text(f"""
model: {{source: "{model}"}}
calibration: {{samples: 16, seq_len: 128}}
threads: 2
methods:
  - {{label: rtn-w4, backend: rtn, options: {{bits: 4, group_size: 32}}}}
  - {{label: gptq-w4, backend: gptq, options: {{bits: 4, group_size: 32, act_order: true}}}}
  - {{label: awq-w4, backend: awq, options: {{bits: 4, group_size: 32, n_grid: 20}}}}
eval:
  seq_len: 64
  max_windows: 8
  batch_size: 2
  speed: {{enabled: {str(speed).lower()}, prompt_tokens: 16, new_tokens: 48, warmup: 1, repeats: 3,
          batch_size: 1}}
output: {{dir: "{out}"}}
""")
    return path


def _start(recipe: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "quantlab", "run", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"the run ended (rc {proc.returncode}) before {path.name} appeared:\n{err[-3000:]}"
            )
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)


def _mtimes(run: Path, label: str) -> dict[str, int]:
    return {
        p.name: p.stat().st_mtime_ns
        for p in [run / label / "metrics.json", run / label / "checkpoint" / "quantlab.json"]
    }


@pytest.fixture(scope="module")
def clean(tiny_model_dir, tmp_path_factory) -> pd.DataFrame:
    """The same recipe, uninterrupted."""
    root = tmp_path_factory.mktemp("clean")
    assert main(["run", str(_recipe(root / "r.yaml", tiny_model_dir, root / "run"))]) == 0
    return pd.read_csv(root / "run" / "results.csv")


def test_sigkill_mid_method_then_resume_equals_an_uninterrupted_run(
    tiny_model_dir, tmp_path, clean, capsys
):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    proc = _start(recipe)
    _wait_for(run / "rtn-w4" / "metrics.json", proc)
    _wait_for(run / "gptq-w4", proc)  # GPTQ has started: calibration forward passes, Hessians...
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "gptq-w4" / "metrics.json").exists(), (
        "killed too late: GPTQ had already finished"
    )
    finished = {label: _mtimes(run, label) for label in ("baseline", "rtn-w4")}
    partial = pd.read_csv(run / "results.csv")
    assert list(partial["method"]) == ["baseline", "rtn-w4"]  # the table holds what finished

    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier with the same settings; reusing it") == 2
    for label, stamps in finished.items():
        assert _mtimes(run, label) == stamps, f"{label} was recomputed"
    resumed = pd.read_csv(run / "results.csv")
    pd.testing.assert_frame_equal(resumed[DETERMINISTIC], clean[DETERMINISTIC])
    # a killed run leaves no stale lock and no half-written files behind
    assert not list(run.rglob("*.tmp-*")) and not list(run.rglob(".*.tmp-*"))


def test_sigkill_after_export_reuses_the_checkpoint(tiny_model_dir, tmp_path, clean, capsys):
    """Killed while scoring: the rerun re-scores the exported checkpoint, it does not quantize
    again (the export record's key matches)."""
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run, speed=True)
    proc = _start(recipe)
    _wait_for(run / "gptq-w4" / "export.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (run / "gptq-w4" / "metrics.json").exists():
        pytest.skip("the machine finished scoring before the kill landed; nothing to resume")
    sidecar = run / "gptq-w4" / "checkpoint" / "quantlab.json"
    exported = sidecar.stat().st_mtime_ns
    record = json.loads((run / "gptq-w4" / "export.json").read_text())
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert (
        "gptq-w4: quantized and exported earlier with the same settings; reusing the checkpoint"
        in err
    )
    assert "gptq-w4: quantize (gptq)" not in err
    assert sidecar.stat().st_mtime_ns == exported
    metrics = json.loads((run / "gptq-w4" / "metrics.json").read_text())
    assert metrics["quantize_s"] == record["quantize_s"] and metrics["layers"] == record["layers"]
    resumed = pd.read_csv(run / "results.csv")
    pd.testing.assert_frame_equal(resumed[DETERMINISTIC], clean[DETERMINISTIC])


def test_changing_only_evaluation_settings_rescores_without_quantizing(
    tiny_model_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    assert main(["run", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe), "--set", "eval.max_windows=4"]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing the checkpoint") == 4 and "quantize (" not in err
    assert (pd.read_csv(run / "results.csv")["eval_tokens"] == 4 * 63).all()
    # a changed quantization option quantizes that method again
    assert main(["run", str(recipe), "--set", "methods.0.options.bits=3"]) == 0
    err = capsys.readouterr().err
    # (renamed after its options: rtn-w3)
    assert "rtn-w3: quantize (rtn)" in err and err.count("reusing the checkpoint") == 3


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    proc = _start(recipe)
    _wait_for(run / "gptq-w4", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "to resume, run the same command again" in err and f"quantlab run {recipe}" in err
    assert main(["run", str(recipe)]) == 0  # and it resumes


def test_a_second_run_into_the_same_directory_refuses(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    proc = _start(recipe)
    _wait_for(run / "baseline" / "metrics.json", proc)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "another quantlab run is writing into" in err and f"pid {proc.pid}" in err
    out, perr = proc.communicate(timeout=300)
    assert proc.returncode == 0, perr[-2000:]  # the first run was not disturbed
    assert list(pd.read_csv(run / "results.csv")["method"]) == [
        "baseline",
        "rtn-w4",
        "gptq-w4",
        "awq-w4",
    ]


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk gives an error, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_clear_error_and_keeps_finished_methods(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    text = recipe.read_text()
    recipe.write_text(
        text.replace("  - {label: gptq-w4", "  # - {label: gptq-w4").replace(
            "  - {label: awq-w4", "  # - {label: awq-w4"
        )
    )
    assert main(["run", str(recipe)]) == 0
    before = (run / "results.csv").read_bytes()
    recipe.write_text(text)  # two more methods; their checkpoints no longer fit
    proc = _start(recipe, preexec_fn=_file_size_limit(64 * 1024))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert "a file grew past the size this process may write while writing into" in err
    assert "finished methods are kept" in err
    assert (run / "results.csv").read_bytes() == before
    assert not (run / "gptq-w4" / "checkpoint").exists()  # no half checkpoint under the real name
    assert main(["run", str(recipe)]) == 0  # space again: it resumes
