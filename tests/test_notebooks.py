"""Every notebook in notebooks/ executes, top to bottom, against a small run made here, so
the notebooks never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.cli import main

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tiny_recipe, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install 'quantlab[dev]' for the notebook runner")
    nbclient = pytest.importorskip("nbclient", reason="pip install 'quantlab[dev]' for the notebook runner")
    assert main(["run", str(tiny_recipe)]) == 0
    run = tmp_path / "run"
    monkeypatch.setenv("QUANTLAB_RUN_DIR", str(run))
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the plots were not drawn inline"
    text = "".join(o.get("text", "") for o in outputs)
    assert "baseline:" in text and "rtn-w4-g32:" in text  # the generation from both checkpoints
    assert (run / "report.html").is_file()
