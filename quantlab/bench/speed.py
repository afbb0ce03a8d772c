"""Decode speed at batch 1: prefill a prompt once, then decode greedily token by token with
the KV cache, end-of-sequence ignored. Warm-up repeats are excluded; the median of the timed
repeats is reported and every raw sample is kept."""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int = 32, warmup: int = 1, repeats: int = 3) -> dict:
    """Time ``new_tokens`` decode steps after prefilling ``prompt`` [1, P]."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    samples = []
    for r in range(warmup + repeats):
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        if r >= warmup:
            samples.append(new_tokens / (time.perf_counter() - t0))
    return {
        "decode_tokens_per_s": statistics.median(samples),
        "decode_tokens_per_s_min": min(samples),
        "decode_tokens_per_s_max": max(samples),
        "decode_tokens_per_s_samples": samples,
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "batch_size": 1,
        "warmup": warmup,
        "repeats": repeats,
    }
