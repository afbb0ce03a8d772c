"""``quantlab eval MODEL``: score a model or checkpoint without quantizing anything."""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from quantlab.errors import QuantlabError
from quantlab.evalspec import ScoringSpec, defaults

#: the scoring options' defaults, from their one home (a recipe's eval block has the same)
_D = defaults()


def _log(msg: str) -> None:
    from quantlab.log import log

    log(msg)


def _check_positive(args) -> None:
    for name in (
        "seq_len",
        "stride",
        "max_windows",
        "max_docs",
        "batch_size",
        "kl_windows",
        "threads",
    ):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise QuantlabError(f"--{name.replace('_', '-')} must be a positive integer, not {v}")


def _finite(d: dict) -> dict:
    """JSON has no NaN/Infinity: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def evaluate_source(
    model: str,
    *,
    data: str = "pydoc",
    split: str | None = None,
    text_field: str = "text",
    convention: str = _D["convention"],
    seq_len: int | None = None,
    stride: int | None = None,
    bos: bool | None = None,
    max_windows: int | None = None,
    max_docs: int | None = None,
    batch_size: int = _D["batch_size"],
    base: str | None = None,
    kl_windows: int | None = None,
    speed: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    verify: bool = True,
    kernel: str = _D["kernel"],
    speed_mode: str = "eager",
    cache_base: bool = True,
) -> dict:
    """Score ``model`` (any model source or quantlab checkpoint) on ``data``; see ``quantlab eval``.
    ``verify``: check quantlab checkpoints against their sha256 manifest before loading;
    ``kernel``: what runs a checkpoint's packed layers; ``speed_mode``: eager or compiled decode;
    ``cache_base``: keep the base model's distributions in the cache for the next call."""
    from quantlab.data import Text, load_text
    from quantlab.models import (
        classify,
        load_model,
        quiet_progress_bars,
        resolve_device,
        resolve_dtype,
    )
    from quantlab.scoring import build_plan, evaluate, labels

    settings = ScoringSpec.checked(
        "cli",
        convention=convention,
        seq_len=seq_len,
        stride=stride,
        bos=bos,
        max_windows=max_windows,
        batch_size=batch_size,
        kernel=kernel,
    )
    quiet_progress_bars()
    classify(model)
    if base:
        classify(base)
    text = load_text(data, split, "evaluation", text_field)
    if max_docs is not None:
        text = Text(f"{text.name}[:{max_docs} docs]", text.articles()[:max_docs])
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = {"dtype": dt, "device": dev, "trust_remote_code": trust_remote_code, "verify": verify}
    if trust_remote_code:
        _log("trust_remote_code is ON: code from the model repositories may run in this process")

    reference = None
    if base:
        _log(f"loading base model '{base}'")
        b = load_model(base, **kw)
        plan = build_plan(settings, text, b.tokenizer, b.model)
        part = plan.head(kl_windows)
        reference = _base_reference(b, part, text, batch_size, dt, dev, cache_base)
        base_vocab = len(b.tokenizer)
        del b
        gc.collect()
    _log(f"loading '{model}' ({str(dt).removeprefix('torch.')} on {dev})")
    lm = load_model(model, **kw, kernel=kernel)
    plan = build_plan(settings, text, lm.tokenizer, lm.model)
    if reference is not None and len(lm.tokenizer) != base_vocab:
        raise QuantlabError(
            f"'{model}' and the base '{base}' have different tokenizers "
            f"({len(lm.tokenizer)} vs {base_vocab} tokens); divergence needs the same one"
        )
    _log(
        f"scoring {plan.scored_tokens} tokens of {text.name} ({plan.convention}, "
        f"{len(plan.segments)} windows)"
    )
    ppl, div = evaluate(lm.model, plan, batch_size, reference)
    _warn_if_not_finite(model, ppl.ppl)
    out = {
        "model": model,
        "ppl": ppl.ppl,
        "ppl_stderr": ppl.ppl_stderr,
        "nll_mean": ppl.nll_mean,
        "scored_tokens": ppl.scored_tokens,
        "windows": ppl.windows,
        "text_tokens": ppl.text_tokens,
        **labels(plan, text, lm.tokenizer, lm.model),
        **ppl.extra,
        "seconds": ppl.seconds,
        "tokens_per_s": ppl.tokens_per_s,
        "threads": torch.get_num_threads(),
        "kernel": _kernel_label(lm),
    }
    if div is not None:
        base_ppl = reference.meta["ppl"]
        out.update(
            base=base,
            **div,
            base_ppl=base_ppl,
            base_ppl_tokens=reference.n_tokens,
            ppl_ratio=math.exp(div["ln_ppl_ratio"]),
            base_reference=str(reference.path),
            base_reference_reused=reference.meta.get("reused", False),
        )
    if speed:
        out.update(_speed(lm, text, speed_mode))
    return _finite(out)


