"""Generation speed: prefill throughput, time to first token, decode throughput and
per-token latency, at batch 1 and at a chosen batch size.

One repeat: run the prompt (``batch`` copies) through the model with a KV cache -- that is
the prefill, and its logits give the first new token, so its duration is the time to first
token -- then decode ``new_tokens`` greedy tokens one step at a time (end-of-sequence
ignored), timing every step. Warm-up repeats are excluded; medians over the timed repeats
are reported with min and max, and every raw sample is kept.

Decode is memory-bound at small batch: every step reads every weight once. The bound
``memory bandwidth / bytes read per token`` (:func:`decode_bound`) says how fast decode could
be on this machine, so each decode figure can be shown as a fraction of it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pct(values: list[float], p: float) -> float:
    """Percentile by linear interpolation (numpy's default)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), p / 100))


@torch.no_grad()
def _one_batch(model, prompt: torch.Tensor, new_tokens: int, warmup: int, repeats: int) -> dict:
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    b, p = prompt.shape
    prefill, decode, steps, generated = [], [], [], []
    cache_kw = _cache_kwarg(model)
    for r in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t_prefill = time.perf_counter() - t0
        past = _cache_of(out)
        step_times = []
        for _ in range(new_tokens):
            t1 = time.perf_counter()
            out = model(nxt, **{cache_kw: past}, use_cache=True)
            past = _cache_of(out)
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            step_times.append(time.perf_counter() - t1)
            generated.append(int(nxt[0, 0]))
        if r >= warmup:
            prefill.append(t_prefill)
            decode.append(b * new_tokens / sum(step_times))
            steps.extend(step_times)
    return _summary(b, p, new_tokens, prefill, decode, steps) | {
        "generated": generated[-new_tokens:]
    }


def _summary(
    b: int, p: int, new_tokens: int, prefill: list[float], decode: list[float], steps: list[float]
) -> dict:
    prefill_tps = [b * p / t for t in prefill]
    return {
        "batch_size": b,
        "prompt_tokens": p,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": statistics.median(prefill_tps),
        "prefill_tokens_per_s_samples": prefill_tps,
        "ttft_ms": statistics.median(prefill) * 1e3,
        "decode_tokens_per_s": statistics.median(decode),
        "decode_tokens_per_s_min": min(decode),
        "decode_tokens_per_s_max": max(decode),
        "decode_tokens_per_s_samples": decode,
        "latency_p50_ms": _pct(steps, 50) * 1e3,
        "latency_p95_ms": _pct(steps, 95) * 1e3,
    }


# ------------------------------------------------------------------------ compiled decode


def _compiled_step(device: torch.device):
    """The decode step compiled whole (``fullgraph``: a graph break is an error, not a silent
    partial compile); CUDA graphs on GPU (``reduce-overhead``), inductor's C++ on CPU."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh model each measurement: no stale guards, no recompile limit hit

    def step(model, tok, pos, cache):
        return model(tok, position_ids=pos, cache=cache, use_cache=True).logits[:, -1, :]

    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(step, fullgraph=True, dynamic=False, mode=mode)


@torch.no_grad()
def _one_batch_compiled(
    model, prompt: torch.Tensor, new_tokens: int, warmup: int, repeats: int
) -> dict:
    """gpt-fast's pattern: a static KV cache (fixed shapes) and a compiled decode step; the
    prefill runs eager into the same cache. The first step (the compilation) is timed
    separately (``compile_s``) and not counted in any tokens/s."""
    from transformers import StaticCache

    from quantlab.errors import QuantlabError

    device = next(model.parameters()).device
    prompt = prompt.to(device)
    b, p = prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=p + new_tokens + 1)
    step = _compiled_step(device)
    positions = torch.arange(p + new_tokens + 1, device=device).expand(b, -1)
    prefill, decode, steps, generated, compile_s = [], [], [], [], None
    for r in range(warmup + repeats + 1):  # repeat 0 compiles
        cache.reset()
        _sync(device)
        t0 = time.perf_counter()
        out = model(prompt, position_ids=positions[:, :p], cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t_prefill = time.perf_counter() - t0
        step_times = []
        for i in range(new_tokens):
            t1 = time.perf_counter()
            try:
                logits = step(model, nxt, positions[:, p + i : p + i + 1].contiguous(), cache)
            except Exception as e:  # inductor/dynamo failures: say what failed, measure nothing
                detail = (str(e).strip().splitlines() or [""])[0][:300]
                raise QuantlabError(
                    f"compiling the decode step failed ({type(e).__name__}: {detail}); "
                    "use eval.speed.mode: eager"
                ) from None
            nxt = logits.argmax(-1, keepdim=True)
            _sync(device)
            step_times.append(time.perf_counter() - t1)
            generated.append(int(nxt[0, 0]))
        if r == 0:
            compile_s = step_times[0]  # the first step compiled
        if r > warmup:
            prefill.append(t_prefill)
            decode.append(b * new_tokens / sum(step_times))
            steps.extend(step_times)
    return _summary(b, p, new_tokens, prefill, decode, steps) | {
        "compile_s": compile_s,
        "generated": generated[-new_tokens:],
    }


#: the speed measurement's defaults, in one place: recipes (``eval.speed``), ``quantlab eval
#: --speed`` and :func:`measure_speed` all take them from here
PROMPT_TOKENS, NEW_TOKENS, WARMUP, REPEATS, BATCH_SIZE, ROUNDS = 64, 32, 1, 3, 4, 2


MODES = ("eager", "compiled")


def measure_speed(
    model,
    prompt: torch.Tensor,
    *,
    new_tokens: int = NEW_TOKENS,
    batch_sizes: tuple[int, ...] = (1,),
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    mode: str = "eager",
) -> dict:
    """Speed at each batch size (the prompt [1, P] repeated), keyed ``b1``, ``b4``...;
    the batch-1 figures are also at the top level. ``mode``: ``eager`` (a dynamic KV cache,
    every op dispatched from Python) or ``compiled`` (a static KV cache and a compiled decode
    step; ``compile_s`` per batch size, excluded from tokens/s)."""
    if mode not in MODES:
        raise ValueError(f"speed mode must be one of {MODES}, not {mode!r}")
    if prompt.dim() == 1:
        prompt = prompt[None]
    device = next(model.parameters()).device
    result = {
        "warmup": warmup,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "mode": mode,
        "by_batch": {},
    }
    one = _one_batch if mode == "eager" else _one_batch_compiled
    for b in dict.fromkeys(batch_sizes):
        result["by_batch"][f"b{b}"] = one(
            model, prompt[:1].expand(b, -1), new_tokens, warmup, repeats
        )
    first = result["by_batch"][f"b{batch_sizes[0]}"]
    result.update({k: v for k, v in first.items() if not k.endswith("_samples")})
    return result


# ------------------------------------------------------------------------ hardware bound


def memory_bandwidth(
    device: torch.device | str = "cpu", mbytes: int = 256, repeats: int = 5
) -> float:
    """Measured memory bandwidth in bytes/s: the best of ``repeats`` copies of a
    ``mbytes`` MB buffer (each copy reads and writes it: 2x the bytes)."""
    device = torch.device(device)
    n = mbytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def bytes_per_token(model: nn.Module, stored: dict[str, int] | None = None) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer a forward uses,
    once (shared tensors once); an input embedding table counts one row unless the output
    head reads the same tensor; layers that execute from a dense copy of packed weights
    count the dense copy (what the kernel reads), not the packed tensors; layers given a kernel
    that reads packed weights (``fast``, see quantlab.formats.kernels) count that kernel's
    tensors; ``stored`` gives the bytes of modules whose library kernel reads its own packed
    form (bitsandbytes, torchao, quanto, fbgemm), counted as they are stored in the checkpoint."""
    seen: set[int] = set()
    total = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ptr = head.weight.data_ptr() if head is not None and hasattr(head, "weight") else None

    def add(t: torch.Tensor | None, nbytes: int | None = None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0 or t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size() if nbytes is None else nbytes

    stored = stored or {}
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if name in stored:
            total += stored[name]
            inside.update(id(x) for x in m.modules())
            continue
        if isinstance(m, nn.Embedding) and m is not head:
            if m.weight.data_ptr() != head_ptr:
                add(m.weight, m.weight.shape[1] * m.weight.element_size())
            continue
        fast = getattr(m, "fast", None)
        if (
            fast is not None
        ):  # a kernel reading packed weights (quantlab.formats.kernels): its tensors
            for t in fast.buffers():
                add(t)
            add(getattr(m, "bias", None))
            inside.update(id(x) for x in m.modules())
            continue
        if getattr(m, "kernel", None) == "dense-dequant":
            if m.weight is not None:
                add(m.weight)
            # packed only (as a quantizer leaves it): each forward makes and reads a dense copy
            else:
                total += m.out_features * m.in_features * torch.finfo(m.compute_dtype).bits // 8
            add(getattr(m, "bias", None))
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            add(t)
    return total


def decode_bound(
    model: nn.Module, bandwidth: float, batch_size: int = 1, stored: dict[str, int] | None = None
) -> dict:
    """Decode tokens/s the memory bandwidth allows if each step reads the weights once."""
    per_token = bytes_per_token(model, stored)
    return {
        "weight_bytes_per_step": per_token,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "decode_bound_tokens_per_s": batch_size * bandwidth / per_token,
    }
