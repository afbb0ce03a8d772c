"""Reports: results tables (CSV, Parquet, Markdown), plots, the self-contained HTML report,
`quantlab report` / `quantlab compare`, and their errors on bad input. Runs are real runs of
the tiny model (seconds)."""

from __future__ import annotations

import base64
import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantlab
from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.report.caveats import engine_disagreements
from quantlab.report.plots import pareto_front
from quantlab.report.tables import format_summary, markdown_table, summary_frame


def _recipe(tiny_model_dir: Path, out: Path, name: str, methods: str, speed: bool = True) -> Path:
    path = out.parent / f"{name}.yaml"
    path.write_text(f"""
model: {{source: "{tiny_model_dir}"}}
methods:
{methods}
eval:
  seq_len: 64
  max_windows: 4
  batch_size: 2
  speed: {{enabled: {str(speed).lower()}, prompt_tokens: 8, new_tokens: 4, warmup: 0, repeats: 2,
          batch_size: 1}}
output: {{dir: "{out}"}}
""")
    return path


RTN = """  - {label: rtn-w4, backend: rtn, options: {bits: 4, group_size: 32}}
  - {label: rtn-w3, backend: rtn, options: {bits: 3, group_size: 32}}
"""
GPTQ = """  - {label: gptq-w4, backend: gptq, options: {bits: 4, group_size: 32}}
"""


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Two real runs of the tiny model: RTN at 4 and 3 bits; GPTQ (per-layer statistics)."""
    root = tmp_path_factory.mktemp("report-runs")
    a, b = root / "rtn", root / "gptq"
    assert main(["run", str(_recipe(tiny_model_dir, a, "rtn", RTN))]) == 0
    assert (
        main(
            [
                "run",
                str(_recipe(tiny_model_dir, b, "gptq", GPTQ, speed=False)),
                "--set",
                "calibration.samples=4",
                "--set",
                "calibration.seq_len=64",
            ]
        )
        == 0
    )
    return a, b


class _Page(HTMLParser):
    """The parts of the report a reader sees: table rows, images, references out of the file."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.external, self.scripts = 0, [], [], 0
        self._in_results = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "results" in (a.get("class") or ""):
            self._in_results = True
        if tag == "tr" and self._in_results:
            self.rows += 1
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "script":
            self.scripts += 1
            if a.get(
                "src"
            ):  # a script from a file or the network: the report would not be one file
                self.external.append(a["src"])
        for key in ("src", "href"):
            if re.match(r"^(https?:)?//", a.get(key) or ""):
                self.external.append(a[key])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_results = False


