"""quantlab: quantize causal language models, export checkpoints, reload them from disk and
benchmark them.

Public API::

    import quantlab
    recipe = quantlab.load_recipe("recipes/rtn_int4.yaml", overrides=["calibration.samples=32"])
    run = quantlab.run_recipe(recipe, out="runs/rtn")
    run.results                     # pandas DataFrame, one row per method
    quantlab.load_results("runs/rtn")      # or several run directories at once
    quantlab.summary_table(quantlab.load_results(["runs/a", "runs/b"]))
    quantlab.write_report("runs/rtn")        # runs/rtn/report.html
"""

__version__ = "0.1.0"

from quantlab.api import (  # noqa: E402
    backends,
    evaluate,
    load_checkpoint,
    load_metrics,
    load_model,
    load_recipe,
    load_results,
    parse_recipe,
    run_recipe,
    summary_table,
    write_report,
)
from quantlab.errors import QuantlabError, RecipeError  # noqa: E402

__all__ = [
    "__version__",
    "QuantlabError",
    "RecipeError",
    "backends",
    "evaluate",
    "load_checkpoint",
    "load_metrics",
    "load_model",
    "load_recipe",
    "load_results",
    "parse_recipe",
    "run_recipe",
    "summary_table",
    "write_report",
]
