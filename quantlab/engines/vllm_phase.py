"""vLLM in a run (``eval.engines: [torch, vllm]``): after every row is scored by torch, vLLM
scores each checkpoint it can load on the plan's own windows (token ids, the same scored
tokens), beside quantlab's perplexity of the same file: ``vllm_ppl``, ``vllm_ppl_gap_pct``
(a gap above tolerance is a warning naming the likely cause, the vLLM twin of llama.cpp's
F32-twin check). A row vLLM refuses carries vLLM's message (``vllm_error``); the others go
on. The workers run in ``.venv-vllm`` (scripts/vllm.sh): quantlab never imports vLLM."""

from __future__ import annotations

from collections.abc import Callable

#: the row's vLLM fields, cleared before each measurement (a re-run measures again)
PREFIX = "vllm_"


def vllm_phase(plan, rows: list[dict], log: Callable[[str], None]) -> None:
    """Score every row's checkpoint in vLLM; the figures go into the rows (in place)."""
    from quantlab.engines.vllm import find_vllm, vllm_row

    spec, vllm = plan.recipe.eval.vllm, find_vllm()
    run_dtype = str(plan.dtype).removeprefix("torch.")
    log(f"vLLM ({vllm.label}): perplexity of {len(rows)} checkpoints on the run's windows")
    for r in rows:
        for k in [k for k in r if k.startswith(PREFIX)]:
            del r[k]
        label = r["method"]
        ckpt = plan.run_dir.checkpoint(label)
        if not (ckpt / "config.json").is_file() or any(ckpt.glob("*.gguf")):
            r["vllm_error"] = "a GGUF checkpoint: vLLM scores checkpoint directories here"
            continue
        log(f"vLLM: {label}")
        r.update(
            vllm_row(
                ckpt,
                plan.eval_plan,
                quantlab_ppl=r.get("ppl"),
                quantlab_dtype=run_dtype,
                quantized=r["backend"] != "none",
                log_dir=plan.run_dir.method(label) / "vllm",
                dtype=None if spec.dtype == "auto" else spec.dtype,
                vllm=vllm,
                threads=spec.threads,
            )
        )
        for what in ("vllm_warning", "vllm_error"):
            if r.get(what):
                log(f"vLLM: {label}: {r[what]}")