def _png_dims(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_a_run_writes_parquet_markdown_plots_and_a_self_contained_report(runs):
    run, _ = runs
    csv = pd.read_csv(run / "results.csv")
    parquet = pd.read_parquet(run / "results.parquet")
    assert list(parquet["method"]) == list(csv["method"]) == ["baseline", "rtn-w4", "rtn-w3"]
    pd.testing.assert_series_equal(parquet["ppl"], csv["ppl"])
    assert csv["model"].notna().all() and csv["session"].nunique() == 1

    md = (run / "results.md").read_text().splitlines()
    assert len(md) == 2 + 3 and md[0].startswith("| method |")
    assert len({line.count(" | ") for line in md}) == 1  # every row has every column

    for name in ("quality_vs_size", "speed", "layer_error", "quantization_cost"):
        for ext in ("png", "svg"):
            assert (run / "plots" / f"{name}.{ext}").stat().st_size > 2000, name

    page = _Page()
    html = (run / "report.html").read_text()
    page.feed(html)
    assert page.rows == 1 + 3  # header + one row per method
    # one inline script (sorting, column choice), nothing loaded from elsewhere
    assert len(page.images) == 5 and page.external == [] and page.scripts == 1
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        w, h = _png_dims(base64.b64decode(src.split(",", 1)[1]))
        assert w > 300 and h > 200
    for needle in (
        "rtn-w4",
        "rtn-w3",
        "convention",
        "gptq",
        "pydoc:evaluation",
        "float32",
        "recipe.yaml",
    ):
        assert needle in html


def test_gptq_run_without_speed_draws_the_layer_heatmap_and_names_its_worst_layer(runs):
    _, gptq = runs
    assert (gptq / "plots" / "layer_error.png").is_file() and not (
        gptq / "plots" / "speed.png"
    ).exists()
    html = (gptq / "report.html").read_text()
    assert "Per-layer quantization error" in html and "Layers with the largest error" in html
    metrics = quantlab.load_metrics(gptq)
    worst = max(metrics["gptq-w4"]["layers"].items(), key=lambda kv: kv[1]["weight_rel_error"])[0]
    assert worst in html  # the worst layer is named in the method's details


def test_load_results_and_summary_compare_each_run_with_its_own_baseline(runs):
    a, b = runs
    frame = quantlab.load_results([a, b])
    assert len(frame) == 5 and frame["run"].nunique() == 2
    table = summary_frame(frame)
    assert table.columns[0] == "run"
    for run, part in frame.groupby("run"):
        base = part[part["backend"] == "none"]["ppl"].iloc[0]
        rows = table[table["run"] == run]
        for method, ppl in zip(part["method"], part["ppl"]):
            got = float(rows[rows["method"] == method]["Δppl_%"].iloc[0])
            assert got == pytest.approx((ppl / base - 1) * 100, abs=0.006)
    # the run without speed figures has empty speed cells, not zeros
    assert (table[table["run"] == str(b)]["decode_tok/s (min-max)"] == "").all()


def test_compare_command_writes_one_report_across_runs(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gptq-w4" in printed and "rtn-w3" in printed and str(out / "report.html") in printed
    # the terminal says what the HTML says (one set of caveats): two fresh runs were measured in
    # two sessions, which is no resume and no reason for "--force"
    from quantlab.report.caveats import report_warnings
    from quantlab.report.data import load_runs

    loaded = load_runs([a, b])
    for w in report_warnings(loaded, pd.concat([r.frame.assign(run=str(r.path)) for r in loaded])):
        assert f"WARNING: {w}" in printed
    assert "SPEED FROM AN EARLIER SESSION" not in printed and "--force" not in printed
    # two runs that both measured speed, in two sessions: no resume happened, nothing to warn of
    # (the single-run rule would say "SPEED FROM AN EARLIER SESSION ... --force re-measures")
    import shutil

    older = tmp_path / "rtn-older"
    shutil.copytree(a, older, ignore=shutil.ignore_patterns(".quantlab.lock"))
    table = pd.read_csv(older / "results.csv")
    table["speed_session"] = "2026-01-01T00:00:00+00:00"
    table.to_csv(older / "results.csv", index=False)
    (older / "results.parquet").unlink(missing_ok=True)
    both = pd.concat([pd.read_csv(p / "results.csv").assign(run=str(p)) for p in (a, older)])
    assert "SPEED FROM AN EARLIER SESSION" in format_summary(both)  # what the single-run rule says
    assert main(["compare", str(a), str(older), "--out", str(tmp_path / "cmp2")]) == 0
    assert "SPEED FROM AN EARLIER SESSION" not in capsys.readouterr().out
    combined = pd.read_parquet(out / "results.parquet")
    assert sorted(combined["run"].unique()) == sorted([str(a), str(b)])
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.rows == 1 + 5 and page.external == [] and len(page.images) >= 3
    # regenerating a single run's report in place
    assert main(["report", str(a)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_a_resumed_run_measures_every_rows_speed_again_together(tiny_model_dir, tmp_path, capsys):
    """Rows reused on resume keep their older session, but their speed is measured again
    with the new rows (the speed phase): no speed of another session sits beside them."""
    out = tmp_path / "run"
    recipe = _recipe(tiny_model_dir, out, "resume", RTN.splitlines()[0] + "\n")
    assert main(["run", str(recipe)]) == 0
    recipe.write_text(
        recipe.read_text().replace("methods:\n", "methods:\n" + RTN.splitlines()[1] + "\n")
    )
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert "SPEED FROM AN EARLIER SESSION" not in capsys.readouterr().out
    frame = pd.read_csv(out / "results.csv")
    assert frame["session"].nunique() == 2 and frame["speed_session"].nunique() == 1
    older = frame[frame["session"] == frame["session"].min()]["method"].tolist()
    assert sorted(older) == ["baseline", "rtn-w4"]
    assert "measured in an earlier session" not in (out / "report.html").read_text()
    # a table from before the speed phase (no speed_session) still gets the warning
    old = frame.drop(columns=["speed_session", "decode_x_float", "decode_x_min", "decode_x_max"])

    assert "SPEED FROM AN EARLIER SESSION" in format_summary(old)


def test_engines_that_disagree_are_flagged():
    frame = pd.DataFrame(
        [
            {"method": "a", "backend": "int8-dynamic", "ppl": 14.58, "ppl_stderr": None},
            {"method": "b", "backend": "int8-dynamic", "ppl": 15.75, "ppl_stderr": None},
            {"method": "c", "backend": "int8-dynamic", "ppl": 14.59, "ppl_stderr": None},
        ]
    )
    opts = {"activations": "per-token", "skip": ["lm_head"]}
    metrics = {
        "a": {"options": dict(opts, engine="torchao")},
        "b": {"options": dict(opts, engine="fbgemm")},
        "c": {"options": dict(opts, engine="fbgemm2")},
    }
    found = engine_disagreements(frame, metrics)
    assert len(found) == 2 and all("b (engine fbgemm" in f for f in found)  # a~c agree within 1%
    metrics["c"]["options"]["activations"] = "per-tensor"  # different options: not a pair
    assert len(engine_disagreements(frame, metrics)) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 100)), min_size=1, max_size=25))
