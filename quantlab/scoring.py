"""Scoring one model on one text: perplexity by a convention, divergence from a stored base,
labelled with everything needed to reproduce the figure. Used by ``quantlab run`` (every
reloaded checkpoint) and ``quantlab eval`` (any model, nothing quantized)."""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from pathlib import Path

import torch

from quantlab.bench.divergence import DivergenceStats, ReferenceLogprobs, check_distinct
from quantlab.bench.perplexity import (
    PerplexityResult,
    WindowPlan,
    adds_bos,
    make_plan,
    model_context,
    score,
    summarize,
)
from quantlab.data import Text, tokenize
from quantlab.errors import QuantlabError
from quantlab.evalspec import ScoringSpec


def build_plan(settings: ScoringSpec, text: Text, tokenizer, model) -> WindowPlan:
    """The windows ``settings`` scores on ``text`` (its options were checked, together, when
    the spec was made: :class:`quantlab.evalspec.ScoringSpec`)."""
    ctx = model_context(model)
    if settings.convention == "lm-eval":
        return make_plan(
            "lm-eval",
            documents=text.articles(),
            tokenizer=tokenizer,
            seq_len=settings.seq_len,
            model_context=ctx,
        )
    return make_plan(
        settings.convention,
        ids=tokenize(text, tokenizer),
        tokenizer=tokenizer,
        seq_len=settings.seq_len,
        stride=settings.stride,
        max_windows=settings.max_windows,
        bos=settings.bos,
        model_context=ctx,
    )


def labels(plan: WindowPlan, text: Text, tokenizer, model) -> dict:
    """What a perplexity figure was measured on: convention, windows, text, tokenizer, dtype,
    device."""
    p = next(model.parameters())
    return {
        "convention": plan.convention,
        **plan.params,
        "text_source": text.name,
        "text_sha256": text.sha256,
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_vocab": len(tokenizer),
        "adds_bos": adds_bos(tokenizer),
        "dtype": str(p.dtype).removeprefix("torch."),
        "device": str(p.device),
    }


def plan_key(plan: WindowPlan, text: Text, extra: dict) -> str:
    """A digest of exactly which tokens a plan scores (for reusing a stored reference)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"plan": plan.params, "conv": plan.convention, "text": text.sha256, **extra},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for s in plan.segments:
        h.update(s.input_ids.numpy().tobytes())
        h.update(s.targets.numpy().tobytes())
    return h.hexdigest()


def compute_reference(
    model, plan: WindowPlan, path: Path, batch_size: int, key: str
) -> ReferenceLogprobs:
    """Score ``plan`` with the base model and store its distributions at ``path`` (reused
    when a finished reference with the same key is already there, unchanged since it was
    written: see ReferenceLogprobs.open)."""
    found = ReferenceLogprobs.open(path)
    if found is not None and found.meta.get("key") == key:
        found.base_model = weakref.ref(model)
        return found
    vocab = (
        model.get_output_embeddings().weight.shape[0]
        if hasattr(model, "get_output_embeddings")
        else None
    )
    if vocab is None:
        raise QuantlabError("cannot tell the model's vocabulary size for the divergence reference")
    ref = ReferenceLogprobs.create(path, plan.scored_tokens, vocab, meta={"key": key})
    nll, seconds = score(model, plan, batch_size, on_logits=ref.append, desc="base distributions")
    ref.meta.update(seconds=seconds, ppl=float(torch.exp(nll.mean())))
    ref.finish()
    # just written from this process's own numbers: no need to read every byte back again
    done = ReferenceLogprobs.open(path, verify=False)
    if done is None:
        raise QuantlabError(
            f"the reference distributions written to '{path}' were changed or removed while being "
            "written: is another process writing there? Run again"
        )
    # which object the distributions came from: evaluate() refuses to compare it with itself
    # (a model quantized in place after its reference was taken would score KL 0)
    done.base_model = weakref.ref(model)
    return done


def floor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The other way of running a model whose KL from itself is the noise floor: bfloat16
    for a float32 run (what a user may serve), float32 for a half-precision run."""
    return torch.bfloat16 if dtype == torch.float32 else torch.float32


def _twin(model, dtype: torch.dtype):
    """A copy of ``model`` in ``dtype``, cast while copying (a float32 copy cast afterwards
    would hold the model twice at once); tied weights stay tied, the base is left as it is."""
    memo = {
        id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for p in model.parameters()
        if p.is_floating_point()
    }
    return copy.deepcopy(model, memo).to(dtype)  # .to: the float buffers (rotary tables)


def noise_floor(
    model, plan: WindowPlan, reference: ReferenceLogprobs, batch_size: int, dtype: torch.dtype
) -> dict:
    """The float model's own divergence from its ``reference`` when run in ``dtype``: the
    KL that arithmetic alone produces. Two methods whose KLs differ by less than this are
    not told apart by these tokens (the noise floor issue #30 asks for beside every KL)."""
    twin = _twin(model, dtype)
    try:
        _, div = evaluate(twin, plan, batch_size, reference)
    finally:
        del twin
    keep = ("kld_mean", "kld_p99", "top1_agreement", "kld_tokens")
    return {"dtype": str(dtype).removeprefix("torch."), **{k: div[k] for k in keep}}


def evaluate(
    model, plan: WindowPlan, batch_size: int, reference: ReferenceLogprobs | None = None
) -> tuple[PerplexityResult, dict | None]:
    """Perplexity over ``plan``, and divergence from ``reference`` on the tokens it covers
    (its first windows), in the same pass."""
    if reference is not None and getattr(reference, "base_model", None) is not None:
        check_distinct(reference.base_model(), model)
    stats = DivergenceStats(reference) if reference is not None else None
    nll, seconds = score(
        model,
        plan,
        batch_size,
        on_logits=stats.compare if stats else None,
        desc=f"perplexity ({plan.convention})",
    )
    return summarize(plan, nll, seconds), (stats.result() if stats else None)
