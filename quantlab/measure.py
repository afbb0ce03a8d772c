"""The row of one reloaded checkpoint: who and what it is, quality, size, tasks.

Every field is labelled by what produced it (corpus, convention, tokenizer, device, dtype,
threads, kernel); the schema is :mod:`quantlab.results`.
"""

from __future__ import annotations

import datetime as _dt
import socket
from pathlib import Path

import torch

from quantlab.bench.size import (
    checkpoint_bits_per_weight,
    checkpoint_quantized_bytes,
    checkpoint_tensor_bytes,
    directory_bytes,
)
from quantlab.checkpoint import read_sidecar, weight_bytes


def kernel_label(m) -> str:
    """What executes a quantized layer: quantlab's own label, else the library's class (and
    the weight's tensor subclass, for torchao)."""
    if hasattr(m, "kernel"):
        return m.kernel
    lib = type(m).__module__.split(".")[0]
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and type(
        w.data if isinstance(w, torch.nn.Parameter) else w
    ).__module__.startswith("torchao"):
        return f"torchao:{type(w.data).__name__}"
    if lib == "torch" and "dynamic" in type(m).__module__:
        return "torch.ao:dynamic-int8(fbgemm)"
    return f"{lib}:{type(m).__name__}"


def measure_checkpoint(
    plan, method, backend, loaded, ckpt: Path, ppl, div: dict, *, tag: str, log
) -> dict:
    """Identity, quality, size and task fields of the row (the cost fields and load/eval
    memory are the runner's; speed is measured for all rows together, quantlab.speedphase)."""
    sizes = checkpoint_tensor_bytes(ckpt, loaded.model)
    qmodules = read_sidecar(ckpt).get("modules", [])
    row = _identity(plan, method, backend, loaded, ckpt, qmodules)
    row.update(_quality(plan, ppl, div))
    row.update(
        size_bytes=weight_bytes(ckpt),
        checkpoint_bytes=directory_bytes(ckpt),
        quantized_tensor_bytes=checkpoint_quantized_bytes(sizes, qmodules),
        bits_per_weight=checkpoint_bits_per_weight(loaded.model, sizes),
    )
    row.update(_tasks(plan, loaded, tag, log))
    return row


def _bits(fields: dict, model, qmodules: list[str], dtype) -> float | int:
    """The row's ``bits``: the method's width; with several widths (bits: auto, module_bits)
    the mean code width of its quantized layers, weighted by their weights."""
    if "bits" not in fields:
        return torch.finfo(dtype).bits
    if fields["bits"] is not None:
        return fields["bits"]
    mods = [model.get_submodule(n) for n in qmodules]
    total = sum(m.in_features * m.out_features for m in mods)
    return (
        round(sum(m.bits * m.in_features * m.out_features for m in mods) / total, 3)
        if total
        else None
    )


def _identity(plan, method, backend, loaded, ckpt: Path, qmodules: list[str]) -> dict:
    fields = backend.config.table_fields()
    kernels = sorted({kernel_label(loaded.model.get_submodule(n)) for n in qmodules})
    return {
        "method": method.label,
        "model": plan.recipe.model.source,
        "backend": backend.name,
        "bits": _bits(fields, loaded.model, qmodules, plan.torch_dtype),
        "group_size": fields.get("group_size"),
        "dtype": plan.dtype,
        "device": plan.device,
        "threads": torch.get_num_threads(),
        "kernel": ",".join(kernels) or "dense",
        "checkpoint": plan.run_dir.relative(ckpt),
        "options": backend.config.model_dump(mode="json"),
        "tokenizer": plan.eval_labels.get("tokenizer"),
        "base_load_s": plan.base_load_s,
        # when this row was measured, and by which run (a resumed run reuses older rows)
        "measured_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "session": plan.session,
        "worker": socket.gethostname(),  # where it ran (a Ray task may run on another machine)
        "source_gguf": plan.source_info.get("gguf"),  # a quantized source's history (report caveat)
    }


def _quality(plan, ppl, div: dict) -> dict:
    return {
        "ppl": ppl.ppl,
        "ppl_stderr": ppl.ppl_stderr,
        "ppl_convention": ppl.convention,
        "eval_source": plan.eval_text.name,
        "eval_sha256": plan.eval_text.sha256,
        "eval_seq_len": ppl.seq_len,
        "eval_windows": ppl.windows,
        "eval_tokens": ppl.scored_tokens,
        "eval_s": ppl.seconds,
        "eval_tokens_per_s": ppl.tokens_per_s,
        "eval_labels": plan.eval_labels,
        "perplexity": ppl.as_dict(),
        "kld_mean": div.get("kld_mean"),
        "kld_p99": div.get("kld_p99"),
        "top1_agreement": div.get("top1_agreement"),
        "dp_rms": div.get("dp_rms"),
        "kld_tokens": div.get("kld_tokens"),
        **_floor(plan, div),
        "divergence": div,
    }


def _floor(plan, div: dict) -> dict:
    """The run's noise floor beside the row's KL (the same tokens; None without divergence)."""
    floor = plan.noise_floor if div else None
    return {
        "kld_floor": floor["kld_mean"] if floor else None,
        "kld_floor_dtype": floor["dtype"] if floor else None,
    }


def _tasks(plan, loaded, tag: str, log) -> dict:
    ev = plan.recipe.eval
    if not ev.tasks:
        return {"tasks": {}}
    from quantlab.bench.tasks import run_tasks

    log(f"{tag}: lm-eval tasks {', '.join(ev.tasks)}")
    tasks = run_tasks(
        loaded.model,
        loaded.tokenizer,
        ev.tasks,
        ev.task_paths,
        limit=ev.task_limit,
        num_fewshot=ev.task_fewshot,
        batch_size=ev.batch_size,
    )
    out: dict = {"tasks": tasks}
    for task, values in tasks.items():
        for metric, value in values.items():
            out[f"task_{task}_{metric}"] = value
    return out
