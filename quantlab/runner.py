"""One method of a run: quantize -> export -> reload from disk -> score.

:func:`run_method` reads only the plan (:mod:`quantlab.plan`) and writes only its own method
directory, so any executor can run it: in the driver's process (``local``) or as a Ray task
on another machine (``ray``). Scores never come from the object that was quantized in memory:
the checkpoint is reloaded from disk first.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

import torch

from quantlab.bench.divergence import ReferenceLogprobs
from quantlab.bench.memory import PeakRSS
from quantlab.checkpoint import export_checkpoint, load_checkpoint, read_sidecar, verify_checkpoint
from quantlab.data import sample_calibration
from quantlab.errors import QuantlabError
from quantlab.layout import RUNNING
from quantlab.log import log
from quantlab.measure import measure_checkpoint
from quantlab.plan import RunPlan
from quantlab.quantizers.base import QuantizeContext, target_linears
from quantlab.records import (
    atomic_write_json,
    finished_metrics,
    finished_stage,
    stage_key,
    write_record,
)
from quantlab.results import MethodResult, check_row
from quantlab.scoring import evaluate


class Peak:
    """Peak resident memory of the process (and peak CUDA memory) during a block."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        self._rss.__exit__(*exc)
        self.rss = self._rss.peak_bytes
        self.cuda = (
            torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        )
        return False


def finished(plan: RunPlan, method) -> dict | None:
    """The method's row when it finished earlier with the same key (and its GGUF files are
    intact), else None."""
    if plan.force:
        return None
    key, _ = plan.method_key(method)
    done = finished_metrics(plan.run_dir.method(method.label, create=False), key)
    if done is not None and done.get("gguf_file"):
        from quantlab.engines.phase import gguf_intact

        if not gguf_intact((plan.run_dir.root / done["gguf_file"]).parent):
            return None
    return done


def reused(plan: RunPlan, method, tag: str) -> MethodResult | None:
    """The method's earlier result when it may be reused (said in the log), else None; every
    executor asks this once per method before any work is scheduled."""
    done = finished(plan, method)
    if done is None:
        return None
    log(f"{tag}: finished earlier with the same settings; reusing it")
    return MethodResult(method.label, done, reused=True)


def run_method(
    plan: RunPlan, method, *, position: str = "", take_base=None, run: str | None = None
) -> MethodResult:
    """Quantize, export, reload and score one method of ``plan`` (one that :func:`reused`
    found no result for); its row is written to ``LABEL/metrics.json``. ``take_base()``: the
    float model to quantize, a LoadedModel the method then owns (default: loaded from the
    recipe's source); called only when the method quantizes. ``run``: the executor's id of
    this run (:func:`new_run_id`), recorded in ``LABEL/running.json``.

    Rule: the method's ``running.json`` is removed however this call ends (row written, an
    error, Ctrl-C); only a process that dies leaves it, and that is how a later attempt of
    the same run knows it is one (:func:`note_running`)."""
    run = run or new_run_id()
    rd = plan.run_dir
    mdir = rd.method(method.label)
    rd.error(method.label).unlink(missing_ok=True)  # an earlier attempt's failure no longer holds
    note_running(mdir, run)
    try:
        tag = f"{position}{method.label}"
        return _run_stages(plan, method, mdir, tag, take_base or plan.load_base)
    finally:
        clear_running(mdir, run, mine=True)


def _run_stages(plan: RunPlan, method, mdir: Path, tag: str, take_base) -> MethodResult:
    backend = plan.backend(method)
    key, export_key = plan.method_key(method, backend)
    stage, backend = _checkpoint(plan, method, backend, export_key, tag, take_base)
    gc.collect()
    log(f"{tag}: reload from disk and score")
    row = _score(plan, method, backend, stage, export_key, tag)
    row["key"] = key
    write_record(plan.run_dir.metrics(method.label), check_row(row))
    return MethodResult(method.label, row)


# --------------------------------------------------------------------------- running.json


def new_run_id() -> str:
    """An id for one run of a recipe (one driver process, one call of the executor): what
    tells this run's ``running.json`` markers from those an earlier, killed run left."""
    return uuid.uuid4().hex[:16]


