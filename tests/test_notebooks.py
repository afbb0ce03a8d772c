"""Every notebook in notebooks/ executes, top to bottom, against small runs made here, so
the notebooks never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.cli import main

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TESTED = {"explore_run", "compare_runs"}


def test_there_are_notebooks_and_each_has_a_test():
    assert {p.stem for p in NOTEBOOKS} == TESTED, (
        "a notebook without a test here (or a test without its notebook)"
    )


def _execute(name: str) -> tuple[list[dict], str]:
    """Runs the notebook; returns its outputs (none an error) and their text."""
    nbformat = pytest.importorskip(
        "nbformat", reason="pip install 'quantlab[dev]' for the notebook runner"
    )
    nbclient = pytest.importorskip(
        "nbclient", reason="pip install 'quantlab[dev]' for the notebook runner"
    )
    path = next(p for p in NOTEBOOKS if p.stem == name)
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs, "".join(o.get("text", "") for o in outputs)


def _images(outputs: list[dict]) -> int:
    return len([o for o in outputs if "image/png" in o.get("data", {})])


def test_explore_run(tiny_recipe, tmp_path, monkeypatch):
    assert main(["run", str(tiny_recipe)]) == 0
    run = tmp_path / "run"
    monkeypatch.setenv("QUANTLAB_RUN_DIR", str(run))
    outputs, text = _execute("explore_run")
    assert _images(outputs) >= 3, "the plots were not drawn inline"
    assert "baseline:" in text and "rtn-w4-g32:" in text  # the generation from both checkpoints
    assert (run / "report.html").is_file()


def test_compare_runs(tiny_recipe, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert main(["run", str(tiny_recipe), "--out", str(runs / "a")]) == 0
    assert (
        main(
            [
                "run",
                str(tiny_recipe),
                "--out",
                str(runs / "b"),
                "--set",
                "methods.0.options.group_size=16",
                "--set",
                "eval.max_windows=4",
            ]
        )
        == 0
    )
    monkeypatch.setenv("QUANTLAB_RUNS", str(runs))  # a directory of runs stands for every run in it
    monkeypatch.setenv("QUANTLAB_COMPARE_OUT", str(tmp_path / "compared"))
    outputs, text = _execute("compare_runs")
    assert _images(outputs) >= 3, "the plots were not drawn inline"
    # the runs differ in scored tokens: the comparability warning is printed
    assert "WARNING: the runs differ in number of scored tokens" in text
    # the generation from each run's best checkpoint (the override renamed b's row)
    assert (
        "a/rtn-w4-g32: The Python statement" in text
        and "b/rtn-w4-g16: The Python statement" in text
    )
    html = (tmp_path / "compared" / "report.html").read_text()
    assert "rtn-w4-g16" in html and "rtn-w4-g32" in html
