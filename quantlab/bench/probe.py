"""Speed and memory of one checkpoint in a fresh process (``scripts/bench_backends.py`` runs
it once per checkpoint, one after the other, so no method inherits another's allocations):

    python -m quantlab.bench.probe CHECKPOINT THREADS REPEATS

Speed is measured as the results table measures it (:func:`quantlab.bench.speed.measure_speed`):
prefill of a 512-token prompt, and batch-1 decode of 32 tokens after a 64-token prompt, medians
of REPEATS after one warm-up. Memory: RSS after running (every weight touched: safetensors are
memory-mapped, so RSS right after loading undercounts) and the peak while running, both above
the RSS after importing torch, transformers and the backend's library. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import torch

#: the library each library backend imports (its import cost is not the model's memory)
_LIBRARIES = {
    "bnb": "bitsandbytes",
    "quanto": "optimum.quanto",
    "int8-dynamic": "torchao",
    "int8-weight-only": "torchao",
}


def probe(ckpt: str, threads: int, repeats: int) -> dict:
    import transformers  # noqa: F401  (imported before the baseline RSS)

    import quantlab.checkpoint as ck
    from quantlab.bench.memory import PeakRSS, release_free_memory, rss_bytes
    from quantlab.bench.speed import measure_speed
    from quantlab.registry import get_backend

    meta = ck.read_sidecar(ckpt)
    torch.set_num_threads(threads)
    if meta["backend"] in _LIBRARIES:
        __import__(_LIBRARIES[meta["backend"]])
    get_backend(meta["backend"])
    release_free_memory()
    before = rss_bytes()
    lm = ck.load_checkpoint(ckpt, dtype=torch.float32, device=torch.device("cpu"))
    prompt = torch.randint(100, 40000, (512,), generator=torch.Generator().manual_seed(0))
    with PeakRSS() as peak:
        pre = measure_speed(lm.model, prompt, new_tokens=1, warmup=1, repeats=repeats)
        dec = measure_speed(lm.model, prompt[:64], new_tokens=32, warmup=1, repeats=repeats)
    release_free_memory()
    return {
        "rss_imports": before,
        "model_rss": rss_bytes() - before,
        "peak_run": peak.peak_bytes - before,
        "prefill512_tok_s": pre["prefill_tokens_per_s"],
        "decode_tok_s": dec["decode_tokens_per_s"],
        "decode_min": dec["decode_tokens_per_s_min"],
        "decode_max": dec["decode_tokens_per_s_max"],
    }


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