def read_running(mdir: Path) -> dict | None:
    """The method's ``running.json``, or None (none, or not readable: it is only a note)."""
    try:
        note = json.loads((mdir / RUNNING).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return note if isinstance(note, dict) else None


def note_running(mdir: Path, run: str) -> dict:
    """Write ``LABEL/running.json``: which process (host, pid) works on the method, for which
    run, and which attempt this is. A process removes its marker however it leaves the method
    (:func:`run_method`), so a marker of the same run written by another process means that
    process died on the method: this is the next attempt (Ray ran the task again), and the
    marker names the attempt before it. Written again by the same process, nothing changes
    but the time."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    before = read_running(mdir)
    attempt, previous = 1, None
    if before is not None and before.get("run") == run:
        if {k: before.get(k) for k in me} == me:
            attempt, previous = int(before.get("attempt") or 1), before.get("previous")
        else:
            attempt = int(before.get("attempt") or 1) + 1
            previous = {k: before.get(k) for k in ("host", "pid", "attempt", "started")}
    note = dict(
        me,
        run=run,
        attempt=attempt,
        previous=previous,
        started=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    atomic_write_json(mdir / RUNNING, note)
    return note


def clear_running(mdir: Path, run: str, *, mine: bool = False) -> bool:
    """Remove the method's ``running.json`` when it belongs to ``run`` (another run's marker
    is left alone) and, with ``mine``, to this process; True when one was removed."""
    note = read_running(mdir)
    if note is None or note.get("run") != run:
        return False
    if mine and (note.get("host"), note.get("pid")) != (socket.gethostname(), os.getpid()):
        return False
    (mdir / RUNNING).unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- quantize + export


def _checkpoint(plan: RunPlan, method, backend, export_key: str, tag: str, take_base):
    """The method's checkpoint: reused when exported earlier with the same key, else made.
    Returns (export record, the backend as it quantized)."""
    rd = plan.run_dir
    ckpt = rd.checkpoint(method.label)
    stage = None if plan.force else finished_stage(rd.method(method.label), export_key)
    reused = reusable_stage(stage, backend, ckpt, tag) if stage else None
    if reused:
        log(f"{tag}: quantized and exported earlier with the same settings; reusing the checkpoint")
        return stage, reused
    if streams(plan, method, backend):
        stage = stream_and_export(plan, method, backend, tag)
    else:
        stage = quantize_and_export(plan, method, backend, take_base(), tag)
    backend = stage.pop("backend")
    write_record(rd.export_record(method.label), dict(stage, key=export_key))
    return stage, backend


def reusable_stage(stage: dict, backend, ckpt: Path, tag: str):
    """The backend rebuilt from an export record, when the record agrees with the
    checkpoint it describes (same options as its sidecar, valid options); else None: the
    stage is done again."""
    cls = type(backend)
    try:
        verify_checkpoint(ckpt)
        if read_sidecar(ckpt).get("options") != stage["options"]:
            raise QuantlabError("its export record and its sidecar disagree on the options")
        again = cls(cls.Config(**stage["options"]))  # the options as resolved then (skip: auto)
        for part in ("layers", "stage_seconds"):  # what the row's cost columns read
            if not isinstance(stage[part], dict):
                raise TypeError(part)
    except QuantlabError as e:
        log(f"{tag}: the checkpoint exported earlier cannot be reused ({e}); quantizing again")
        return None
    except (KeyError, TypeError, ValueError) as e:
        log(f"{tag}: the export record is not readable ({type(e).__name__}); quantizing again")
        return None
    return again


def streams(plan: RunPlan, method, backend) -> bool:
    """Whether the method quantizes one decoder layer at a time (``model.streaming``): it can
    (quantlab.streaming.methods), it runs no sensitivity pass (its probes need the whole
    model) and the source is a local model directory."""
    from quantlab.streaming.methods import why_not_streamed

    mode = plan.recipe.model.streaming
    if mode == "off" or backend.name == "none":  # the float baseline quantizes nothing
        return False
    why = why_not_streamed(backend.name, backend.config)
    if why is None and method.sensitivity_spec() is not None:
        why = "its sensitivity pass probes the whole model"
    path = plan.source_info.get("path")
    if why is None and not (path and Path(path).is_dir() and any(Path(path).glob("*.safetensors"))):
        why = "the source is not a local directory of safetensors files"
    if why is not None and mode == "on":
        raise QuantlabError(
            f"method '{method.label}': model.streaming is on, but {why}; set "
            "model.streaming: auto (or off)"
        )
    return why is None


def stream_and_export(plan: RunPlan, method, backend, tag: str) -> dict:
    """Quantize and export one decoder layer at a time (quantlab.streaming): the export
    record :func:`quantize_and_export` returns, for the same checkpoint, byte for byte. Its
    peak memory covers quantizing and exporting together (they interleave)."""
    from quantlab.streaming.layerwise import quantize_streaming
    from quantlab.streaming.methods import layer_method

    calibration = plan.calibration.ids if plan.calibration is not None else None
    log(f"{tag}: quantize ({backend.name}) and export, one decoder layer at a time")
    with Peak(plan.torch_device) as mem:
        res = quantize_streaming(
            plan.source_info["path"],
            plan.run_dir.checkpoint(method.label),
            layer_method(backend.name, backend.config),
            calibration=calibration,
            dtype=plan.torch_dtype,
            device=plan.torch_device,
            source=plan.source_info,
            label=method.label,
            log=lambda m: log(f"{tag}: {m}"),
        )
    export_s = sum(res.stage_seconds.get(k, 0.0) for k in ("write shards", "finish export"))
    return {
        "backend": backend,
        "options": backend.config.model_dump(mode="json"),
        "quantize_s": res.quantize_s - export_s,
        "export_s": export_s,
        "stage_seconds": dict(res.stage_seconds),
        "layers": res.layer_stats,
        "peak_rss_quantize_bytes": mem.rss,
        "peak_cuda_quantize_bytes": mem.cuda,
        "sensitivity": None,
        "allocation": None,
        "streamed": True,
    }


def quantize_and_export(plan: RunPlan, method, backend, base, tag: str) -> dict:
    """Sensitivity pass (when asked), quantization and export of one method (``base``: the
    float LoadedModel, quantized in place); returns the export record (what a resumed run
    needs to skip these stages) and the backend used."""
    mdir, device = plan.run_dir.method(method.label), plan.torch_device
    work, tokenizer = base.model, base.tokenizer
    base.model = None  # the quantizer owns it from here on
    calibration = plan.calibration.ids if plan.calibration is not None else None
    spec, sens, alloc = method.sensitivity_spec(), None, None
    allocating = getattr(backend.config, "allocating", lambda: False)()
    if (
        spec is not None and not allocating
    ):  # with bits: auto the block sets the allocation's windows
        log(
            f"{tag}: sensitivity pass ({spec.granularity}, {spec.windows} x {spec.seq_len} "
            "calibration tokens)"
        )
        backend, result = _sensitivity(plan, method, backend, spec, work, calibration, mdir)
        sens = result.as_dict()
    if allocating:
        backend, alloc = _allocation(plan, method, backend, work, mdir, tag)
    # llamacpp reads the source's GGUF metadata and writes calibration as text; its scratch
    # files (llama.cpp's F32 copy) go inside the run, counted against its own disk
    context = QuantizeContext(tokenizer=tokenizer, source_info=plan.source_info, scratch_dir=mdir)
    log(f"{tag}: quantize ({backend.name})")
    with Peak(device) as mem:
        t0 = time.perf_counter()
        done = backend.quantize(work, calibration if backend.needs_calibration else None, context)
        quantize_s = time.perf_counter() - t0
    log(f"{tag}: export")
    t0 = time.perf_counter()
    export_checkpoint(
        done,
        tokenizer,
        backend,
        plan.run_dir.checkpoint(method.label),
        source=plan.source_info,
        label=method.label,
    )
    export_s = time.perf_counter() - t0
    return {
        "backend": backend,
        "options": backend.config.model_dump(mode="json"),
        "quantize_s": quantize_s,
        "export_s": export_s,
        "stage_seconds": dict(done.stage_seconds),
        "layers": done.layer_stats,
        "peak_rss_quantize_bytes": mem.rss,
        "peak_cuda_quantize_bytes": mem.cuda,
        "sensitivity": sens,
        "allocation": alloc,
    }


def _sensitivity(plan: RunPlan, method, backend, spec, model, calibration, mdir: Path):
    """Run the sensitivity pass for one method; return the backend to quantize with (its skip
    list resolved when the method says ``skip: auto``) and the pass's result."""
    from quantlab.sensitivity import run_sensitivity

    windows = sample_calibration(
        plan.cal_ids, plan.cal_text, spec.windows, spec.seq_len, spec.seed
    ).ids
    cls = type(backend)
    auto = method.auto_skip()

    def make(skip: list[str]):
        return cls(backend.config.model_copy(update={"skip": skip}))

    result = run_sensitivity(
        model,
        make,
        windows,
        base_skip=backend.config.skip_list(),
        granularity=spec.granularity,
        kl_budget=spec.kl_budget if auto else None,
        calibration=calibration,
        log=log,
    )
    atomic_write_json(plan.run_dir.sensitivity(method.label), result.as_dict())
    if auto:
        backend = make(backend.config.skip_list() + result.skip_patterns())
    return backend, result


