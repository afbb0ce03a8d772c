"""Property: whatever document a user writes, the recipe loader returns a valid Recipe or
raises quantlab's own RecipeError, never anything else (no KeyError, TypeError, pydantic
error or crash). Documents are built from the real key names, near-misses and junk, so
most of them reach deep into the schema."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantlab.errors import RecipeError
from quantlab.recipe import Recipe, load_recipe, parse_recipe
from quantlab.registry import backend_names

KEYS = [
    "model",
    "source",
    "dtype",
    "device",
    "revision",
    "trust_remote_code",
    "calibration",
    "samples",
    "seq_len",
    "seed",
    "split",
    "text_field",
    "baseline",
    "methods",
    "label",
    "backend",
    "options",
    "bits",
    "group_size",
    "sym",
    "act_order",
    "damp_percent",
    "skip",
    "n_grid",
    "clip",
    "format",
    "mode",
    "engine",
    "activations",
    "weights",
    "sensitivity",
    "kl_budget",
    "granularity",
    "windows",
    "eval",
    "convention",
    "max_windows",
    "batch_size",
    "stride",
    "bos",
    "speed",
    "enabled",
    "new_tokens",
    "divergence",
    "tasks",
    "output",
    "dir",
    "report",
    "threads",
    "name",
    "description",
    "modle",
    "bitz",
    "",
]
VALUES = [
    "auto",
    "cpu",
    "cuda:0",
    "float32",
    "gptq",
    "llamacpp",
    "pydoc",
    "smollm2-135m",
    "lm_head",
    "nf4",
    "per-token",
    "torchao",
    "layer",
    *backend_names(),
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(VALUES),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-3, 3), st.booleans())
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=30,
)


def _method():
    return st.fixed_dictionaries(
        {
            "label": st.one_of(st.sampled_from(["a", "b", "../x", "reference"]), scalars),
            "backend": st.one_of(st.sampled_from(backend_names()), scalars),
        },
        optional={
            "options": st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4),
            "sensitivity": documents,
        },
    )


recipes = st.fixed_dictionaries(
    {"methods": st.one_of(st.lists(_method(), max_size=3), documents)},
    optional={
        k: documents
        for k in ("model", "calibration", "eval", "output", "name", "threads", "baseline")
    },
)


def _check(doc) -> None:
    try:
        recipe = parse_recipe(doc)
    except RecipeError as e:
        assert str(e).strip()
        return
    assert isinstance(recipe, Recipe) and recipe.methods


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_document_is_a_recipe_or_a_recipe_error(doc):
    _check(doc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_recipe_shaped_documents_are_a_recipe_or_a_recipe_error(doc):
    _check(doc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=200),
        recipes.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    )
)
def test_any_file_text_is_a_recipe_or_a_recipe_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError as e:
        assert str(e).strip()
