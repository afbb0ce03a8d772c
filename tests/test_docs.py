"""Every recipe key and every backend option is documented in README.md."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from quantlab.recipe import Recipe
from quantlab.registry import backend_names, get_backend

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        for t in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += _fields(t, f"{prefix}{name}.")
    return out


def _documented(key: str) -> bool:
    leaf = key.split(".")[-1]
    # a YAML line "  leaf: ..." in the recipe reference, or `leaf` in prose or a table
    return bool(re.search(rf"^\s*-?\s*{re.escape(leaf)}:", README, re.M) or f"`{leaf}`" in README)


def test_every_recipe_key_is_in_the_readme():
    missing = [k for k in _fields(Recipe) if not _documented(k)]
    assert not missing, f"recipe keys without documentation in README.md: {missing}"


def test_every_backend_option_is_in_the_readme():
    missing = [f"{b}.{k}" for b in backend_names() for k in get_backend(b).Config.model_fields
               if not _documented(k)]
    assert not missing, f"backend options without documentation in README.md: {missing}"