def _allocation(plan: RunPlan, method, backend, model, mdir: Path, tag: str):
    """bits: auto: choose each layer's width under the budget (quantlab.allocation); return the
    backend with the allocation resolved into module_bits, and the allocation's record."""
    from quantlab.allocation import allocate
    from quantlab.quantizers.rtn import RTN, RTNConfig
    from quantlab.recipe import SensitivitySpec

    c = backend.config
    spec = method.sensitivity or SensitivitySpec()
    windows = sample_calibration(
        plan.cal_ids, plan.cal_text, spec.windows, spec.seq_len, spec.seed
    ).ids
    names = [n for n, _ in target_linears(model, c.skip_list())]

    def probe(widths: dict[str, int]):
        keep = set(widths)
        return RTN(
            RTNConfig(
                bits=max(widths.values()),
                group_size=c.group_size,
                sym=c.sym,
                module_bits=widths,
                skip=[*c.skip_list(), *(n for n in names if n not in keep)],
            )
        )

    log(
        f"{tag}: bit allocation under {c.bits_budget} bits/weight (widths {c.bits_choices}, "
        f"{spec.windows} x {spec.seq_len} calibration tokens)"
    )
    # what the per-unit KLs depend on: methods of the run on the same grid measure them once
    key = stage_key(
        {
            "export": plan.keys["export"],
            "names": names,
            "group_size": c.group_size,
            "sym": c.sym,
            "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        }
    )
    result = allocate(
        model,
        names,
        probe,
        windows,
        budget=c.bits_budget,
        choices=c.bits_choices,
        group_size=c.group_size,
        cache=plan.run_dir.allocation_cache(key),
        log=lambda m: log(f"{tag}: {m}"),
    )
    record = result.as_dict()
    atomic_write_json(plan.run_dir.sensitivity(method.label), {"allocation": record})
    return type(backend)(c.model_copy(update={"module_bits": result.module_bits()})), record


# --------------------------------------------------------------------------- reload + score


def _score(plan: RunPlan, method, backend, stage: dict, export_key: str, tag: str) -> dict:
    """Reload the checkpoint and measure it: the method's row."""
    ckpt = plan.run_dir.checkpoint(method.label)
    ev, device = plan.recipe.eval, plan.torch_device
    # a reused checkpoint was verified above; a fresh one was just hashed for its manifest
    with Peak(device) as mem_load:
        t0 = time.perf_counter()
        loaded = load_checkpoint(
            ckpt,
            dtype=plan.torch_dtype,
            device=device,
            verify=False,
            kernel=ev.kernel,
            log=lambda m: log(f"{tag}: {m}"),
        )
        load_s = time.perf_counter() - t0
    reference = None
    if plan.reference_key is not None:
        reference = ReferenceLogprobs.open(plan.run_dir.reference())
        if reference is None or reference.meta.get("key") != plan.reference_key:
            raise QuantlabError(
                f"the base model's reference distributions in '{plan.run_dir.reference()}' are "
                "missing or from another plan; run again"
            )
    with Peak(device) as mem_eval:
        ppl, div = evaluate(loaded.model, plan.eval_plan, ev.batch_size, reference)
    gguf_cols = _gguf_stage(plan, method, backend, loaded, export_key)
    row = measure_checkpoint(plan, method, backend, loaded, ckpt, ppl, div or {}, tag=tag, log=log)
    row.update(
        load_s=load_s,
        kernels=loaded.info["kernels"],
        peak_rss_load_bytes=mem_load.rss,
        peak_rss_eval_bytes=mem_eval.rss,
        peak_cuda_eval_bytes=mem_eval.cuda,
        **_cost(stage),
        **gguf_cols,
    )
    del loaded
    gc.collect()
    kl = f", KL {div['kld_mean']:.4f}" if div else ""
    log(
        f"{tag}: ppl {ppl.ppl:.3f} ({ppl.convention}, {ppl.scored_tokens} tokens of "
        f"{plan.eval_text.name}){kl}"
    )
    return row


def _allocation_record(stage: dict) -> dict | None:
    """The row's allocation record: ``bits: auto``'s, or a GGUF file's type per tensor (the
    ggml backend keeps it with its layer statistics)."""
    layers = stage.get("layers")
    gguf = layers.get("gguf_allocation") if isinstance(layers, dict) else None
    return stage.get("allocation") or gguf


def _cost(stage: dict) -> dict:
    """The cost of quantizing: times, memory, the sensitivity pass."""
    sens, quantize_s = stage["sensitivity"], stage["quantize_s"]
    return {
        "quantize_s": quantize_s,
        "export_s": stage["export_s"],
        "peak_rss_quantize_bytes": stage["peak_rss_quantize_bytes"],
        "peak_cuda_quantize_bytes": stage["peak_cuda_quantize_bytes"],
        "layers": stage["layers"],
        "streamed": bool(stage.get("streamed")),
        "skipped_layers": len(sens["chosen"]) if sens else None,
        "sensitivity_s": sens["seconds"] if sens else None,
        "sensitivity": sens,
        "allocation": _allocation_record(stage),
        "allocation_s": (_allocation_record(stage) or {}).get("seconds"),
        # named stages of quantization; "other" is the rest (forward passes, packing...)
        "quantize_stages": dict(
            stage["stage_seconds"], other=quantize_s - sum(stage["stage_seconds"].values())
        ),
    }


def _gguf_stage(plan: RunPlan, method, backend, loaded, key: str) -> dict:
    """The method's GGUF files (when it exports GGUF), written from the checkpoint reloaded
    from disk and keyed like it (new eval settings do not rewrite them); the row's columns."""
    if "gguf" not in method.export:
        return {}
    from quantlab.engines.phase import GGUF, GGUF_F32, export_method_gguf, main_type
    from quantlab.formats.gguf import template_for

    ev, rd = plan.recipe.eval, plan.run_dir
    path = plan.source_info.get("path")
    template = template_for(plan.source_info, Path(path) if path else None)
    baseline = backend.name == "none"
    mdir = rd.method(method.label)
    rec = export_method_gguf(
        loaded.model,
        mdir,
        template,
        float_type=ev.llamacpp.float_type,
        baseline=baseline,
        key=stage_key({"gguf": key, "float_type": ev.llamacpp.float_type}),
        log=lambda msg: log(f"{method.label}: {msg}"),
    )
    rel = Path(rd.relative(mdir))
    return {
        "gguf_file": str(rel / GGUF),
        "gguf_f32_file": None if baseline else str(rel / GGUF_F32),
        "gguf_type": main_type(rec["type_counts"]),
        "gguf_bytes": rec["bytes"],
        "gguf_float_type": "F32" if baseline else ev.llamacpp.float_type,
    }
