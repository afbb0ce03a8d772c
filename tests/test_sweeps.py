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
    r = _recipe(
        {
            "label": "gptq",
            "backend": "gptq",
            "options": {"sym": False},
            "sweep": {"bits": [3, 4], "group_size": [32, -1]},
        },
        {"label": "rtn", "backend": "rtn", "sweep": {"sym": [True, False]}},
    )
    got = [(m.label, m.options) for m in r.methods]
    assert got == [
        ("gptq-w3-g32", {"sym": False, "bits": 3, "group_size": 32}),
        ("gptq-w3-gch", {"sym": False, "bits": 3, "group_size": -1}),
        ("gptq-w4-g32", {"sym": False, "bits": 4, "group_size": 32}),
        ("gptq-w4-gch", {"sym": False, "bits": 4, "group_size": -1}),
        ("rtn-sym-true", {"sym": True}),
        ("rtn-sym-false", {"sym": False}),
    ]


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            {"label": "g", "backend": "gptq", "options": {"bits": 4}, "sweep": {"bits": [3]}},
            r"methods\[0\]: bits is both in options and in sweep",
        ),
        ({"label": "g", "backend": "gptq", "sweep": {"bits": []}}, r"non-empty lists of values"),
        (
            {"label": "g", "backend": "gptq", "sweep": [3, 4]},
            r"must map option names to non-empty lists",
        ),
        (
            {"label": "g", "backend": "gptq", "sweep": {"bits": [5]}},
            r"GPTQ bits must be one of 2, 3, 4, 8",
        ),
        (
            {
                "label": "g",
                "backend": "rtn",
                "sweep": {"bits": list(range(2, 9)), "group_size": list(range(1, 40))},
            },
            r"expands to 273 methods; at most 256",
        ),
    ],
)
def test_sweeps_that_cannot_run_are_clear_errors(method, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(method)


def test_a_sweep_that_repeats_a_label_is_an_error():
    with pytest.raises(RecipeError, match="labels must be unique; repeated: g-w3"):
        _recipe(
            {"label": "g", "backend": "gptq", "sweep": {"bits": [3, 4]}},
            {"label": "g-w3", "backend": "rtn"},
        )


def test_validate_prints_the_expansion(tmp_path, capsys):
    path = tmp_path / "sw.yaml"
    path.write_text(
        "name: sw\nmethods:\n  - {label: rtn, backend: rtn, sweep: {group_size: [32, 64]}}\n"
    )
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "3 methods" in out and "rtn-g32" in out and "rtn-g64" in out and "{group_size: 64}" in out
    )
    assert main(["validate", str(path), "--set", "methods.0.sweep.bits=[3, 4]"]) == 0
    assert "rtn-g64-w4" in capsys.readouterr().out


# ------------------------------------------------------------------ --set renames, adds, labels


def _doc():
    return {
        "name": "o",
        "methods": [
            {"label": "rtn-w4-g64", "backend": "rtn", "options": {"bits": 4, "group_size": 64}}
        ],
    }


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        (["methods.0.options.group_size=128"], "rtn-w4-g128"),
        (["methods.0.options.bits=3", "methods.0.options.group_size=-1"], "rtn-w3-gch"),
        (["methods.0.options.sym=true"], "rtn-w4-g64-sym-true"),
        (["methods.0.backend=gptq"], "gptq-w4-g64"),
        (["methods.0.options.group_size=128", "methods.0.label=mine"], "mine"),
        (["methods.0.options.group_size=64"], "rtn-w4-g64"),  # nothing changed, nothing renamed
    ],
)
def test_an_override_of_an_option_renames_the_row(overrides, label):
    from quantlab.recipe import apply_overrides

    r = parse_recipe(apply_overrides(_doc(), overrides))
    assert r.methods[0].label == label


def test_the_command_line_adds_methods_and_models_and_labels_them_from_their_options():
    from quantlab.recipe import apply_overrides

    doc = apply_overrides(
        _doc(),
        [
            "methods.1.backend=gptq",
            "methods.1.options.bits=3",
            "methods.1.options.group_size=64",
            "models.0.source=smollm2-135m",
            "models.1.source=./other-model",
        ],
    )
    r = parse_recipe({k: v for k, v in doc.items()})
    assert [m.label for m in r.methods] == ["rtn-w4-g64", "gptq-w3-g64"]
    assert [m.source for m in r.models] == ["smollm2-135m", "./other-model"]
    with pytest.raises(
        RecipeError, match=r"'methods.3' is not an index of a list of 1 \(the next index, 1, adds"
    ):
        apply_overrides(_doc(), ["methods.3.backend=gptq"])


