"""The sensitivity pass and ``skip: auto``: KL measured the fast way equals a plain forward,
the model is left as it was, the choice is minimal and its KL is real."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from quantlab.errors import RecipeError
from quantlab.models import load_model
from quantlab.recipe import parse_recipe
from quantlab.registry import get_backend
from quantlab.sensitivity import _Runner, candidate_groups, run_sensitivity


def _fresh(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu")).model


def _windows(n=3, length=40):
    return torch.randint(3, 380, (n, length), generator=torch.Generator().manual_seed(1))


def _maker(name, **options):
    cls = get_backend(name)
    config = cls.Config(**options)
    return lambda skip: cls(config.model_copy(update={"skip": skip}))


def _kl_full(float_model, quantized_model, ids) -> float:
    """Independent: two plain forwards, KL(float || quantized) per token, mean."""
    with torch.no_grad():
        p = F.log_softmax(float_model(ids).logits.float(), -1)
        q = F.log_softmax(quantized_model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_groups_by_layer_and_by_type():
    names = [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
    ]
    assert candidate_groups(names, "layer") == {n: [n] for n in names}
    assert candidate_groups(names, "type") == {
        "model.layers.*.mlp.down_proj": names[:2],
        "model.layers.*.self_attn.q_proj": names[2:],
    }


def test_forward_from_a_cached_layer_equals_a_full_forward(tiny_model_dir):
    model = _fresh(tiny_model_dir)
    ids = _windows()
    runner = _Runner(model, ids)
    assert runner.kl(0) == pytest.approx(0.0, abs=1e-7)
    assert runner.kl(1) == pytest.approx(0.0, abs=1e-7)
    backend = _maker("rtn", bits=2, group_size=32)(["lm_head", "model.layers.0.*", "*.self_attn.*"])
    backend.quantize(model, None)  # only layer 1's MLP
    assert runner.start_layer(["model.layers.1.mlp.up_proj"]) == 1
    full, cached = runner.kl(0), runner.kl(1)
    assert full > 1e-4
    assert cached == pytest.approx(full, rel=1e-4)


@pytest.mark.parametrize(
    "name, options",
    [
        ("rtn", {"bits": 3, "group_size": 32}),
        ("int8-dynamic", {}),  # torchao re-parameterizes the Linear in place
        ("int8-dynamic", {"activations": "per-tensor"}),
        ("int8-dynamic", {"engine": "fbgemm"}),
        ("bnb", {}),
        ("quanto", {"weights": "int4"}),
    ],
)
def test_pass_leaves_the_model_as_it_was(tiny_model_dir, name, options):
    model = _fresh(tiny_model_dir)
    ids = _windows()
    with torch.no_grad():
        before = model(ids).logits
    result = run_sensitivity(
        model,
        _maker(name, **options),
        ids,
        base_skip=["lm_head"],
        granularity="layer",
        kl_budget=1e-3,
        log=lambda m: None,
    )
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert all(
        type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor
        for n, m in model.named_modules()
        if n.endswith("_proj")
    )
    assert len(result.sensitivity) == 14 and all(v >= 0 for v in result.sensitivity.values())


def test_auto_choice_is_minimal_and_its_kl_is_real(tiny_model_dir):
    model = _fresh(tiny_model_dir)
    ids = _windows()
    make = _maker("rtn", bits=2, group_size=32)
    everything = run_sensitivity(
        model,
        make,
        ids,
        base_skip=["lm_head"],
        granularity="layer",
        kl_budget=1e9,
        log=lambda m: None,
    )
    assert everything.chosen == [] and everything.final_kl == everything.probes[0]["kl"]
    budget = everything.final_kl / 4
    result = run_sensitivity(
        model,
        make,
        ids,
        base_skip=["lm_head"],
        granularity="layer",
        kl_budget=budget,
        log=lambda m: None,
    )
    n = len(result.chosen)
    assert 0 < n < 14 and result.final_kl <= budget
    # the chosen layers are the most sensitive ones, and one fewer would not fit
    ranked = sorted(result.sensitivity, key=result.sensitivity.get, reverse=True)
    assert result.chosen == ranked[:n]
    assert any(p["float"] == n - 1 and p["kl"] > budget for p in result.probes)
    # independent check of the reported KL: quantize with the chosen skip list, plain forwards
    quantized = make(["lm_head", *result.chosen]).quantize(_fresh(tiny_model_dir), None).model
    assert _kl_full(model, quantized, ids) == pytest.approx(result.final_kl, rel=1e-4)


def test_backends_that_change_more_than_their_layers_work_on_copies(tiny_model_dir):
    """AWQ rescales norms in front of the layers it quantizes: probes run on copies."""
    model = _fresh(tiny_model_dir)
    ids = _windows()
    with torch.no_grad():
        before = model(ids).logits
    result = run_sensitivity(
        model,
        _maker("awq", bits=4, group_size=32, n_grid=4),
        ids,
        base_skip=["lm_head"],
        granularity="type",
        kl_budget=None,
        calibration=_windows(4, 32),
        log=lambda m: None,
    )
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)
    assert set(result.sensitivity) == {
        f"model.layers.*.{n}"
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }


def test_sensitivity_block_needs_a_backend_with_layers():
    doc = {"methods": [{"label": "b", "backend": "none", "sensitivity": {"kl_budget": 0.1}}]}
    with pytest.raises(RecipeError, match="no 'skip' option"):
        parse_recipe(doc)
    doc = {
        "methods": [{"label": "q", "backend": "quanto", "sensitivity": {"granularity": "block"}}]
    }
    with pytest.raises(RecipeError, match="granularity"):
        parse_recipe(doc)


def test_run_with_skip_auto_records_and_applies_the_choice(tiny_model_dir, tmp_path):
    from quantlab.api import run_recipe

    doc = {
        "model": {"source": str(tiny_model_dir)},
        "calibration": {"samples": 2, "seq_len": 32},
        "methods": [
            {
                "label": "int8-auto",
                "backend": "int8-dynamic",
                "options": {"activations": "per-tensor", "skip": "auto"},
                "sensitivity": {
                    "kl_budget": 2e-6,
                    "granularity": "type",
                    "windows": 2,
                    "seq_len": 32,
                },
            }
        ],
        "eval": {"seq_len": 64, "max_windows": 3, "speed": {"enabled": False}},
        "output": {"dir": str(tmp_path / "run")},
    }
    recipe = parse_recipe(doc, default_name="auto")
    result = run_recipe(recipe, echo=False)
    mdir = tmp_path / "run" / "int8-auto"
    metrics = json.loads((mdir / "metrics.json").read_text())
    sens = metrics["sensitivity"]
    assert sens["final_kl"] <= 2e-6 and sens["chosen"]
    assert metrics["skipped_layers"] == len(sens["chosen"])
    assert (mdir / "sensitivity.json").is_file() and (mdir / "sensitivity.png").is_file()
    options = json.loads((mdir / "checkpoint" / "quantlab.json").read_text())["options"]
    assert options["skip"] == ["lm_head", *sens["chosen"]]
    row = result.results.set_index("method").loc["int8-auto"]
    assert row["skipped_layers"] == len(sens["chosen"])
