"""The noise floor beside every KL: the float model's own KL in another dtype, checked
against a computation written here, reused while its reference holds, and used by the report
to refuse claiming a KL difference below it."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from quantlab.cli import main
from quantlab.report.caveats import within_noise_floor


def _independent_floor(model, tok, run) -> float:
    """Mean KL(float32 || bfloat16) per scored token over the run's divergence windows."""
    from quantlab.data import pydoc_text, tokenize

    plan = json.loads((run / "plan.json").read_text())
    assert plan["eval_plan"]["convention"] == "gptq"
    ids = tokenize(pydoc_text("evaluation"), tok)[: 4 * 64].view(4, 64)
    twin = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        lp = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
        lq = F.log_softmax(twin(ids).logits[:, :-1].float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).mean())


def test_every_row_carries_the_floor_computed_once(tiny, tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "floor.yaml"
    recipe.write_text(f"""
model: {{source: "{tiny_model_dir}"}}
methods: [{{label: rtn, backend: rtn, options: {{bits: 4, group_size: 32}}}}]
eval: {{seq_len: 64, max_windows: 4, divergence: {{max_windows: 4}}, speed: {{enabled: false}}}}
output: {{dir: "{tmp_path / "run"}", report: false}}
""")
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    table = pd.read_csv(run / "results.csv")
    assert table["kld_floor"].nunique() == 1 and (table["kld_floor_dtype"] == "bfloat16").all()
    floor = float(table["kld_floor"].iloc[0])
    # the stored reference holds log-probabilities on a 16-bit grid: equal to ~1e-7
    assert floor == pytest.approx(_independent_floor(*tiny, run), rel=1e-3, abs=1e-7)
    assert floor > 0 and "noise floor: KL" in "".join(capsys.readouterr())
    # a second run on the same reference reads the record instead of computing it again
    assert main(["run", str(recipe), "--force"]) == 0
    assert "noise floor: the float model" not in "".join(capsys.readouterr())
    assert float(pd.read_csv(run / "results.csv")["kld_floor"].iloc[0]) == floor


def _frame(kls: dict[str, float], floor: float) -> pd.DataFrame:
    rows = [{"method": "baseline", "backend": "none", "kld_mean": 0.0}]
    rows += [{"method": m, "backend": "rtn", "kld_mean": v} for m, v in kls.items()]
    return pd.DataFrame(rows).assign(kld_floor=floor, kld_floor_dtype="bfloat16")


def test_the_report_names_neighbours_closer_than_the_floor():
    msg = within_noise_floor(_frame({"a": 0.1300, "b": 0.1302, "c": 0.2}, floor=0.001))
    assert msg and "a vs b (ΔKL 0.00020)" in msg and "b vs c" not in msg
    assert within_noise_floor(_frame({"a": 0.10, "b": 0.12}, floor=0.001)) is None
    assert within_noise_floor(pd.DataFrame({"method": ["a"], "kld_mean": [0.1]})) is None