def test_pareto_front_is_exactly_the_non_dominated_points(points):
    pts = [(float(x), float(y)) for x, y in points]
    front = pareto_front(pts)
    # brute force: a point is on the front unless another is no worse on both and better on one
    expected = {p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}
    assert set(front) == expected
    assert [x for x, _ in front] == sorted(x for x, _ in front)


def test_markdown_table_escapes_pipes_and_right_aligns_numbers():
    md = markdown_table(
        pd.DataFrame({"method": ["a|b", "c"], "ppl": ["1.5", "+2.0"], "note": ["", "x"]})
    )
    lines = md.splitlines()
    assert lines[1] == "| --- | ---: | --- |"
    assert lines[2] == "| a\\|b | 1.5 |  |"


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: None, "holds no results.csv"),
        (
            lambda d: (d / "results.csv").write_bytes(b"\x00\xff\xfe garbage \x00" * 50),
            "cannot be read as a results table",
        ),
        (lambda d: (d / "results.csv").write_text("a,b\n1,2\n"), "not a quantlab results table"),
        (lambda d: (d / "results.csv").write_text("method,backend,ppl\n"), "holds no results rows"),
    ],
)
def test_report_on_bad_input_is_one_clear_error(tmp_path, capsys, make, needle):
    d = tmp_path / "notarun"
    d.mkdir()
    make(d)
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("error:")
    assert not (d / "report.html").exists()


