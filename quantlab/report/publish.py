"""What a person sees after ``quantlab run`` (or ``quantlab.run_recipe``): results.md after
each method, report.html and its plots, and the terminal summary.

The run itself draws and prints nothing (:mod:`quantlab.pipeline`); this module reads what it
wrote. The terminal summary carries the report's own caveats
(:func:`quantlab.report.caveats.report_warnings`): one list feeds the terminal, the HTML and
``quantlab compare``, so a warning the report shows is never missing from the terminal.
"""

from __future__ import annotations

from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.layout import REPORT_HTML, RESULTS_CSV, RESULTS_MD
from quantlab.log import log
from quantlab.records import atomic_write_text
from quantlab.report.caveats import report_warnings
from quantlab.report.data import load_runs, read_results
from quantlab.report.tables import format_summary, markdown_table, summary_frame


def results_markdown(run_dir: Path) -> None:
    """results.md from results.csv, read as the report reads it: the same table the report
    writes (the run calls this after each method when the recipe writes a report)."""
    table = summary_frame(read_results(Path(run_dir) / RESULTS_CSV))
    atomic_write_text(Path(run_dir) / RESULTS_MD, markdown_table(table))


def on_results(recipe):
    """The run's ``on_results`` hook for ``recipe``: results.md when it writes a report."""
    return results_markdown if recipe.output.report else None


def publish(recipe, result, *, echo: bool = True) -> None:
    """After a run: report.html (when ``output.report``), then, with ``echo``, the summary
    with the report's caveats and where the files are. A report that cannot be written
    (matplotlib missing, say) is a log line: the results are already on disk."""
    if recipe.models:
        _publish_models(recipe, result, echo)
        return
    if recipe.output.report:
        from quantlab.report.html import write_report

        log("writing report.html and plots")
        try:
            write_report(result.path)
        except QuantlabError as e:
            log(f"no report: {e}")
    if not echo:
        return
    runs = load_runs([result.path])
    frame = runs[0].frame
    print(format_summary(frame, runs[0].environment, warnings=report_warnings(runs, frame)))
    print(
        f"\nrun directory: {result.path}  (results.csv/.parquet/.md, per-method metrics.json "
        "and checkpoints)"
    )
    report = result.path / REPORT_HTML
    if recipe.output.report and report.is_file():
        print(f"report: {report}")


def _publish_models(recipe, result, echo: bool) -> None:
    """Several models: each run's own report, the report across them, the summary."""
    runs = load_runs(result.runs)
    if recipe.output.report:
        from quantlab.report.html import build_report, write_report

        for path in result.runs:
            write_report(path)
        log("writing the report across models")
        build_report(runs, result.path / "report", title=f"{recipe.name}: {len(runs)} models")
    if not echo:
        return
    shown = result.results.drop(columns="model_label")
    print(format_summary(shown, runs[0].environment, warnings=report_warnings(runs, shown)))
    print(f"\n{result.table.index.name}, methods x models:")
    print(result.table.to_string())
    print(f"\nrun directory: {result.path}  (one run per model; report/, methods_x_models.csv)")
