"""The second reliability pass (issue 20), the cases a table cannot hold: results are keyed by
what was measured (model content, absolute sources, code), records edited by hand are redone
rather than trusted, links out of a run are never followed, and real processes that hit a full
disk or a Ctrl-C while plotting end with one line and nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from quantlab.cli import main

RECIPE = """
name: rel
model: {{source: "{model}"}}
methods:
  - {{label: rtn-w4, backend: rtn, options: {{bits: 4, group_size: 32}}}}
eval: {{seq_len: 64, max_windows: 2, batch_size: 2, speed: {{enabled: false}}}}
output: {{dir: "{out}"}}
"""


def _recipe(path: Path, model: str | Path, out: Path) -> Path:
    path.write_text(RECIPE.format(model=model, out=out))
    return path


def _perturb_weights(model_dir: Path, seed: int = 1) -> None:
    """Other weights of the same architecture, written in place under the same name."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in load_file(path).items()
    }
    save_file(weights, path, metadata={"format": "pt"})


def _ppl(run: Path) -> dict[str, float]:
    frame = pd.read_csv(run / "results.csv")
    return dict(zip(frame["method"], frame["ppl"]))


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- 1. never stale


def test_weights_replaced_in_place_are_measured_again(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    recipe = _recipe(tmp_path / "r.yaml", model, tmp_path / "run")
    assert main(["run", str(recipe)]) == 0
    before = _ppl(tmp_path / "run")
    capsys.readouterr()
    _perturb_weights(model)
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "finished earlier" not in err and "exported earlier" not in err, err
    after = _ppl(tmp_path / "run")
    assert all(after[m] != pytest.approx(before[m], rel=1e-6) for m in before), (before, after)


def test_a_relative_source_means_what_it_points_at_from_where_it_runs(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    for name, seed in (("a", None), ("b", 2)):
        shutil.copytree(tiny_model_dir, tmp_path / name / "model")
        if seed is not None:
            _perturb_weights(tmp_path / name / "model", seed)
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", "model", run)
    results = {}
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)
        assert main(["run", str(recipe)]) == 0
        import yaml

        assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["source"] == str(
            tmp_path / name / "model"
        )
        results[name] = (_ppl(run), capsys.readouterr().err)
    assert "finished earlier" not in results["b"][1]
    assert results["a"][0]["rtn-w4"] != pytest.approx(results["b"][0]["rtn-w4"], rel=1e-6)


def test_changed_code_is_never_assumed_to_give_the_same_results(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "run")
    assert main(["run", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert (
        capsys.readouterr().err.count("finished earlier with the same settings") == 2
    )  # same code: reused
    monkeypatch.setattr("quantlab.plan.code_digest", lambda: "0" * 64)
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert (
        "finished earlier" not in err
        and "exported earlier" not in err
        and "rtn-w4: quantize" in err
    ), err


def test_records_edited_by_hand_are_redone_not_trusted(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    assert main(["run", str(recipe)]) == 0
    truth = pd.read_csv(run / "results.csv").set_index("method")
    for name, edit in (
        ("export.json", lambda d: d["options"].update(bits=8)),
        ("metrics.json", lambda d: d.update(ppl=1.0, bits=8)),
    ):
        path = run / "rtn-w4" / name
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "rtn-w4: quantize" in err, err  # the export record was not trusted
    again = pd.read_csv(run / "results.csv").set_index("method")
    assert again.loc["rtn-w4", "bits"] == 4
    assert again.loc["rtn-w4", "ppl"] == pytest.approx(truth.loc["rtn-w4", "ppl"], rel=1e-6)


def test_an_unparsable_export_record_means_redo_the_stage(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    assert main(["run", str(recipe)]) == 0
    (run / "rtn-w4" / "export.json").write_text('{"key": ')
    (run / "rtn-w4" / "metrics.json").unlink()
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert "rtn-w4: quantize" in capsys.readouterr().err


# --------------------------------------------------------------------------- 2. no writes over
# others


def test_a_method_directory_linked_out_of_the_run_is_refused(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    assert main(["run", str(recipe)]) == 0
    outside = tmp_path / "precious"
    shutil.move(run / "rtn-w4", outside)
    (run / "rtn-w4").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    capsys.readouterr()
    assert main(["run", str(recipe), "--force"]) == 2
    err = capsys.readouterr().err
    assert "is a symbolic link" in err and "Traceback" not in err
    assert _tree(outside) == before


def test_files_inside_the_run_linked_outside_are_replaced_not_written_through(
    tiny_model_dir, tmp_path
):
    """The divergence reference's files and a method's sensitivity files, as links to files
    outside the run: a forced run replaces the links, the outside files keep their bytes."""
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_model_dir, run)
    recipe.write_text(
        recipe.read_text().replace(
            "group_size: 32}}", "group_size: 32}, sensitivity: {windows: 1, seq_len: 32}}"
        )
    )
    assert main(["run", str(recipe)]) == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    for rel in (
        "reference/logprobs.u16",
        "reference/rows.npy",
        "rtn-w4/sensitivity.json",
        "rtn-w4/sensitivity.png",
    ):
        target = outside / rel.replace("/", "-")
        target.write_bytes(b"precious")
        (run / rel).unlink()
        (run / rel).symlink_to(target)
    assert main(["run", str(recipe), "--force"]) == 0
    assert all(p.read_bytes() == b"precious" for p in outside.iterdir())
    assert not any(p.is_symlink() for p in run.rglob("*"))


def test_a_report_of_a_run_may_go_into_a_report_directory_again(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path / "r.yaml", tiny_model_dir, run))]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (
        main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    )  # its own marker: allowed
    assert (tmp_path / "rep" / "report.html").is_file()


# --------------------------------------------------------------------------- 4. real processes


def _quantlab(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "quantlab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kw,
    )


def _almost_no_writes_allowed():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk gives an error, not a signal
    resource.setrlimit(
        resource.RLIMIT_FSIZE, (16, 16)
    )  # enough for tempfile's probe at import, no more


def test_a_full_disk_before_the_lock_is_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = _quantlab(
        ["run", str(_recipe(tmp_path / "r.yaml", tiny_model_dir, out))],
        preexec_fn=_almost_no_writes_allowed,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "a file grew past the size" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


_INTERRUPT_WHILE_DRAWING = """
import os, signal, sys
import quantlab.report.plots as P
original = getattr(P, sys.argv[1])
def interrupted(*args, **kw):
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while matplotlib works
    return original(*args, **kw)
setattr(P, sys.argv[1], interrupted)
from quantlab.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["quality_vs_size", "save_figure"])
def test_ctrl_c_while_plotting_is_one_line_and_leaves_nothing_half_written(
    where, tiny_model_dir, tmp_path
):
    run = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path / "r.yaml", tiny_model_dir, run))]) == 0
    before = _tree(run)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_WHILE_DRAWING, where, "report", str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "interrupted" in proc.stderr
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    after = _tree(run)
    assert (
        after["report.html"] == before["report.html"]
    )  # written last: the interrupted one never replaced it
    assert set(after) == set(before)
