"""Bit allocation under a budget (bits: auto): the cost model is the results table's, the
solver is exact, the allocation respects fused layers and the budget, the checkpoint stores
several widths in gptqmodel's `dynamic` form and reloads, and impossible budgets or widths are
clear errors before any work."""

from __future__ import annotations

import itertools
import json
import random

import pandas as pd
import pytest
import torch
import yaml

from quantlab.allocation import check_budget, fused_units, solve
from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.recipe import parse_recipe


def test_the_solver_finds_the_optimum_a_brute_force_finds():
    rng = random.Random(0)
    for _ in range(60):
        units = [f"u{i}" for i in range(rng.randint(1, 5))]
        widths = sorted(rng.sample([2, 3, 4, 5, 6, 8], rng.randint(1, 4)))
        cost = {u: {b: b * rng.randint(1, 9) for b in widths} for u in units}
        kl = {u: {b: rng.random() / b for b in widths} for u in units}
        budget = rng.randint(
            sum(min(c.values()) for c in cost.values()), sum(max(c.values()) for c in cost.values())
        )
        best = min(
            (sum(kl[u][b] for u, b in zip(units, pick)), pick)
            for pick in itertools.product(widths, repeat=len(units))
            if sum(cost[u][b] for u, b in zip(units, pick)) <= budget
        )
        chosen = solve(kl, cost, budget, steps=budget)  # one step per bit: exact integer costs
        assert sum(cost[u][chosen[u]] for u in units) <= budget
        assert sum(kl[u][chosen[u]] for u in units) == pytest.approx(best[0])


def test_units_keep_fused_layers_together(tiny):
    model, _ = tiny
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    units = fused_units(model, names)
    assert units["model.layers.0.q_proj+k_proj+v_proj"] == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"
    ]
    assert units["model.layers.1.gate_proj+up_proj"] == [
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert sorted(m for ms in units.values() for m in ms) == sorted(names) and len(units) == 8


def test_a_budget_no_allocation_can_meet_names_the_feasible_range():
    shapes = {"a": (64, 64)}
    with pytest.raises(
        QuantlabError, match=r"between 3\.062 and 9\.250 bits per weight.*nearest feasible: 3\.062"
    ):
        check_budget(1.5, [2, 4, 8], 32, shapes, {"a": ["a"]})
    check_budget(4.0, [2, 4, 8], 32, shapes, {"a": ["a"]})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": "auto"}, "bits: auto needs bits_budget"),
        ({"bits": 4, "bits_budget": 4.0}, "bits_budget applies to bits: auto"),
        (
            {"bits": "auto", "bits_budget": 4.0, "bits_choices": [3, 5]},
            "GPTQ packs 2, 3, 4, 8 bits",
        ),
        ({"bits": "auto", "bits_budget": 4.0, "skip": "auto"}, "choose either skip: auto"),
    ],
)
def test_allocation_options_that_cannot_run_are_refused_before_any_work(options, message):
    with pytest.raises(Exception, match=message):
        parse_recipe(
            {"name": "a", "methods": [{"label": "g", "backend": "gptq", "options": options}]}
        )


def test_awq_allocates_only_in_the_gptq_format():
    with pytest.raises(Exception, match="use format: gptq"):
        parse_recipe(
            {
                "name": "a",
                "methods": [
                    {
                        "label": "a",
                        "backend": "awq",
                        "options": {"bits": "auto", "bits_budget": 4.0},
                    }
                ],
            }
        )


def _run(tmp_path, tiny_model_dir, options, backend="rtn"):
    recipe = tmp_path / "alloc.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "alloc",
                "model": {"source": str(tiny_model_dir)},
                "calibration": {"samples": 4, "seq_len": 64},
                "methods": [
                    {
                        "label": "m",
                        "backend": backend,
                        "options": options,
                        "sensitivity": {"windows": 2, "seq_len": 64},
                    }
                ],
                "eval": {"seq_len": 64, "max_windows": 4, "speed": {"enabled": False}},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    assert main(["run", str(recipe)]) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("backend", ["rtn", "gptq"])
def test_an_allocated_run_meets_its_budget_and_reloads_with_several_widths(
    tiny_model_dir, tmp_path, backend
):
    run = _run(
        tmp_path, tiny_model_dir, {"bits": "auto", "bits_budget": 4.2, "group_size": 32}, backend
    )
    row = pd.read_csv(run / "results.csv").set_index("method").loc["m"]
    record = json.loads((run / "m" / "sensitivity.json").read_text())["allocation"]
    # the allocation's cost model is the results table's bits_per_weight
    assert row["bits_per_weight"] == pytest.approx(record["bits_per_weight"], rel=1e-9)
    assert row["bits_per_weight"] <= 4.2 and 2 <= row["bits"] <= 8
    assert record["measured_kl"] >= 0 and len(record["chosen"]) == 8 and row["allocation_s"] > 0
    widths = set(record["chosen"].values())
    qcfg = json.loads((run / "m" / "checkpoint" / "config.json").read_text())["quantization_config"]
    if len(widths) > 1:  # gptqmodel's per-module overrides, one entry per layer off the base width
        assert qcfg["dynamic"] and all(k.startswith("+:^model") for k in qcfg["dynamic"])
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["methods"][0]["options"]["bits"] == "auto"
    metrics = json.loads((run / "m" / "metrics.json").read_text())
    resolved = metrics["options"]["module_bits"]  # the allocation as resolved, reused on resume
    assert len(resolved) == 14 and set(resolved.values()) == widths
    from quantlab.checkpoint import load_checkpoint

    loaded = load_checkpoint(
        run / "m" / "checkpoint", dtype=torch.float32, device=torch.device("cpu")
    )
    assert {n: loaded.model.get_submodule(n).bits for n in resolved} == resolved
    assert (run / "m" / "allocation.png").is_file()


def test_validate_refuses_a_budget_the_model_cannot_meet_before_any_work(
    tiny_model_dir, tmp_path, capsys
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "model": {"source": str(tiny_model_dir)},
                "calibration": {"seq_len": 64},
                "methods": [
                    {
                        "backend": "rtn",
                        "options": {"bits": "auto", "bits_budget": 2.5, "group_size": 32},
                    }
                ],
            }
        )
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (
        "bits_budget 2.5 cannot be met" in err
        and "nearest feasible" in err
        and "rtn-auto2.5-g32" in err
    )


def test_gguf_export_of_widths_gguf_cannot_hold_is_refused_before_any_work():
    from quantlab.formats.gguf import check_gguf_grid
    from quantlab.quantizers.rtn import RTN, RTNConfig

    def grid(**options):
        return RTN(RTNConfig(**options)).grid()

    with pytest.raises(
        QuantlabError, match="no block type for 2/3-bit grids with sym true.*from \\[4, 5, 8\\]"
    ):
        check_gguf_grid("m", grid(bits="auto", bits_budget=4.0, group_size=32))
    with pytest.raises(
        QuantlabError, match="no block type for 8-bit grids with sym false.*from \\[4, 5\\]"
    ):
        check_gguf_grid("m", grid(bits=4, sym=False, module_bits={"*.down_proj": 8}, group_size=32))
    # widths GGUF holds: a type per tensor
    check_gguf_grid("m", grid(bits="auto", bits_budget=5.0, bits_choices=[4, 5, 8], group_size=32))