def test_report_errors_for_damaged_metrics_missing_dirs_and_bad_outputs(runs, tmp_path, capsys):
    a, _ = runs
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a directory of runs: the error names the runs inside it
    assert main(["report", str(a.parent)]) == 2
    assert str(a) in capsys.readouterr().err
    # same run twice
    assert main(["compare", str(a), str(a), "--out", str(tmp_path / "x")]) == 2
    assert "twice" in capsys.readouterr().err
    # --out is a file
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["report", str(a), "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    # a damaged metrics.json: the error names it, the earlier report survives
    damaged = tmp_path / "copy"
    import shutil

    shutil.copytree(a, damaged, ignore=shutil.ignore_patterns("checkpoint"))
    before = (damaged / "report.html").read_text()
    (damaged / "rtn-w4" / "metrics.json").write_text("{not json")
    assert main(["report", str(damaged)]) == 2
    assert "rtn-w4/metrics.json' is damaged" in capsys.readouterr().err
    assert (damaged / "report.html").read_text() == before


def test_load_results_errors_are_quantlab_errors(tmp_path):
    with pytest.raises(QuantlabError, match="holds no results.csv"):
        quantlab.load_results(tmp_path)
    with pytest.raises(QuantlabError, match="no run directories"):
        quantlab.load_results([])


def test_report_json_free_of_nan_and_checkpoint_missing_is_flagged(runs, tmp_path):
    a, _ = runs
    import shutil

    copy = tmp_path / "moved"
    shutil.copytree(a, copy, ignore=shutil.ignore_patterns("checkpoint"))
    path = quantlab.write_report(copy)
    html = path.read_text()
    assert "is no longer on disk" in html and "nan" not in re.sub(r"<[^>]+>", " ", html).split()
    assert (
        json.loads((copy / "rtn-w4" / "metrics.json").read_text())["checkpoint"]
        == "rtn-w4/checkpoint"
    )


def test_few_scored_tokens_are_a_warning_with_the_standard_error():
    from quantlab.report.caveats import FEW_TOKENS, few_tokens

    frame = pd.DataFrame(
        [
            {"method": "a", "ppl": 10.0, "ppl_stderr": 0.2, "eval_tokens": 2044},
            {"method": "b", "ppl": 12.0, "ppl_stderr": 0.24, "eval_tokens": 2044},
        ]
    )
    msg = few_tokens(frame)
    assert "only 2044 scored tokens" in msg and "±2.0%" in msg and "eval.max_windows" in msg
    assert few_tokens(frame.assign(eval_tokens=FEW_TOKENS)) is None
    assert "standard error" not in few_tokens(frame.assign(ppl_stderr=None))


def test_a_directory_of_runs_is_a_leaderboard(runs, tmp_path, capsys):
    """`quantlab compare runs/`: every run directly inside, one table."""
    from quantlab.report.data import load_runs

    a, b = runs
    loaded = load_runs(a.parent)
    assert [r.path for r in loaded] == sorted([a, b])
    out = tmp_path / "board"
    assert main(["compare", str(a.parent), "--out", str(out)]) == 0
    table = pd.read_csv(out / "results.csv")
    assert set(table["run"]) == {str(a), str(b)} and len(table) == len(loaded[0].frame) + len(
        loaded[1].frame
    )


def test_summary_of_rows_that_all_failed_is_a_table_not_a_traceback():
    # rows built in memory (the Ray executor's view) hold None where every method failed
    from quantlab.report.tables import summary_frame
    from quantlab.results import results_frame

    rows = [
        {"method": "baseline", "backend": "none", "ppl": None, "error": "oom"},
        {"method": "rtn-w4", "backend": "rtn", "ppl": None, "error": "oom"},
    ]
    table = summary_frame(results_frame(rows))
    assert list(table["method"]) == ["baseline", "rtn-w4"] and list(table["ppl"]) == ["nan", "nan"]


def test_serving_columns_follow_the_schema_by_engine_then_concurrency():
    from quantlab.results import check_row, results_frame

    row = {"method": "a", "backend": "rtn", "serving_error": None}
    row |= {f"serving_vllm_c{n}_{w}": 1.0 for n in (8, 1, 16) for w in ("x_float", "tok_s")}
    row["serving_llamacpp_c4_tok_s"] = 2.0
    frame = results_frame([check_row(row)])
    serving = [c for c in frame.columns if c.startswith("serving_") and c != "serving_error"]
    assert serving == [
        "serving_llamacpp_c4_tok_s",
        "serving_vllm_c1_tok_s",
        "serving_vllm_c1_x_float",
        "serving_vllm_c8_tok_s",
        "serving_vllm_c8_x_float",
        "serving_vllm_c16_tok_s",
        "serving_vllm_c16_x_float",
    ]
