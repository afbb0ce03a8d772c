"""The documentation: every recipe key and backend option is documented (README.md or a page
of docs/), every relative link resolves (file and heading), and the README stays a README."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from quantlab.recipe import Recipe
from quantlab.registry import backend_names, get_backend

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = "\n".join(p.read_text() for p in PAGES)


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
    return bool(re.search(rf"^\s*-?\s*{re.escape(leaf)}:", TEXT, re.M) or f"`{leaf}`" in TEXT)


def test_every_recipe_key_is_documented():
    missing = [k for k in _fields(Recipe) if not _documented(k)]
    assert not missing, f"recipe keys without documentation in README.md or docs/: {missing}"


def test_every_backend_option_is_documented():
    missing = [
        f"{b}.{k}"
        for b in backend_names()
        for k in get_backend(b).Config.model_fields
        if not _documented(k)
    ]
    assert not missing, f"backend options without documentation in README.md or docs/: {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to
    '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    out, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            out.add(_anchor(line.lstrip("#")))
    return out


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code are not links
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m)]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for link in _links(page):
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken


def test_the_anchor_rule_matches_github():
    assert _anchor(" Scoring any model: `quantlab eval`") == "scoring-any-model-quantlab-eval"
    assert _anchor(" Sensitivity and skip: auto") == "sensitivity-and-skip-auto"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_stays_short_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "reference material belongs in docs/"
    heads = [line for line in readme.splitlines() if line.startswith("## ")]
    assert heads[:4] == [
        "## The two commands",
        "## A first run",
        "## Your own model",
        "## On a GPU",
    ]