def _warn_if_not_finite(model: str, ppl: float) -> None:
    if not math.isfinite(ppl):
        _log(
            f"warning: the perplexity of '{model}' is not a finite number ({ppl}): the "
            "model's outputs are NaN or infinite on this text. Its weights may be damaged "
            "(re-export or re-download it), or its dtype overflows (try --dtype float32)"
        )


def _speed(lm, text, speed_mode: str) -> dict:
    """``speed_*`` figures of the loaded model, with the recipe's defaults (eval.speed), so a
    figure here compares with a run's."""
    from quantlab.bench.speed import PROMPT_TOKENS, measure_speed
    from quantlab.data import tokenize

    s = measure_speed(lm.model, tokenize(text, lm.tokenizer)[:PROMPT_TOKENS], mode=speed_mode)
    return {f"speed_{k}": v for k, v in s.items() if k not in ("by_batch", "device", "threads")}


#: base-model references kept in the cache (each is 2 bytes x vocabulary x compared tokens)
KEEP_REFERENCES = 3


def _base_reference(b, part, text, batch_size: int, dtype, device, cache: bool):
    """The base model's distributions on ``part``: from the cache when the same base (by
    content), text, windows, dtype, device and code computed them before, else computed now
    (and kept, with the ``KEEP_REFERENCES`` - 1 most recently used others; llama.cpp's
    --kl-divergence-base file, managed). Cache entries follow quantlab.cache's rule: verified
    when read back, written whole under a lock (two evals of one base compute it once)."""
    from quantlab import __version__
    from quantlab.cache import cache_subdir, prune
    from quantlab.models import model_identity
    from quantlab.records import code_digest
    from quantlab.scoring import compute_reference, plan_key

    # the base by content (every file of a directory or a checkpoint, a GGUF's sha256) or by
    # Hub commit, never by where it lies
    key = plan_key(
        part,
        text,
        {
            "model": model_identity(b.info),
            "dtype": str(dtype),
            "device": str(device),
            "quantlab": __version__,
            "code": code_digest(),
            "torch": torch.__version__,
        },
    )
    if not cache:
        tmp = Path(tempfile.mkdtemp(prefix="quantlab-ref-"))
        atexit.register(shutil.rmtree, tmp, True)
        return compute_reference(b.model, part, tmp / "reference", batch_size, key)
    root = cache_subdir("eval-references")
    ref = _cached_reference(
        root, key, lambda tmp: _build_reference(b.model, part, tmp, batch_size, key)
    )
    ref.base_model = weakref.ref(b.model)
    _log(
        f"base distributions {'reused from' if ref.meta['reused'] else 'stored in'} {ref.path} "
        f"({ref.n_tokens} tokens; --no-cache-base to keep none)"
    )
    prune(root, KEEP_REFERENCES, what="base distributions")
    return ref


def _build_reference(model, part, tmp: Path, batch_size: int, key: str) -> dict:
    from quantlab.scoring import compute_reference

    compute_reference(model, part, tmp, batch_size, key)
    return {"key": key}


def _cached_reference(root: Path, key: str, build):
    """The verified cache entry of ``key``, opened (its files kept open: a prune by another
    process cannot take them away); built by ``build`` when absent or damaged."""
    from quantlab.bench.divergence import ReferenceLogprobs
    from quantlab.cache import cached

    for _ in range(2):  # a second try if another process pruned the entry as it was returned
        entry, _, reused = cached(
            root, key[:32], build, what="base distributions", expect={"key": key}
        )
        with contextlib.suppress(FileNotFoundError):
            os.utime(entry)  # most recently used: pruned last
        ref = ReferenceLogprobs.open(entry, verify=False)  # cached() verified every byte
        if ref is not None:
            ref.meta["reused"] = reused
            return ref
    raise QuantlabError(
        f"the base distributions in '{root}' keep changing while being read "
        "(another quantlab pruning them?); run again, or pass --no-cache-base"
    )


def _kernel_label(lm) -> str:
    """What ran the quantized layers (the results table's ``kernel``); ``dense`` for a float
    model."""
    from quantlab.checkpoint import read_sidecar
    from quantlab.measure import kernel_label

    if lm.info.get("kind") != "checkpoint":
        return "dense"
    names = read_sidecar(Path(lm.info["source"])).get("modules", [])
    return ",".join(sorted({kernel_label(lm.model.get_submodule(n)) for n in names})) or "dense"


