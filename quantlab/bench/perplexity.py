"""Perplexity by four conventions, each computed the way its reference does and labelled.

Every convention is a *plan*: a list of segments (input ids, and for each position the token
it is scored on, or nothing). One engine (:func:`score`) runs any plan in batches and returns
the NLL of every scored token in plan order, so the conventions differ only in how they cut
the text, and divergence statistics can be taken on exactly the tokens a convention scores.

``gptq``
    The GPTQ and AWQ papers: documents joined with "\\n\\n", tokenized once, cut into
    non-overlapping windows of ``seq_len`` (default 2048) tokens, remainder dropped;
    exp(mean NLL) over every predicted token (``seq_len - 1`` per window).
``llamacpp``
    llama.cpp's ``llama-perplexity``: the whole text tokenized once (with BOS where the
    tokenizer adds one), chunks of ``ctx`` (default 512) tokens, the first token of every
    chunk replaced by BOS, only the second half of each chunk scored (positions
    ``ctx/2 .. ctx-2``, i.e. ``ctx - 1 - ctx/2`` tokens per chunk); at least ``2 * ctx``
    tokens are required. Reports the standard error as llama.cpp does:
    ``ppl * sqrt((mean(nll^2) - mean(nll)^2) / (n - 1))``.
``strided``
    The transformers documentation ("Perplexity of fixed-length models"): windows of
    ``seq_len`` tokens starting every ``stride`` tokens, each scoring only the tokens the
    previous window did not. quantlab sums exact token NLLs; the documentation's loop
    weights each window's mean NLL by (scored tokens - 1), a small approximation that the
    tests measure.
``lm-eval``
    lm-evaluation-harness's ``loglikelihood_rolling`` (its wikitext task): each document
    tokenized on its own (special tokens as the tokenizer adds them by default, as lm-eval
    0.4 does), predicted from a one-token prefix (BOS, else EOS) in disjoint rolling windows
    of the model's context length; reported as word perplexity (headline), byte perplexity
    and bits per byte, with words counted as ``len(re.split(r"\\s+", doc))``.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError

IGNORE = -100
CONVENTIONS = ("gptq", "llamacpp", "strided", "lm-eval")
DEFAULT_SEQ_LEN = {"gptq": 2048, "llamacpp": 512}  # strided, lm-eval: the model's context
DEFAULT_STRIDE = 512


@dataclass(frozen=True)
class Segment:
    """``input_ids`` [L]; ``targets`` [L]: the token position i is scored on, or IGNORE."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    doc: int = 0


@dataclass
class WindowPlan:
    """The windows a perplexity convention scores on one text (not to be confused with the
    run's plan, :class:`quantlab.plan.RunPlan`)."""

    convention: str
    segments: list[Segment]
    params: dict
    text_tokens: int
    docs: list[dict] = field(default_factory=list)  # lm-eval: words and bytes per document

    @property
    def scored_tokens(self) -> int:
        return sum(int((s.targets != IGNORE).sum()) for s in self.segments)

    @property
    def input_tokens(self) -> int:
        return sum(s.input_ids.numel() for s in self.segments)

    def head(self, n: int | None) -> WindowPlan:
        """The plan cut to its first ``n`` segments (for divergence on part of the text)."""
        if n is None or n >= len(self.segments):
            return self
        return WindowPlan(
            self.convention, self.segments[:n], dict(self.params), self.text_tokens, self.docs
        )


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float
    convention: str
    params: dict
    windows: int
    scored_tokens: int
    input_tokens: int
    text_tokens: int
    seconds: float
    ppl_stderr: float | None = None
    extra: dict = field(default_factory=dict)  # lm-eval: word/byte perplexity, bits per byte

    @property
    def seq_len(self) -> int:
        return self.params["seq_len"]

    @property
    def tokens_per_s(self) -> float:
        """Tokens run through the model per second (context tokens included)."""
        return self.input_tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


# ---------------------------------------------------------------------------------- plans


def _shifted(window: torch.Tensor) -> torch.Tensor:
    """Targets for scoring every next token of ``window``."""
    t = torch.full_like(window, IGNORE)
    t[:-1] = window[1:]
    return t


