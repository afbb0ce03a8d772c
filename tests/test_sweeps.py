"""Sweeps: a method's ``sweep`` expands into one labelled method per combination (labels
stable and documented), with clear errors for sweeps that cannot run; ``quantlab validate``
prints the expansion."""

from __future__ import annotations

import pytest

from quantlab.cli import main
from quantlab.errors import RecipeError
from quantlab.recipe import parse_recipe


def _recipe(*methods):
    return parse_recipe({"name": "sw", "methods": list(methods)})


def test_a_sweep_expands_in_key_order_with_stable_labels():
    r = _recipe({"label": "gptq", "backend": "gptq", "options": {"sym": False},
                 "sweep": {"bits": [3, 4], "group_size": [32, -1]}},
                {"label": "rtn", "backend": "rtn", "sweep": {"sym": [True, False]}})
    got = [(m.label, m.options) for m in r.methods]
    assert got == [
        ("gptq-w3-g32", {"sym": False, "bits": 3, "group_size": 32}),
        ("gptq-w3-gch", {"sym": False, "bits": 3, "group_size": -1}),
        ("gptq-w4-g32", {"sym": False, "bits": 4, "group_size": 32}),
        ("gptq-w4-gch", {"sym": False, "bits": 4, "group_size": -1}),
        ("rtn-sym-true", {"sym": True}),
        ("rtn-sym-false", {"sym": False}),
    ]


@pytest.mark.parametrize(("method", "message"), [
    ({"label": "g", "backend": "gptq", "options": {"bits": 4}, "sweep": {"bits": [3]}},
     r"methods\[0\]: bits is both in options and in sweep"),
    ({"label": "g", "backend": "gptq", "sweep": {"bits": []}}, r"non-empty lists of values"),
    ({"label": "g", "backend": "gptq", "sweep": [3, 4]}, r"must map option names to non-empty lists"),
    ({"label": "g", "backend": "gptq", "sweep": {"bits": [5]}}, r"GPTQ bits must be one of 2, 3, 4, 8"),
    ({"label": "g", "backend": "rtn", "sweep": {"bits": list(range(2, 9)), "group_size": list(range(1, 40))}},
     r"expands to 273 methods; at most 256"),
])
def test_sweeps_that_cannot_run_are_clear_errors(method, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(method)


def test_a_sweep_that_repeats_a_label_is_an_error():
    with pytest.raises(RecipeError, match="labels must be unique; repeated: g-w3"):
        _recipe({"label": "g", "backend": "gptq", "sweep": {"bits": [3, 4]}}, {"label": "g-w3", "backend": "rtn"})


def test_validate_prints_the_expansion(tmp_path, capsys):
    path = tmp_path / "sw.yaml"
    path.write_text("name: sw\nmethods:\n  - {label: rtn, backend: rtn, sweep: {group_size: [32, 64]}}\n")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 methods" in out and "rtn-g32" in out and "rtn-g64" in out and '{group_size: 64}' in out
    assert main(["validate", str(path), "--set", "methods.0.sweep.bits=[3, 4]"]) == 0
    assert "rtn-g64-w4" in capsys.readouterr().out
