"""Executors: who runs the methods of a run plan.

- ``local``: one after another in this process (the first quantizes the base model the
  driver already loaded). A failing method stops the run, as an error in one process does.
- ``ray``: each method is a Ray task with the resources its recipe entry asks for
  (``resources: {cpus, gpus}``); workers read the plan from the run directory (on a cluster:
  storage every node mounts at the same path) and write only their method's directory. A task
  whose worker dies is run again (``executor.max_retries``); a method that still fails gets a
  row carrying its error, and the other methods finish. The driver writes results and report.

Both call :func:`quantlab.runner.run_method`, so the resume rules are the same. What an
executor needs from the world (Ray installed, the cluster answering, every method's resources
on one of its nodes) is checked by :func:`check_executor` before any model is loaded.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable

from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.plan import RunPlan
from quantlab.results import MethodResult
from quantlab.runner import log, reused, run_method
from quantlab.runs import atomic_write_json

OnResult = Callable[[MethodResult], None]


def execute(plan: RunPlan, base, on_result: OnResult) -> None:
    """Run every method of ``plan`` with the executor its recipe names (``base``: the float
    LoadedModel the plan was prepared with; the executor owns it)."""
    if plan.recipe.executor.kind == "ray":
        RayExecutor(plan).run(base, on_result)
    else:
        run_local(plan, base, on_result)


def check_executor(recipe, device) -> None:
    """Before any work: the executor the recipe names can run its methods. For Ray: the
    library is installed, the cluster answers (a local one is started) and every method's
    resources fit one of its nodes. A failed check leaves no cluster this call started."""
    if recipe.executor.kind != "ray":
        return
    ray = _ray()
    started = connect(ray, recipe.executor)
    try:
        check_resources(ray, recipe.all_methods(), str(device))
    except QuantlabError:
        if started:
            ray.shutdown()
        raise


def run_local(plan: RunPlan, base, on_result: OnResult) -> None:
    methods = plan.recipe.all_methods()
    spare = [base]

    def take_base():
        """The loaded base model for the first method that quantizes; later ones reload it
        (under a second for local sources), so one model is in memory, not two."""
        if spare:
            return spare.pop()
        gc.collect()
        return plan.load_base()

    for i, method in enumerate(methods, 1):
        position = f"[{i}/{len(methods)}] "
        on_result(reused(plan, method, position + method.label)
                  or run_method(plan, method, position=position, take_base=take_base))
        gc.collect()


# --------------------------------------------------------------------------- ray


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "ray", "executor 'ray'") from None
    return ray


def connect(ray, spec) -> bool:
    """Join the cluster ``spec`` names (else start a local one); True when this call started
    the connection (False: Ray was connected already)."""
    if ray.is_initialized():
        return False
    kw = {"address": spec.address} if spec.address else {"num_cpus": os.cpu_count() or 1}
    if spec.address:
        _reachable(spec.address)
    try:
        ray.init(include_dashboard=False, log_to_driver=True, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = spec.address or "a local cluster"
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise QuantlabError(f"cannot connect to Ray at {where}: {first}; start one with "
                            "`ray start --head` or fix executor.address / --address") from None
    return True


def task_resources(method, device: str) -> dict:
    """What one method's task asks Ray for (``gpus`` defaults to 1 on a CUDA device)."""
    r = method.resources
    gpus = r.gpus if r.gpus is not None else (1 if device.startswith("cuda") else 0)
    return {"num_cpus": r.cpus, "num_gpus": gpus}


def check_resources(ray, methods, device: str) -> None:
    """Every task fits one node of the cluster (else Ray would wait for ever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for m in methods:
        want = task_resources(m, device)
        cpus, gpus = want["num_cpus"], want["num_gpus"]
        if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
            raise QuantlabError(f"method '{m.label}' asks for {cpus:g} CPUs and {gpus:g} GPUs; "
                                "no node of the Ray cluster has them "
                                f"({have or 'no nodes'}): lower its resources")


def _method_task(run_dir: str, label: str, threads: int | None) -> dict:
    """A Ray task: one method of the plan in ``run_dir``; returns its row (errors raise)."""
    import torch

    from quantlab.models import quiet_progress_bars

    if threads:
        torch.set_num_threads(threads)
    quiet_progress_bars()
    plan = RunPlan.load(run_dir)
    method = next(m for m in plan.recipe.all_methods() if m.label == label)
    # a retried task may find its earlier attempt's result complete
    return (reused(plan, method, label) or run_method(plan, method)).row


class RayExecutor:
    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.ray = _ray()

    def run(self, base, on_result: OnResult) -> None:
        base.model = None  # each task loads its own; the driver keeps none
        gc.collect()
        plan, ray = self.plan, self.ray
        todo = []
        for m in plan.recipe.all_methods():
            earlier = reused(plan, m, m.label)
            if earlier is not None:
                on_result(earlier)
            else:
                todo.append(m)
        if not todo:
            return
        connect(ray, plan.recipe.executor)  # done before any work (check_executor); for direct use
        check_resources(ray, todo, plan.device)
        task = ray.remote(_method_task)
        spec = plan.recipe.executor
        pending = {}
        for m in todo:
            options = task.options(max_retries=spec.max_retries, retry_exceptions=False,
                                   name=f"quantlab:{m.label}", **task_resources(m, plan.device))
            ref = options.remote(str(plan.run_dir.root), m.label, plan.threads_for(m))
            pending[ref] = m
        log(f"ray: {len(todo)} methods submitted ({', '.join(m.label for m in todo)})")
        self._collect(pending, on_result)

    def _collect(self, pending: dict, on_result: OnResult) -> None:
        ray = self.ray
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            method = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except Exception as e:  # the task's error, after its retries
                msg = _task_error(e)
                log(f"{method.label}: failed on Ray: {msg}")
                atomic_write_json(self.plan.run_dir.error(method.label), {"method": method.label, "error": msg})
                on_result(MethodResult(method.label, error=msg))
                continue
            log(f"{method.label}: done on {row.get('worker', 'a worker')} (ppl {row['ppl']:.3f})")
            on_result(MethodResult(method.label, row))


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A clear error at once for a cluster address nobody listens on (Ray itself keeps
    retrying for minutes)."""
    hostport = address.split("://", 1)[-1]
    if hostport == "auto" or ":" not in hostport:
        return  # 'auto' finds a running cluster itself (and says so quickly when there is none)
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or e
        raise QuantlabError(f"cannot connect to Ray at {address}: {why}; start one "
                            "with `ray start --head` or fix executor.address / --address") from None


def _task_error(e: BaseException) -> str:
    """One line for a failed Ray task: the QuantlabError's message, or the error type and
    its first line (a worker that died says so)."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, QuantlabError):
        return str(cause)
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {first}"
