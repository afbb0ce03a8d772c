"""Perplexity, computed the way its reference does and labelled with its convention.

``gptq`` (the GPTQ and AWQ papers' evaluation): join the documents with "\\n\\n", tokenize
once, cut the ids into non-overlapping windows of ``seq_len`` tokens, drop the remainder,
and take exp of the mean next-token NLL over every predicted token of every window (the
first token of each window is context only, so a window scores ``seq_len - 1`` tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float
    convention: str
    seq_len: int
    windows: int
    scored_tokens: int
    text_tokens: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def windows_gptq(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of the token ids [N]; the remainder is dropped."""
    n = ids.numel() // seq_len
    if n == 0:
        raise QuantlabError(f"the evaluation text has {ids.numel()} tokens, fewer than one window "
                            f"of eval.seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> torch.Tensor:
    """Summed next-token NLL (float64) of each window [n, seq_len] -> [n]."""
    device = next(model.parameters()).device
    sums = torch.zeros(windows.shape[0], dtype=torch.float64)
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False, disable=None):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1]  # [b, L-1, V]
        # cross_entropy does log-softmax internally, in float32, one batch at a time
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        sums[i : i + batch.shape[0]] = nll.double().sum(dim=1).cpu()
        del logits, nll
    return sums


def perplexity_gptq(model, ids: torch.Tensor, seq_len: int, *, max_windows: int | None = None,
                    batch_size: int = 4) -> PerplexityResult:
    """Perplexity by the ``gptq`` convention over token ids [N]."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise QuantlabError(f"eval.seq_len={seq_len} is longer than the model's context ({max_pos} tokens)")
    w = windows_gptq(ids, seq_len, max_windows)
    t0 = time.perf_counter()
    sums = window_nll(model, w, batch_size)
    seconds = time.perf_counter() - t0
    scored = w.shape[0] * (seq_len - 1)
    nll = float(sums.sum() / scored)
    return PerplexityResult(ppl=math.exp(nll), nll_mean=nll, convention="gptq", seq_len=seq_len,
                            windows=int(w.shape[0]), scored_tokens=scored,
                            text_tokens=int(ids.numel()), seconds=seconds)
