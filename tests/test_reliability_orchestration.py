"""Orchestration under failure, for real (issue #26): checks promised "before any work" run
before the model is loaded. Ray runs on a real local cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from quantlab.cli import main


def _recipe(path: Path, model_dir: Path, out: Path, **extra) -> Path:
    doc = {
        "name": "orchestration",
        "model": {"source": str(model_dir)},
        "threads": 1,
        "calibration": {"samples": 48, "seq_len": 64},
        "methods": [
            {"label": "rtn-w4", "backend": "rtn", "options": {"bits": 4, "group_size": 32}},
            {"label": "gptq-w4", "backend": "gptq", "options": {"bits": 4, "group_size": 32}},
            {"label": "awq-w4", "backend": "awq",
             "options": {"bits": 4, "group_size": 32, "n_grid": 40}},
        ],
        "eval": {"seq_len": 64, "max_windows": 6, "batch_size": 3, "speed": {"enabled": False}},
        "output": {"dir": str(out)},
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


# --------------------------------------------------------------------------- before any work


def test_gguf_export_without_llamacpp_fails_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                     monkeypatch, capsys):
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
    assert ("error: method 'gptq-w4' asks for 64 CPUs and 0 GPUs; no node of the Ray cluster "
            "has them") in err
    assert "loading model" not in err
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()
