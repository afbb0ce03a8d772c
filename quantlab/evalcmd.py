"""``quantlab eval MODEL``: score a model or checkpoint without quantizing anything."""

from __future__ import annotations

import gc
import json
import math
import sys

import torch

from quantlab.errors import QuantlabError


def _log(msg: str) -> None:
    print(f"quantlab: {msg}", file=sys.stderr, flush=True)


def _check_positive(args) -> None:
    for name in ("seq_len", "stride", "max_windows", "batch_size", "kl_windows", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise QuantlabError(f"--{name.replace('_', '-')} must be a positive integer, not {v}")


def _finite(d: dict) -> dict:
    """JSON has no NaN/Infinity: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run_eval(args) -> int:
    from quantlab.data import load_text
    from quantlab.evaluate import (
        EvalSettings,
        TemporaryReference,
        build_plan,
        compute_reference,
        evaluate,
        labels,
        plan_key,
    )
    from quantlab.models import (
        classify,
        load_model,
        quiet_progress_bars,
        resolve_device,
        resolve_dtype,
    )

    _check_positive(args)
    quiet_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    classify(args.model)
    if args.base:
        classify(args.base)
    text = load_text(args.data, args.split, "evaluation", args.text_field)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    settings = EvalSettings(convention=args.convention, seq_len=args.seq_len, stride=args.stride,
                            bos={"auto": None, "yes": True, "no": False}[args.bos],
                            max_windows=args.max_windows, batch_size=args.batch_size)
    kw = {"dtype": dtype, "device": device, "trust_remote_code": args.trust_remote_code}

    with TemporaryReference() as tmp:
        reference = None
        if args.base:
            _log(f"loading base model '{args.base}'")
            base = load_model(args.base, **kw)
            plan = build_plan(settings, text, base.tokenizer, base.model)
            part = plan.head(args.kl_windows)
            reference = compute_reference(base.model, part, tmp / "reference", settings.batch_size,
                                          plan_key(part, text, {}))
            base_tok = base.tokenizer
            del base
            gc.collect()
        _log(f"loading '{args.model}' ({str(dtype).removeprefix('torch.')} on {device})")
        lm = load_model(args.model, **kw)
        plan = build_plan(settings, text, lm.tokenizer, lm.model)
        if reference is not None and len(lm.tokenizer) != len(base_tok):
            raise QuantlabError(f"'{args.model}' and --base '{args.base}' have different tokenizers "
                                f"({len(lm.tokenizer)} vs {len(base_tok)} tokens); divergence needs the same one")
        _log(f"scoring {plan.scored_tokens} tokens of {text.name} ({plan.convention}, {len(plan.segments)} windows)")
        ppl, div = evaluate(lm.model, plan, settings.batch_size, reference)
        out = {"model": args.model, "ppl": ppl.ppl, "ppl_stderr": ppl.ppl_stderr, "nll_mean": ppl.nll_mean,
               "scored_tokens": ppl.scored_tokens, "windows": ppl.windows, "text_tokens": ppl.text_tokens,
               **labels(plan, text, lm.tokenizer, lm.model), **ppl.extra,
               "seconds": ppl.seconds, "tokens_per_s": ppl.tokens_per_s, "threads": torch.get_num_threads()}
        if div is not None:
            out.update(base=args.base, **div)
        if args.speed:
            from quantlab.bench.speed import measure_speed
            from quantlab.data import tokenize

            s = measure_speed(lm.model, tokenize(text, lm.tokenizer)[:128], new_tokens=32, warmup=1, repeats=3)
            out.update({f"speed_{k}": v for k, v in s.items() if k not in ("by_batch", "device", "threads")})
    out = _finite(out)
    if args.json:
        print(json.dumps(out))
        return 0
    unit = "word perplexity" if plan.convention == "lm-eval" else "perplexity"
    err = f" ± {out['ppl_stderr']:.4f}" if out.get("ppl_stderr") is not None else ""
    print(f"{unit} {out['ppl']:.4f}{err}  ({plan.convention}, seq_len {out['seq_len']}, "
          f"{out['scored_tokens']} scored tokens in {out['windows']} windows of {text.name}, "
          f"tokenizer {out['tokenizer']}, {out['dtype']} on {out['device']})")
    if plan.convention == "lm-eval":
        print(f"byte perplexity {out['byte_perplexity']:.4f}, bits per byte {out['bits_per_byte']:.4f}, "
              f"token perplexity {out['token_perplexity']:.4f} ({out['documents']} documents)")
    if div is not None:
        print(f"vs {args.base}: KL mean {out['kld_mean']:.6f} ± {out['kld_stderr']:.6f}, median "
              f"{out['kld_median']:.6f}, p99 {out['kld_p99']:.6f}; same top token "
              f"{100 * out['top1_agreement']:.2f}%; Δp mean {100 * out['dp_mean']:+.3f}% "
              f"rms {100 * out['dp_rms']:.3f}% ({out['kld_tokens']} tokens)")
    print(f"{out['tokens_per_s']:.1f} tokens/s through the model ({out['seconds']:.1f} s, {out['threads']} threads)")
    if args.speed:
        print(f"speed (batch 1, {out['speed_prompt_tokens']}-token prompt): prefill "
              f"{out['speed_prefill_tokens_per_s']:.1f} tok/s, decode {out['speed_decode_tokens_per_s']:.1f} "
              f"tok/s, TTFT {out['speed_ttft_ms']:.1f} ms, latency p50/p95 {out['speed_latency_p50_ms']:.1f}/"
              f"{out['speed_latency_p95_ms']:.1f} ms")
    return 0
