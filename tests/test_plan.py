"""The run as data: the plan a run writes reads back equal (what a Ray worker sees is what
the driver computed), a worker without the run directory gets one clear error, and results
are never stale: a changed backend default changes the key (and recipe.yaml shows it)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.plan import RunPlan

RECIPE = """
name: plan
model: {{source: "{model}"}}
calibration: {{samples: 4, seq_len: 32}}
methods:
  - {{label: rtn, backend: rtn, options: {{bits: 4}}}}
  - {{label: gptq, backend: gptq, options: {{bits: 4, group_size: 32}}}}
eval: {{seq_len: 64, max_windows: 3, batch_size: 3,
       speed: {{prompt_tokens: 8, new_tokens: 2, warmup: 0, repeats: 1}}}}
output: {{dir: "{out}", report: false}}
"""


@pytest.fixture()
def run(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, out=tmp_path / "run"))
    assert main(["run", str(recipe), "--set", "methods.0.options.group_size=32"]) == 0
    capsys.readouterr()
    return recipe, tmp_path / "run"


def test_the_plan_reads_back_as_the_driver_wrote_it(run):
    _, out = run
    plan = RunPlan.load(out)
    assert plan.eval_plan.scored_tokens > 0 and len(plan.eval_plan.segments) == 3
    assert plan.calibration.ids.shape == (4, 32) and plan.prompt.shape == (8,)
    for method in plan.recipe.all_methods():  # the keys a worker computes are the rows' keys
        key, _ = plan.method_key(method)
        assert json.loads((out / method.label / "metrics.json").read_text())["key"] == key
    again = RunPlan.load(out)
    assert all(
        torch.equal(a.input_ids, b.input_ids)
        for a, b in zip(plan.eval_plan.segments, again.eval_plan.segments)
    )


def test_recipe_yaml_holds_the_options_as_resolved(run):
    _, out = run
    methods = yaml.safe_load((out / "recipe.yaml").read_text())["methods"]
    gptq = next(m for m in methods if m["label"] == "gptq")
    assert gptq["options"]["damp_percent"] == 0.01 and gptq["options"]["act_order"] is False
    assert next(m for m in methods if m["label"] == "rtn-g32")[
        "options"
    ] == {  # the override renamed it
        "bits": 4,
        "bits_budget": None,
        "bits_choices": [2, 3, 4, 8],
        "module_bits": {},
        "group_size": 32,
        "sym": True,
        "skip": ["lm_head"],
        "scale_search": "none",
        "search_grid": 20,
        "max_shrink": 0.5,
    }


def test_a_worker_that_cannot_read_the_run_directory_says_so(run, tmp_path):
    with pytest.raises(
        QuantlabError, match="cannot read the run plan in .*storage every node mounts"
    ):
        RunPlan.load(tmp_path / "elsewhere")
    _, out = run
    data = bytearray((out / "plan.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one calibration token
    (out / "plan.safetensors").write_bytes(bytes(data))
    with pytest.raises(QuantlabError, match="do not match plan.json"):
        RunPlan.load(out)


def test_a_changed_backend_default_recomputes_the_method(run, monkeypatch, capsys):
    """The key holds the options as resolved: same recipe, same code files, a default that
    changed (as AWQ's next_inputs once did) -> the method is quantized again."""
    from quantlab.quantizers.gptq import GPTQConfig

    recipe, out = run
    assert main(["run", str(recipe), "--set", "methods.0.options.group_size=32"]) == 0
    assert capsys.readouterr().err.count("finished earlier with the same settings") == 3
    monkeypatch.setattr(GPTQConfig.model_fields["damp_percent"], "default", 0.05)
    GPTQConfig.model_rebuild(force=True)
    try:
        assert main(["run", str(recipe), "--set", "methods.0.options.group_size=32"]) == 0
    finally:
        monkeypatch.undo()
        GPTQConfig.model_rebuild(force=True)
    err = capsys.readouterr().err
    assert "gptq: quantize" in err and err.count("finished earlier with the same settings") == 2, (
        err
    )
    gptq = next(
        m
        for m in yaml.safe_load((out / "recipe.yaml").read_text())["methods"]
        if m["label"] == "gptq"
    )
    assert gptq["options"]["damp_percent"] == 0.05
