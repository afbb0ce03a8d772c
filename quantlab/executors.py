"""Executors: who runs the methods of a run plan.

- ``local``: one after another in this process (the first quantizes the base model the
  driver already loaded). A failing method stops the run, as an error in one process does.
- ``ray``: each method is a Ray task with the resources its recipe entry asks for
  (``resources: {cpus, gpus}``); workers read the plan from the run directory (on a cluster:
  storage every node mounts at the same path) and write only their method's directory. A task
  whose worker dies is run again (``executor.max_retries``), and the driver's log says so; a
  method that still fails gets a row carrying its error, and the other methods finish. The
  driver writes results and report.

Both call :func:`quantlab.runner.run_method`, so the resume rules are the same. The rules
this module keeps:

- what an executor needs from the world (Ray installed, the cluster answering, every
  method's resources on one of its nodes) is checked by :func:`check_executor` before any
  model is loaded;
- an executor that stops early (Ctrl-C, an error in the driver) keeps what finished: every
  method whose row is complete reaches ``on_result`` (so the results table holds it), Ray's
  outstanding tasks are cancelled, and this run's ``LABEL/running.json`` markers are removed;
  then the interruption or error goes on to the caller.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Callable

from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.plan import RunPlan
from quantlab.records import atomic_write_json
from quantlab.results import MethodResult
from quantlab.runner import (
    clear_running,
    finished,
    log,
    new_run_id,
    note_running,
    read_running,
    reused,
    run_method,
)

OnResult = Callable[[MethodResult], None]

#: seconds between the driver's looks at the running tasks' markers (retries are logged then)
POLL_S = 1.0
#: seconds a stopping driver waits for cancelled tasks (and their processes here) to end
STOP_WAIT_S = 15.0


def execute(plan: RunPlan, base, on_result: OnResult) -> None:
    """Run every method of ``plan`` with the executor its recipe names (``base``: the float
    LoadedModel the plan was prepared with; the executor owns it)."""
    run = new_run_id()
    if plan.recipe.executor.kind == "ray":
        RayExecutor(plan, run).run(base, on_result)
    else:
        run_local(plan, base, on_result, run)


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


def run_local(plan: RunPlan, base, on_result: OnResult, run: str | None = None) -> None:
    methods = plan.recipe.all_methods()
    spare = [base]
    run = run or new_run_id()

    def take_base():
        """The loaded base model for the first method that quantizes; later ones reload it
        (under a second for local sources), so one model is in memory, not two."""
        if spare:
            return spare.pop()
        gc.collect()
        return plan.load_base()

    for i, method in enumerate(methods, 1):
        position = f"[{i}/{len(methods)}] "
        # an interruption inside run_method removes its marker; every finished row has
        # already reached on_result (the results table is rewritten after each)
        on_result(
            reused(plan, method, position + method.label)
            or run_method(plan, method, position=position, take_base=take_base, run=run)
        )
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
        raise QuantlabError(
            f"cannot connect to Ray at {where}: {first}; start one with "
            "`ray start --head` or fix executor.address / --address"
        ) from None
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
            raise QuantlabError(
                f"method '{m.label}' asks for {cpus:g} CPUs and {gpus:g} GPUs; no node of the Ray "
                f"cluster has them ({have or 'no nodes'}): lower its resources"
            )


def _method_task(run_dir: str, label: str, threads: int | None, run: str) -> tuple[dict, dict]:
    """A Ray task: one method of the plan in ``run_dir``; returns its row and this attempt's
    marker (errors raise). Its ``running.json`` is written first, so even an attempt that dies
    while loading the plan is counted and the next one says it is a retry; the marker comes
    back with the row because a retry that ends between two polls of the driver has removed
    its file before the driver could read it."""
    from pathlib import Path

    from quantlab.rundir import RunDir

    mdir = RunDir(Path(run_dir)).method(label)
    note = note_running(mdir, run)
    try:
        return _method_row(run_dir, label, threads, run), note
    finally:
        clear_running(mdir, run, mine=True)


def _method_row(run_dir: str, label: str, threads: int | None, run: str) -> dict:
    import torch

    from quantlab.models import quiet_progress_bars

    if threads:
        torch.set_num_threads(threads)
    quiet_progress_bars()
    plan = RunPlan.load(run_dir)
    method = next(m for m in plan.recipe.all_methods() if m.label == label)
    # a retried task may find its earlier attempt's result complete
    return (reused(plan, method, label) or run_method(plan, method, run=run)).row


class RayExecutor:
    def __init__(self, plan: RunPlan, run: str | None = None):
        self.plan = plan
        self.run_id = run or new_run_id()
        self.ray = _ray()
        self.attempts: dict[str, int] = {}  # the latest attempt logged, per method

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
        pending: dict = {}
        try:
            self._submit(todo, pending)
            log(f"ray: {len(todo)} methods submitted ({', '.join(m.label for m in todo)})")
            self._collect(pending, on_result)
        except BaseException as e:  # Ctrl-C, or an error in the driver: keep what finished
            self._stop(pending, on_result, e)
            raise

    def _submit(self, todo, pending: dict) -> None:
        plan, spec = self.plan, self.plan.recipe.executor
        task = self.ray.remote(_method_task)
        for m in todo:
            options = task.options(
                max_retries=spec.max_retries,
                retry_exceptions=False,
                name=f"quantlab:{m.label}",
                **task_resources(m, plan.device),
            )
            ref = options.remote(str(plan.run_dir.root), m.label, plan.threads_for(m), self.run_id)
            pending[ref] = m

    def _collect(self, pending: dict, on_result: OnResult) -> None:
        """Each task's row (or its error) to ``on_result`` as it ends; a method leaves
        ``pending`` only once ``on_result`` has taken it."""
        ray = self.ray
        while pending:
            self._log_retries(pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if ready:
                self._deliver(ready[0], pending[ready[0]], on_result)
                del pending[ready[0]]

    def _deliver(self, ref, method, on_result: OnResult) -> None:
        try:
            row, note = self.ray.get(ref)
        except Exception as e:  # the task's error, after its retries
            msg = _task_error(e)
            log(f"{method.label}: failed on Ray: {msg}")
            mdir = self.plan.run_dir.method(method.label)
            clear_running(mdir, self.run_id)  # a worker that died could not remove it
            atomic_write_json(
                self.plan.run_dir.error(method.label), {"method": method.label, "error": msg}
            )
            on_result(MethodResult(method.label, error=msg))
            return
        self._log_retry(method, note)  # when no poll saw the retry's marker
        log(f"{method.label}: done on {row.get('worker', 'a worker')} (ppl {row['ppl']:.3f})")
        on_result(MethodResult(method.label, row))

    def _log_retries(self, methods) -> None:
        """A progress line for each task Ray runs again: which method, which attempt, and
        why (read from the markers: an attempt's marker is left only by a process that died)."""
        for m in methods:
            self._log_retry(m, read_running(self.plan.run_dir.method(m.label, create=False)))

    def _log_retry(self, method, note: dict | None) -> None:
        """One line per attempt after the first, once, from that attempt's marker."""
        if note is None or note.get("run") != self.run_id:
            return
        attempt = int(note.get("attempt") or 1)
        if attempt <= self.attempts.get(method.label, 1):
            return
        self.attempts[method.label] = attempt
        total = self.plan.recipe.executor.max_retries + 1
        prev = note.get("previous") or {}
        log(
            f"{method.label}: Ray runs it again, attempt {attempt} of {total} "
            f"(on {note.get('host')}, pid {note.get('pid')}): attempt {attempt - 1}'s worker "
            f"(on {prev.get('host')}, pid {prev.get('pid')}) died before the method finished "
            "(killed, crashed, out of memory or its node lost; Ray retries a task only then)"
        )

    def _stop(self, pending: dict, on_result: OnResult, why: BaseException) -> None:
        """Stopping early: cancel the outstanding tasks, wait (a bounded time) for them to
        end, remove this run's markers of their methods, and hand every method whose row is
        complete on disk (finished, or finished while being cancelled) to ``on_result``."""
        if not pending:
            return
        methods = list(pending.values())
        interrupted = isinstance(why, KeyboardInterrupt)
        what = "interrupted" if interrupted else f"stopping ({type(why).__name__})"
        labels = ", ".join(m.label for m in methods)
        log(f"ray: {what}: cancelling {len(methods)} tasks ({labels}); keeping what finished")
        try:
            self._cancel(list(pending))
        except Exception as e:  # noqa: BLE001 (the cluster itself may be what failed)
            log(f"ray: cancelling failed ({type(e).__name__}: {e})")
        deadline = time.monotonic() + STOP_WAIT_S  # one bound for all, not one per method
        for m in methods:
            self._settle(m, on_result, deadline)

    def _cancel(self, refs: list) -> None:
        """Cancel the tasks not ended yet: first as Ctrl-C inside the task (its process cleans
        up), then, for those still running after a bounded wait, by killing their worker.
        (Ended tasks are not cancelled: a cancel racing a task's completion once crashed the
        driver's Ray core here.)"""
        ray = self.ray
        _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
        for force in (False, True):
            if not running:
                return
            for ref in running:
                try:
                    ray.cancel(ref, force=force)
                except Exception:  # noqa: BLE001 (a task that ended meanwhile cannot be cancelled)
                    pass
            _, running = ray.wait(running, num_returns=len(running), timeout=STOP_WAIT_S / 2)

    def _settle(self, method, on_result: OnResult, deadline: float) -> None:
        """After a cancel: the method's marker removed once its process is gone (or at
        ``deadline``), and its row kept when it is complete."""
        mdir = self.plan.run_dir.method(method.label, create=False)
        _wait_gone(read_running(mdir), self.run_id, deadline)
        clear_running(mdir, self.run_id)
        row = finished(self.plan, method)
        if row is None:
            return
        log(f"{method.label}: finished before the run stopped; kept")
        try:
            on_result(MethodResult(method.label, row))
        except Exception as e:  # noqa: BLE001 (the row is on disk; what stopped us goes on)
            log(f"{method.label}: could not add it to the results table ({type(e).__name__}: {e})")


def _wait_gone(note: dict | None, run: str, deadline: float) -> None:
    """Wait (until ``deadline``, a time.monotonic()) for the process a marker of ``run`` names
    on this host to exit, so it can write nothing after its marker is removed."""
    if note is None or note.get("run") != run or note.get("host") != socket.gethostname():
        return
    while time.monotonic() < deadline:
        try:
            os.kill(int(note["pid"]), 0)
        except (ProcessLookupError, ValueError, TypeError, KeyError):
            return
        except PermissionError:  # alive, another user's
            pass
        time.sleep(0.1)


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
        raise QuantlabError(
            f"cannot connect to Ray at {address}: {why}; start one "
            "with `ray start --head` or fix executor.address / --address"
        ) from None


def _task_error(e: BaseException) -> str:
    """One line for a failed Ray task: the QuantlabError's message, or the error type and
    its first line (a worker that died says so)."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, QuantlabError):
        return str(cause)
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {first}"