def check_command_flags(args) -> None:
    """The flags only this command has, refused where they would be ignored (the scoring
    options' rules live with them, in :class:`quantlab.evalspec.ScoringSpec`): a flag the
    user typed always changes what is measured, or the command says why it cannot."""
    if args.max_docs is not None and args.convention != "lm-eval":
        raise QuantlabError(
            "--max-docs applies to the lm-eval convention; use --max-windows for the others"
        )
    if args.text_field != "text" and not args.data.endswith(".jsonl"):
        raise QuantlabError(f"--text-field applies to .jsonl data, not {args.data!r}; drop it")
    if args.speed_mode != "eager" and not args.speed:
        raise QuantlabError(
            "--speed-mode applies to the speed measurement; add --speed or drop --speed-mode"
        )
    if args.no_cache_base and not args.base:
        raise QuantlabError("--no-cache-base applies to --base; add --base MODEL or drop it")
    if args.kl_windows is not None and not args.base:
        raise QuantlabError(
            "--kl-windows applies to the divergence from a base model; add --base MODEL or "
            "drop --kl-windows"
        )


def run_eval(args) -> int:
    _check_positive(args)
    bos = {"auto": None, "yes": True, "no": False}[args.bos]
    ScoringSpec.checked(
        "cli",
        convention=args.convention,
        seq_len=args.seq_len,
        stride=args.stride,
        bos=bos,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        kernel=args.kernel,
    )  # before any model is loaded
    check_command_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = evaluate_source(
        args.model,
        data=args.data,
        split=args.split,
        text_field=args.text_field,
        convention=args.convention,
        seq_len=args.seq_len,
        stride=args.stride,
        bos=bos,
        max_windows=args.max_windows,
        max_docs=args.max_docs,
        batch_size=args.batch_size,
        base=args.base,
        kl_windows=args.kl_windows,
        speed=args.speed,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        verify=not args.no_verify,
        kernel=args.kernel,
        speed_mode=args.speed_mode,
        cache_base=not args.no_cache_base,
    )
    if args.json:
        print(json.dumps(out))
        return 0
    _print_summary(out, args)
    return 0


def _print_summary(out: dict, args) -> None:
    # JSON has no NaN, so _finite wrote null for a figure that is not finite; printed as nan
    v = {k: (math.nan if x is None else x) for k, x in out.items()}
    conv = out["convention"]
    unit = "word perplexity" if conv == "lm-eval" else "perplexity"
    err = f" ± {out['ppl_stderr']:.4f}" if out.get("ppl_stderr") is not None else ""
    print(
        f"{unit} {v['ppl']:.4f}{err}  ({conv}, seq_len {out['seq_len']}, {out['scored_tokens']} "
        f"scored tokens in {out['windows']} windows of {out['text_source']}, tokenizer "
        f"{out['tokenizer']}, {out['dtype']} on {out['device']})"
    )
    if conv == "lm-eval":
        print(
            f"byte perplexity {v['byte_perplexity']:.4f}, bits per byte {v['bits_per_byte']:.4f}, "
            f"token perplexity {v['token_perplexity']:.4f} ({out['documents']} documents)"
        )
    if "kld_mean" in out:
        print(
            f"vs {args.base}: KL mean {v['kld_mean']:.6f} ± {v['kld_stderr']:.6f}, median "
            f"{v['kld_median']:.6f}, p99 {v['kld_p99']:.6f}; same top token "
            f"{100 * v['top1_agreement']:.2f}%; Δp mean {100 * v['dp_mean']:+.3f}% "
            f"rms {100 * v['dp_rms']:.3f}% ({out['kld_tokens']} tokens)"
        )
        print(
            f"base perplexity {v['base_ppl']:.4f} on those {out['base_ppl_tokens']} tokens; "
            f"PPL(model)/PPL(base) {v['ppl_ratio']:.4f} on the same tokens (base distributions "
            f"{'reused from the cache' if out['base_reference_reused'] else 'computed'})"
        )
    print(
        f"{v['tokens_per_s']:.1f} tokens/s through the model ({v['seconds']:.1f} s, "
        f"{out['threads']} threads, kernel {out['kernel']})"
    )
    if args.speed:
        comp = f", compiled in {out['speed_compile_s']:.0f} s" if out.get("speed_compile_s") else ""
        print(
            f"speed ({out['speed_mode']} decode{comp}, batch 1, {out['speed_prompt_tokens']}-token "
            f"prompt): prefill {v['speed_prefill_tokens_per_s']:.1f} tok/s, decode "
            f"{v['speed_decode_tokens_per_s']:.1f} tok/s, TTFT {v['speed_ttft_ms']:.1f} ms, "
            f"latency p50/p95 {v['speed_latency_p50_ms']:.1f}/{v['speed_latency_p95_ms']:.1f} ms"
        )