def test_a_method_without_a_label_is_named_after_its_backend_and_grid():
    r = _recipe(
        {"backend": "gptq", "options": {"bits": 4, "group_size": 128}},
        {"backend": "llamacpp", "options": {"type": "Q4_K_M"}},
        {"backend": "rtn", "sweep": {"bits": [3, 4]}},
    )
    assert [m.label for m in r.methods] == ["gptq-w4-g128", "llamacpp-q4_k_m", "rtn-w3", "rtn-w4"]


# ------------------------------------------------------------------ bounded before expanding (issue
# 26)


def _capped(args: list[str], address_space: int = 3 << 30):
    """``quantlab ARGS`` in a process with ``address_space`` bytes at most (a MemoryError there,
    not a machine swapping here, is what an unbounded expansion gives)."""
    import os
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "quantlab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=limit,
    )


def test_a_small_recipe_of_10_to_the_12_combinations_is_counted_not_built(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(
        "methods: [{backend: rtn, sweep: {a: &v [0,1,2,3,4,5,6,7,8,9], "
        + ", ".join(f"{k}: *v" for k in "bcdefghijkl")
        + "}}]\n"
    )
    assert path.stat().st_size < 300
    proc = _capped(["validate", str(path)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: methods[0].sweep expands to 1000000000000 methods; at most 256 (its 12 "
        "lists hold up to 10 values each)"
    ]


def test_methods_after_sweeps_times_models_are_capped():
    from quantlab.recipe import MAX_METHODS

    grid = {"bits": [2, 3, 4, 5, 6, 7, 8, 4], "group_size": list(range(8, 264, 8))}  # 256 each
    three = [{"label": f"r{i}", "backend": "rtn", "sweep": grid} for i in range(3)]
    with pytest.raises(
        RecipeError,
        match=rf"asks for 768 methods \(after sweeps\); a recipe runs at most "
        rf"{MAX_METHODS} \(methods x models\): split it",
    ):
        _recipe(*three)
    models = [{"source": f"m{i}"} for i in range(3)]
    with pytest.raises(RecipeError, match=r"asks for 256 methods \(after sweeps\) x 3 models"):
        parse_recipe({"name": "m", "models": models, "methods": three[:1]})
    many = [{"label": f"r{i}", "backend": "rtn"} for i in range(MAX_METHODS + 1)]
    with pytest.raises(
        RecipeError, match=rf"asks for {MAX_METHODS + 1} methods; a recipe runs at most"
    ):
        _recipe(*many)
    assert len(_recipe(*many[:MAX_METHODS]).methods) == MAX_METHODS


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            {"backend": "rtn", "sweep": {"bits": [4, 99], "group_size": [64]}},
            r"^recipe: methods\[1\]\.sweep\.bits\[1\]: bits must be 2-8",
        ),
        (
            {"backend": "gptq", "options": {"bits": 4}, "sweep": {"group_size": [64, 0]}},
            r"^recipe: methods\[1\]\.sweep\.group_size\[1\]: group_size must be",
        ),
        (
            {"backend": "rtn", "sweep": {"bits": [4], "grup_size": [64]}},
            r"^recipe: methods\[1\]\.sweep\.grup_size: unknown key \(did you mean 'group_size'\?\)",
        ),
        (
            {"backend": "rtn", "sweep": {"bits": [4, "auto"]}},
            r"^recipe: methods\[1\]\.sweep \(the combination bits\[1\]\): bits: auto needs "
            r"bits_budget",
        ),
        (
            {"backend": "rtn", "options": {"bits": 9}, "sweep": {"group_size": [32, 64]}},
            r"^recipe: methods\[1\]\.options\.bits: bits must be 2-8",
        ),
        (
            {"backend": "rtn", "export": ["gguf"], "sweep": {"group_size": [32, 64]}},
            r"^recipe: methods\[1\]\.export: export must include 'native'",
        ),
    ],
)
def test_errors_in_a_sweep_name_the_key_as_written(method, message):
    """Not ``methods[2].options.bits``: the user wrote methods[1] and its sweep."""
    with pytest.raises(RecipeError, match=message):
        _recipe({"label": "first", "backend": "rtn"}, method)


def test_an_override_whose_value_expands_through_aliases_is_refused(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("methods: [{backend: rtn, options: {bits: 4}}]\n")
    levels = ["&a [1,1,1,1,1,1,1,1,1,1]"] + [
        f"&{b} [{','.join([f'*{a}'] * 10)}]" for a, b in zip("abcdef", "bcdefg")
    ]
    bomb = f"[{', '.join(levels)}, [{','.join(['*g'] * 10)}]]"  # 10**8 values in 400 bytes
    proc = _capped(["validate", str(path), "--set", f"methods.0.options.bits={bomb}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --set methods.0.options.bits: the value expands to more than 100000 values (YAML "
        "aliases repeated inside each other?); write it out plainly"
    ]
