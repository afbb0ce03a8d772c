"""Several models in one recipe: one run per model under the recipe's directory, each method
compared with that model's own baseline, a method x model table and one report across them;
resumed like any run."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from quantlab.cli import main
from quantlab.errors import RecipeError
from quantlab.recipe import parse_recipe


def _second_model(src, dst):
    """The tiny model with other weights (same architecture and tokenizer)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(7)
    w = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in load_file(dst / "model.safetensors").items()
    }
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_each_model_is_compared_with_its_own_baseline(tiny_model_dir, tmp_path, capsys):
    other = _second_model(tiny_model_dir, tmp_path / "other")
    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps(
            {
                "name": "two",
                "models": [
                    {"source": str(tiny_model_dir), "label": "tiny"},
                    {"source": str(other)},
                ],
                "methods": [
                    {
                        "label": "rtn",
                        "backend": "rtn",
                        "sweep": {"bits": [3, 8]},
                        "options": {"group_size": 32},
                    }
                ],
                "eval": {
                    "seq_len": 64,
                    "max_windows": 3,
                    "batch_size": 3,
                    "speed": {"enabled": False},
                },
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    per = {m: pd.read_csv(run / m / "results.csv").set_index("method") for m in ("tiny", "other")}
    assert (
        per["tiny"].loc["baseline", "ppl"] != per["other"].loc["baseline", "ppl"]
    )  # two models really ran
    table = pd.read_csv(run / "methods_x_models.csv", index_col=0)
    assert list(table.columns) == ["tiny", "other"] and list(table.index) == [
        "baseline",
        "rtn-w3",
        "rtn-w8",
    ]
    for m in ("tiny", "other"):  # each Δ% against that model's own baseline
        want = 100 * (per[m].loc["rtn-w3", "ppl"] / per[m].loc["baseline", "ppl"] - 1)
        assert table.loc["rtn-w3", m] == f"{per[m].loc['rtn-w3', 'ppl']:.3f} ({want:+.1f}%)"
    assert "methods x models" in out and (run / "report" / "report.html").is_file()
    assert "perplexity (gptq convention, pydoc:evaluation, 189 scored tokens;" in out  # labelled
    assert main(["run", str(recipe)]) == 0  # resumed: every row of both models reused
    assert capsys.readouterr().err.count("finished earlier with the same settings") == 6


def test_model_and_models_together_or_clashing_labels_are_errors():
    base = {"name": "x", "methods": [{"label": "a", "backend": "rtn"}]}
    with pytest.raises(RecipeError, match="either model .* or models"):
        parse_recipe(dict(base, model={"source": "a"}, models=[{"source": "b"}]))
    with pytest.raises(RecipeError, match="share the directory label m"):
        parse_recipe(dict(base, models=[{"source": "/x/m"}, {"source": "/y/m"}]))
