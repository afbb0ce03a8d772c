"""Zero-shot (or few-shot) tasks through lm-evaluation-harness's Python API, on a model that
is already in memory (each method's checkpoint reloaded from disk).

Offline, a task needs local data: lm-eval tasks can be defined in a YAML file on local
files (``dataset_path: json`` with ``dataset_kwargs.data_files``); put such files in a
directory and name it in ``eval.task_paths``. Tasks from the lm-eval registry (hellaswag,
arc_easy, piqa...) download their data sets from the Hugging Face Hub on first use.
"""

from __future__ import annotations

from functools import lru_cache

from quantlab.errors import MissingDependencyError, QuantlabError, did_you_mean


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependencyError(
            "lm-eval", "eval", "eval.tasks (lm-evaluation-harness tasks)"
        ) from None
    return lm_eval, HFLM, TaskManager


@lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    _, _, TaskManager = _lm_eval()
    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def _manager_for(names: list[str], paths: list[str]):
    """lm-eval's task index: only the local task directories when they define every task
    named (indexing lm-eval's ~15k built-in tasks takes seconds), else everything."""
    if paths:
        local = _task_manager(tuple(paths), False)
        if set(names) <= set(local.all_tasks):
            return local
    return _task_manager(tuple(paths), True)


def check_tasks(names: list[str], paths: list[str]) -> None:
    """Fail early, before anything is quantized, when a task name is unknown."""
    from pathlib import Path

    for p in paths:
        if not Path(p).is_dir():
            raise QuantlabError(
                f"eval.task_paths: '{p}' is not a directory of lm-eval task YAML files"
            )
    known = set(_manager_for(names, paths).all_tasks)
    for name in names:
        if name not in known:
            raise QuantlabError(
                f"eval.tasks: lm-eval knows no task '{name}'{did_you_mean(name, known)}; "
                "define local tasks in a directory named in eval.task_paths"
            )


def run_tasks(
    model,
    tokenizer,
    names: list[str],
    paths: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 4,
) -> dict:
    """{task: {metric: value}} with lm-eval's metric names (``acc``, ``acc_norm``, their
    ``_stderr``...), filters dropped from the keys when there is only the default one."""
    lm_eval, HFLM, _ = _lm_eval()
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=_manager_for(names, paths),
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=1000,
        )
    except Exception as e:  # lm-eval raises plain exceptions for data it cannot load
        raise QuantlabError(
            f"lm-eval could not run {', '.join(names)}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    results = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            clean[key.removesuffix(",none")] = float(value)
        results[task] = clean
    return results
