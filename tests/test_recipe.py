"""Recipe schema: defaults, unknown keys, backend options, overrides."""

import pytest

from quantlab.errors import RecipeError
from quantlab.recipe import apply_overrides, load_recipe, parse_recipe

MINIMAL = {"methods": [{"label": "r", "backend": "rtn", "options": {"bits": 4, "group_size": 64}}]}


def test_defaults_and_implicit_baseline():
    r = parse_recipe(MINIMAL, default_name="demo")
    assert r.name == "demo" and r.model.source == "smollm2-135m" and r.model.dtype == "auto"
    assert (r.calibration.samples, r.calibration.seq_len, r.calibration.seed) == (128, 512, 0)
    assert r.eval.convention == "gptq"
    assert [m.label for m in r.all_methods()] == ["baseline", "r"]
    assert str(r.output_dir()) == "runs/demo"
    assert r.methods[0].config().bits == 4


def test_baseline_not_duplicated_and_can_be_turned_off():
    doc = {"methods": [{"label": "float", "backend": "none"}, *MINIMAL["methods"]]}
    assert [m.label for m in parse_recipe(doc).all_methods()] == ["float", "r"]
    assert [m.label for m in parse_recipe({**MINIMAL, "baseline": False}).all_methods()] == ["r"]


@pytest.mark.parametrize(
    "doc,needle",
    [
        ({**MINIMAL, "modle": {}}, "modle: unknown key (did you mean 'model'?)"),
        (
            {**MINIMAL, "calibration": {"sampels": 3}},
            "calibration.sampels: unknown key (did you mean 'samples'?)",
        ),
        (
            {**MINIMAL, "eval": {"speed": {"repeat": 3}}},
            "eval.speed.repeat: unknown key (did you mean 'repeats'?)",
        ),
        (
            {"methods": [{"label": "r", "backend": "rnt"}]},
            "unknown backend 'rnt' (did you mean 'rtn'?)",
        ),
        (
            {"methods": [{"label": "r", "backend": "rtn", "options": {"bits": 9}}]},
            "methods[0].options.bits",
        ),
        (
            {"methods": [{"label": "r", "backend": "rtn", "options": {"bits": 1}}]},
            "bits must be 2-8",
        ),
        (
            {"methods": [{"label": "r", "backend": "rtn", "options": {"group_sise": 64}}]},
            "did you mean 'group_size'",
        ),
        (
            {"methods": [{"label": "r", "backend": "rtn", "options": {"group_size": 0}}]},
            "group_size must be",
        ),
        ({"methods": [{"label": "a b", "backend": "rtn"}]}, "label 'a b'"),
        (
            {"methods": [{"label": "x", "backend": "rtn"}, {"label": "x", "backend": "none"}]},
            "repeated: x",
        ),
        ({"methods": []}, "methods"),
        ({**MINIMAL, "model": {"dtype": "fp8"}}, "model.dtype"),
        ({**MINIMAL, "model": {"device": "gpu"}}, "device must be"),
        ({**MINIMAL, "calibration": {"samples": "many"}}, "calibration.samples"),
        ({**MINIMAL, "eval": {"convention": "wikitext"}}, "eval.convention"),
        (
            {**MINIMAL, "eval": {"convention": "gptq", "stride": 256}},
            "stride applies to the strided convention",
        ),
        (
            {**MINIMAL, "eval": {"convention": "gptq", "bos": True}},
            "bos applies to the llamacpp convention",
        ),
        (
            {**MINIMAL, "eval": {"convention": "lm-eval", "max_windows": 3}},
            "max_windows does not apply",
        ),
        (
            {**MINIMAL, "eval": {"convention": "strided", "seq_len": 128, "stride": 256}},
            "must not exceed seq_len",
        ),
        ({**MINIMAL, "eval": {"divergence": {"max_window": 2}}}, "did you mean 'max_windows'"),
        ({**MINIMAL, "eval": {"tasks": "arc_easy"}}, "eval.tasks"),
        ([1, 2], "mapping"),
        (None, "empty"),
    ],
)
def test_bad_recipes_name_the_problem(doc, needle):
    with pytest.raises(RecipeError) as e:
        parse_recipe(doc, origin="r.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("r.yaml: ")


def test_overrides():
    doc = {"methods": [{"label": "r", "backend": "rtn", "options": {"bits": 4}}]}
    apply_overrides(
        doc,
        [
            "calibration.samples=32",
            "methods.0.options.bits=3",
            "model.source=x/y",
            "eval.max_windows=null",
            "methods.0.options.sym=false",
        ],
    )
    assert doc["calibration"] == {"samples": 32}
    assert doc["methods"][0]["options"] == {"bits": 3, "sym": False}
    assert doc["model"]["source"] == "x/y" and doc["eval"]["max_windows"] is None
    for bad in ["methods.3.label=x", "nokey", "=3", "model.source.x=1"]:
        with pytest.raises(RecipeError):
            apply_overrides({"methods": [{}], "model": {"source": "a"}}, [bad])


def test_load_recipe_yaml_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("methods:\n  - label: a\n    backend: [rtn\n")
    with pytest.raises(RecipeError, match=r"invalid YAML at line \d+"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_every_shipped_recipe_is_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        r = load_recipe(path)
        for m in r.all_methods():
            m.config()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {**MINIMAL, "models": [{"source": "a", "label": "report"}, {"source": "b"}]},
            r"models\[0\]: its label, 'report', is the name of an entry quantlab writes into a "
            r"several-models run",
        ),
        (
            {**MINIMAL, "models": [{"source": "a"}, {"source": "./runs/Methods_x_models.csv"}]},
            r"models\[1\]: the label its source gives it, 'Methods_x_models.csv', is the name of "
            r"an entry",
        ),
        (
            {"methods": [{"label": "plan.json", "backend": "rtn"}]},
            r"label 'plan.json' is the name of a file",
        ),
        (
            {"methods": [{"label": "Plan.safetensors", "backend": "rtn"}]},
            r"'Plan.safetensors' is the name of a file",
        ),
    ],
)
def test_labels_that_name_the_run_directorys_own_entries_are_refused_at_validation(doc, message):
    """A model labelled 'report' used to pass validate and fail once every model had run."""
    with pytest.raises(RecipeError, match=message):
        parse_recipe(doc)


def test_a_document_built_in_python_is_counted_before_it_is_read():
    level = [1] * 10
    for _ in range(8):
        level = [level] * 10  # 10**9 values, 90 lists in memory
    with pytest.raises(RecipeError, match=r"expands to more than 100000 values"):
        parse_recipe({"methods": [{"backend": "rtn", "options": {"skip": level}}]})


@pytest.mark.parametrize(
    "override",
    [
        "methods.0.options.skip." + ".".join(["a"] * 5000) + "=1",  # a key 5000 sections deep
        "methods.0.options.skip=" + "[" * 100 + "]" * 100,
        "methods.0.options.skip=" + "[" * 5000 + "]" * 5000,  # deeper than YAML's parser goes
    ],
)
def test_overrides_nested_past_any_recipe_are_one_error_not_a_recursion(override):
    """Error messages and labels walk values recursively: a RecursionError traceback before."""
    with pytest.raises(
        RecipeError, match=r"nest(s \d+ levels deep; a recipe nests at most 64|ed too deeply)"
    ):
        parse_recipe(apply_overrides({"methods": [{"backend": "rtn"}]}, [override]))