def gptq_plan(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> WindowPlan:
    n = ids.numel() // seq_len
    if n == 0:
        raise QuantlabError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window "
            f"of eval.seq_len={seq_len}"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    segs = [Segment(w, _shifted(w)) for w in ids[: n * seq_len].view(n, seq_len)]
    return WindowPlan("gptq", segs, {"seq_len": seq_len}, int(ids.numel()))


def llamacpp_plan(
    ids: torch.Tensor, ctx: int, bos_id: int | None, max_chunks: int | None = None
) -> WindowPlan:
    """``ids`` is the whole text tokenized once (with BOS where the tokenizer adds it);
    ``bos_id`` replaces the first token of every chunk (None: the tokenizer adds no BOS and
    llama.cpp leaves chunks as they are)."""
    if ctx < 4:
        raise QuantlabError(
            f"the llamacpp convention needs a context of at least 4 tokens, not {ctx}"
        )
    if ids.numel() < 2 * ctx:
        raise QuantlabError(
            f"the llamacpp convention needs at least 2 x ctx = {2 * ctx} tokens; the "
            f"evaluation text has {ids.numel()} (as llama-perplexity requires)"
        )
    n = ids.numel() // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    first = ctx // 2
    segs = []
    for c in range(n):
        chunk = ids[c * ctx : (c + 1) * ctx].clone()
        if bos_id is not None:
            chunk[0] = bos_id
        t = torch.full_like(chunk, IGNORE)
        # position p (first <= p <= ctx-2) is scored on the ORIGINAL token p+1 of the chunk
        t[first : ctx - 1] = ids[c * ctx + first + 1 : (c + 1) * ctx]
        segs.append(Segment(chunk, t))
    return WindowPlan(
        "llamacpp", segs, {"seq_len": ctx, "ctx": ctx, "bos": bos_id is not None}, int(ids.numel())
    )


def strided_plan(
    ids: torch.Tensor, seq_len: int, stride: int, max_windows: int | None = None
) -> WindowPlan:
    if not 1 <= stride <= seq_len:
        raise QuantlabError(
            f"eval.stride must be between 1 and eval.seq_len={seq_len}, not {stride}"
        )
    n_ids = ids.numel()
    if n_ids < 2:
        raise QuantlabError("the evaluation text has fewer than 2 tokens")
    segs, prev_end = [], 0
    for begin in range(0, n_ids, stride):
        end = min(begin + seq_len, n_ids)
        trg_len = end - prev_end  # tokens this window scores that the last one did not
        window = ids[begin:end]
        t = torch.full_like(window, IGNORE)
        lo = max(0, window.numel() - trg_len - 1)
        t[lo:-1] = window[lo + 1 :]
        segs.append(Segment(window, t))
        prev_end = end
        if end == n_ids or (max_windows is not None and len(segs) >= max_windows):
            break
    return WindowPlan("strided", segs, {"seq_len": seq_len, "stride": stride}, n_ids)


def rolling_windows(
    tokens: list[int], prefix: int, max_len: int
) -> Iterable[tuple[list[int], list[int]]]:
    """Disjoint rolling windows over one document as lm-eval scores them: yields (input ids,
    targets of the window's last ``len(targets)`` positions). Every token of the document is
    predicted exactly once: the first window from ``prefix``, later ones with a full context
    of ``max_len`` tokens."""
    n = len(tokens)
    if n == 0:
        return
    first = min(max_len, n)
    yield [prefix] + tokens[: first - 1], tokens[:first]
    done = first
    while done < n:
        end = min(n, done + max_len)
        yield tokens[end - max_len - 1 : end - 1], tokens[done:end]
        done = end


def lmeval_plan(documents: list[str], tokenizer, max_len: int) -> WindowPlan:
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if prefix is None:
        raise QuantlabError(
            "the lm-eval convention needs a BOS or EOS token as the prefix; the "
            "tokenizer has neither"
        )
    segs, docs, total = [], [], 0
    for d, doc in enumerate(documents):
        toks = tokenizer(doc).input_ids  # default special tokens, as lm-eval's tok_encode
        total += len(toks)
        docs.append(
            {
                "words": len(re.split(r"\s+", doc)),
                "bytes": len(doc.encode("utf-8")),
                "tokens": len(toks),
            }
        )
        for inp, tgt in rolling_windows(toks, prefix, max_len):
            x = torch.tensor(inp, dtype=torch.long)
            t = torch.full_like(x, IGNORE)
            t[len(inp) - len(tgt) :] = torch.tensor(tgt, dtype=torch.long)
            segs.append(Segment(x, t, doc=d))
    if not segs:
        raise QuantlabError("the evaluation documents hold no tokens")
    return WindowPlan("lm-eval", segs, {"seq_len": max_len, "prefix_token": prefix}, total, docs)


# --------------------------------------------------------------------------------- engine


def _logits_kwarg(model) -> str | None:
    """The forward keyword that limits the output head to the last positions, if any."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


LogitsHook = Callable[[torch.Tensor, torch.Tensor], None]


ROW_CHUNK = 2048  # scored positions per log-softmax: bounds the extra memory to ~V x 2048 floats
TOKENS_PER_WINDOW = (
    512  # batch_size counts windows of up to this length; longer ones fill its budget
)


def batches(segs: list[Segment], batch_size: int) -> Iterable[list[Segment]]:
    """Consecutive segments, ``batch_size`` at a time, fewer when they are long: a batch holds
    at most ``batch_size * 512`` tokens (at least one segment), so long windows do not
    multiply the logits' memory."""
    budget = batch_size * TOKENS_PER_WINDOW
    batch: list[Segment] = []
    longest = 0
    for s in segs:
        n = s.input_ids.numel()
        if batch and (len(batch) == batch_size or (len(batch) + 1) * max(longest, n) > budget):
            yield batch
            batch, longest = [], 0
        batch.append(s)
        longest = max(longest, n)
    if batch:
        yield batch


@torch.no_grad()
def batch_nlls(
    logits: torch.Tensor, tgt: torch.Tensor, on_logits: LogitsHook | None = None
) -> list[torch.Tensor]:
    """NLL of every scored position of a batch (``logits`` [b, n, V], ``tgt`` [b, n] with
    IGNORE where nothing is scored), batch-major: the plan's order. Cross-entropy in row
    chunks, so a vocabulary-wide float32 copy of a whole window is never made."""
    out: list[torch.Tensor] = []
    for j in range(logits.shape[0]):
        pos = (tgt[j] != IGNORE).nonzero()[:, 0]
        if pos.numel() == 0:
            continue
        lo, hi = int(pos[0]), int(pos[-1]) + 1
        if hi - lo == pos.numel():  # a contiguous run (every convention here): a view, no copy
            rows, row_t = logits[j, lo:hi], tgt[j, lo:hi]
        else:
            rows, row_t = logits[j, pos], tgt[j, pos]
        for c in range(0, row_t.numel(), ROW_CHUNK):
            sel, sel_t = rows[c : c + ROW_CHUNK], row_t[c : c + ROW_CHUNK]
            out.append(F.cross_entropy(sel.float(), sel_t, reduction="none").double().cpu())
            if on_logits is not None:
                on_logits(sel, sel_t)
    return out


def score(
    model,
    plan: WindowPlan,
    batch_size: int = 4,
    *,
    on_logits: LogitsHook | None = None,
    desc: str = "perplexity",
) -> tuple[torch.Tensor, float]:
    """NLL (float64, CPU) of every scored token of ``plan``, in plan order, and the seconds
    the model took. Segments are batched in order, right-padded (a causal model's earlier
    positions never see the padding); the output head runs only from the first scored
    position of the batch on, and the log-softmax is taken over at most 2048 positions at a
    time. ``on_logits(logits [n, V], targets [n])`` sees the scored positions' logits in order."""
    device = next(model.parameters()).device
    keep_kw = _logits_kwarg(model)
    nlls: list[torch.Tensor] = []
    groups = list(batches(plan.segments, batch_size))
    t0 = time.perf_counter()
    for batch in tqdm(groups, desc=desc, unit="batch", leave=False, disable=None):
        length = max(s.input_ids.numel() for s in batch)
        inp = torch.zeros(len(batch), length, dtype=torch.long)
        tgt = torch.full((len(batch), length), IGNORE, dtype=torch.long)
        for j, s in enumerate(batch):
            inp[j, : s.input_ids.numel()] = s.input_ids
            tgt[j, : s.targets.numel()] = s.targets
        scored = (tgt != IGNORE).any(0).nonzero()
        if scored.numel() == 0:
            continue
        first = int(scored[0])
        kwargs = {"use_cache": False}
        if keep_kw is not None:
            kwargs[keep_kw] = length - first
        logits = model(inp.to(device), **kwargs).logits
        logits = logits[:, logits.shape[1] - (length - first) :]  # [b, length-first, V]
        tgt = tgt[:, first:].to(device)
        nlls += batch_nlls(logits, tgt, on_logits)
        del logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return (torch.cat(nlls) if nlls else torch.zeros(0, dtype=torch.float64)), seconds


def _window_stderr(plan: WindowPlan, nll: torch.Tensor, ppl: float) -> float | None:
    """Standard error of the perplexity from the spread of the windows' mean NLLs (windows
    are closer to independent than the tokens inside one), by the delta method:
    ppl * sd(window means) / sqrt(windows). None with fewer than 2 windows."""
    counts = [int((s.targets != IGNORE).sum()) for s in plan.segments]
    if len(counts) < 2 or sum(counts) != nll.numel():
        return None
    means = torch.stack([part.mean() for part in torch.split(nll, counts) if part.numel()])
    if means.numel() < 2:
        return None
    return ppl * float(means.std()) / math.sqrt(means.numel())


def summarize(plan: WindowPlan, nll: torch.Tensor, seconds: float) -> PerplexityResult:
    """Turn token NLLs into the convention's figures."""
    n = nll.numel()
    if n == 0:
        raise QuantlabError(f"the {plan.convention} plan scores no tokens")
    mean = float(nll.mean())
    ppl = math.exp(mean)
    stderr, extra = None, {}
    if plan.convention == "llamacpp" and n > 1:  # as llama-perplexity: over tokens
        var = float((nll * nll).mean()) - mean * mean
        stderr = ppl * math.sqrt(var / (n - 1)) if var > 0 else 0.0
        extra["ppl_stderr_basis"] = "tokens"
    elif plan.convention in ("gptq", "strided"):
        stderr = _window_stderr(plan, nll, ppl)
        extra["ppl_stderr_basis"] = "windows" if stderr is not None else None
    if plan.convention == "lm-eval":
        per_doc = torch.zeros(len(plan.docs), dtype=torch.float64)
        counts = [int((s.targets != IGNORE).sum()) for s in plan.segments]
        doc_of = torch.repeat_interleave(
            torch.tensor([s.doc for s in plan.segments]), torch.tensor(counts)
        )
        per_doc.index_add_(0, doc_of, nll)
        total = float(per_doc.sum())
        words = sum(d["words"] for d in plan.docs)
        nbytes = sum(d["bytes"] for d in plan.docs)
        extra = {
            "word_perplexity": math.exp(total / words),
            "byte_perplexity": math.exp(total / nbytes),
            "bits_per_byte": total / nbytes / math.log(2),
            "token_perplexity": ppl,
            "words": words,
            "bytes": nbytes,
            "documents": len(plan.docs),
        }
        ppl = extra["word_perplexity"]
    return PerplexityResult(
        ppl=ppl,
        nll_mean=mean,
        convention=plan.convention,
        params=dict(plan.params),
        windows=len(plan.segments),
        scored_tokens=n,
        input_tokens=plan.input_tokens,
        text_tokens=plan.text_tokens,
        seconds=seconds,
        ppl_stderr=stderr,
        extra=extra,
    )


def model_context(model) -> int | None:
    """The model's context length from its config (as lm-eval resolves it), if stated."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def make_plan(
    convention: str,
    *,
    ids: torch.Tensor | None = None,
    documents: list[str] | None = None,
    tokenizer=None,
    seq_len: int | None = None,
    stride: int | None = None,
    max_windows: int | None = None,
    bos: bool | None = None,
    model_context: int | None = None,
) -> WindowPlan:
    """Build the plan of ``convention``. ``ids``: the text tokenized once (gptq, llamacpp,
    strided); ``documents`` + ``tokenizer``: lm-eval. ``seq_len`` None: the convention's
    default (gptq 2048, llamacpp 512, otherwise ``model_context``). ``bos`` (llamacpp):
    None follows the tokenizer (BOS on each chunk when it adds one to a text)."""
    if convention not in CONVENTIONS:
        raise QuantlabError(
            f"unknown perplexity convention {convention!r}; use one of {', '.join(CONVENTIONS)}"
        )
    if seq_len is None:
        seq_len = DEFAULT_SEQ_LEN.get(convention) or model_context
        if seq_len is None:
            raise QuantlabError(
                f"the {convention} convention needs eval.seq_len: the model states no context "
                "length"
            )
    if model_context is not None and seq_len > model_context:
        raise QuantlabError(
            f"eval.seq_len={seq_len} is longer than the model's context ({model_context} tokens)"
        )
    if convention == "lm-eval":
        return lmeval_plan(documents, tokenizer, seq_len)
    if convention == "gptq":
        return gptq_plan(ids, seq_len, max_windows)
    if convention == "strided":
        return strided_plan(ids, seq_len, stride or min(DEFAULT_STRIDE, seq_len), max_windows)
    bos_id = None
    if bos is None:
        bos = tokenizer is not None and adds_bos(tokenizer)
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise QuantlabError("eval.bos is true but the tokenizer has no BOS token")
    return llamacpp_plan(ids, seq_len, bos_id, max_windows)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by default (llama.cpp's add_bos)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def perplexity(
    model, plan: WindowPlan, batch_size: int = 4, *, on_logits: LogitsHook | None = None
) -> PerplexityResult:
    nll, seconds = score(
        model, plan, batch_size, on_logits=on_logits, desc=f"perplexity ({plan.convention})"
    )
    return summarize(plan, nll, seconds)


def perplexity_gptq(
    model, ids: torch.Tensor, seq_len: int, *, max_windows: int | None = None, batch_size: int = 4
) -> PerplexityResult:
    """Perplexity by the ``gptq`` convention over token ids [N]."""
    plan = make_plan(
        "gptq",
        ids=ids,
        seq_len=seq_len,
        max_windows=max_windows,
        model_context=model_context(model),
    )
    return perplexity(model, plan, batch_size)
