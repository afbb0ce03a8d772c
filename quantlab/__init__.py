"""quantlab: quantize causal language models, export checkpoints, reload them from disk and
benchmark them.

Public API::

    import quantlab
    # one method on a model already in memory (torchao / GPTQModel style)
    cfg = quantlab.config("gptq", bits=4, group_size=64)
    quantlab.quantize(model, cfg, tokenizer=tok, calibration="pydoc")
    quantlab.save(model, "ckpt/gptq", tokenizer=tok)
    loaded = quantlab.load("ckpt/gptq", kernel="auto")
    # a recipe: several methods, scored from disk, speed, reports, resume
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
    caveats,
    config,
    evaluate,
    load,
    load_checkpoint,
    load_metrics,
    load_model,
    load_recipe,
    load_results,
    parse_recipe,
    quantize,
    run_recipe,
    save,
    summary_table,
    write_report,
)
from quantlab.errors import QuantlabError, RecipeError  # noqa: E402

__all__ = [
    "__version__",
    "QuantlabError",
    "RecipeError",
    "backends",
    "caveats",
    "config",
    "evaluate",
    "load",
    "load_checkpoint",
    "load_metrics",
    "load_model",
    "load_recipe",
    "load_results",
    "parse_recipe",
    "quantize",
    "run_recipe",
    "save",
    "summary_table",
    "write_report",
]
