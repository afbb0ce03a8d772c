"""The package's import graph reads one way (issue 27): no cycle, function-level imports
included; the layouts (``formats``) never reach into the methods (``quantizers``); the pure
grid functions import nothing of quantlab's. An AST walk, so no module is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantlab"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the quantlab modules it imports anywhere (module level or in a function).
    The root package is left out as a target: modules read ``__version__`` from it."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for t in _targets(node, m, path.name == "__init__.py"):
                if t in mods and t not in (m, "quantlab"):
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_formats_never_import_quantizers(graph):
    bad = {
        m: sorted(t for t in ts if t.startswith("quantlab.quantizers"))
        for m, ts in graph.items()
        if m.startswith("quantlab.formats")
    }
    assert not {m: ts for m, ts in bad.items() if ts}


def test_grid_functions_import_nothing_of_quantlab(graph):
    assert graph["quantlab.grid"] == set()


def test_methods_share_through_weightonly_not_through_each_other(graph):
    methods = {
        "quantlab.quantizers.rtn",
        "quantlab.quantizers.gptq",
        "quantlab.quantizers.awq",
        "quantlab.quantizers.hqq",
    }
    for m in methods:
        assert not graph[m] & methods, f"{m} imports {sorted(graph[m] & methods)}"


def test_the_run_draws_and_prints_nothing(graph):
    """The run (plan, executors, one method, the pipeline, the speed phase) writes data; the
    report, plots and terminal summary are the caller's (quantlab.report.publish)."""
    run = [
        "quantlab.pipeline",
        "quantlab.runner",
        "quantlab.executors",
        "quantlab.plan",
        "quantlab.speedphase",
        "quantlab.measure",
    ]
    for m in run:
        assert not {t for t in graph[m] if t.startswith("quantlab.report")}, m


def test_every_name_the_run_directory_uses_is_reserved_for_labels(tmp_path):
    """RESERVED_LABELS drifted once (plan.json was missing): it is derived from the layout now,
    and every top-level path RunDir builds is in that layout."""
    from quantlab.layout import RUN_ENTRIES
    from quantlab.recipe import RESERVED_LABELS
    from quantlab.rundir import RunDir

    rd = RunDir(tmp_path)
    built = [
        rd.plan_json,
        rd.plan_tensors,
        rd.recipe,
        rd.reference(),
        rd.allocation_cache("k" * 32),
        *(rd.results(s) for s in ("csv", "parquet", "md")),
    ]
    assert {p.relative_to(tmp_path).parts[0] for p in built} <= RUN_ENTRIES
    assert {n.lower() for n in RUN_ENTRIES} == RESERVED_LABELS


def test_run_file_names_live_only_in_the_layout_module():
    """Each file name of a run directory is spelled once (quantlab/layout.py); every other
    module uses the name, so a renamed file cannot leave a reader behind."""
    import quantlab.layout as layout

    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and "." in v}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_the_linter_passes_lines_included():
    """ruff (the dev extra) with the project's rules, E501 at 100 columns among them: a long
    line or an unused import fails here, not in a reviewer's eyes."""
    root = Path(__file__).resolve().parents[1]
    rules = (root / "pyproject.toml").read_text(encoding="utf-8")
    assert 'ignore = ["B905"]' in rules and "line-length = 100" in rules
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "quantlab", "tests", "scripts"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
