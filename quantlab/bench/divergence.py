"""Divergence of a quantized model from its base on the same tokens, as llama.cpp's
``--kl-divergence`` mode reports it: per-token KL(base || quantized) over the full
vocabulary (mean ± standard error, median, percentiles, max), how often both pick the same
top token, and Δp, the change in the probability of the token that actually follows.

The base model's distributions are computed once and stored compactly, like llama.cpp's
``--kl-divergence-base`` file: for every scored token, the vocabulary's log-probabilities
quantized to 16 bits over that token's own [min, max] range (2 bytes per vocabulary entry),
plus the exact float32 log-probability of the target token and the exact top-1 id. The
quantization step is at most (max - min) / 65535 in log space, which puts a floor of about
1e-8 under the KL divergence of a model from an exact copy of itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quantlab.cache import sha256_stream
from quantlab.errors import QuantlabError
from quantlab.log import log

_LEVELS = 65535
CODES, ROWS = "logprobs.u16", "rows.npy"


class _Damaged(Exception):
    """A stored reference is not what was written (the message says how)."""


def _check(f, want: dict, name: str, size: int, verify: bool) -> None:
    """``f`` (an open file at its start) holds ``size`` bytes with the recorded digest."""
    f.seek(0, os.SEEK_END)
    if f.tell() != size or want.get("bytes") != size:
        raise _Damaged(f"{name} holds {f.tell()} bytes, not the {size} recorded")
    f.seek(0)
    if verify and sha256_stream(f) != want.get("sha256"):
        raise _Damaged(f"{name} does not match the digest recorded when it was written")


class ReferenceLogprobs:
    """The base model's next-token distributions at the scored positions, on disk.

    ``ReferenceLogprobs.create(dir, n_tokens, vocab)``, then :meth:`append` batches of logits
    in scoring order, then :meth:`finish`; :meth:`open` reads a finished one back.

    ``meta.json``, written last, records the sha256 and size of ``logprobs.u16`` and
    ``rows.npy``; :meth:`open` checks both before any byte is used, so a damaged or changed
    reference (or one written before these digests existed) is recomputed, never compared
    against (quantlab.cache's rule, for the run's ``reference/`` as for the cache's)."""

    def __init__(self, path: Path, n_tokens: int, vocab: int, meta: dict | None = None):
        self.path, self.n_tokens, self.vocab = Path(path), n_tokens, vocab
        self.meta = meta or {}
        #: weak reference to the model the distributions came from, when computed in this
        #: process (see quantlab.scoring.compute_reference)
        self.base_model = None
        # plain file reads and writes, not a memory map: the codes (n_tokens x vocab x 2 bytes,
        # 2 GB for 40 windows of a 49k vocabulary) would otherwise stay mapped in this process
        # and count in its resident memory, which quantlab reports
        self._file = self.path / CODES
        self._writer = self._reader = None
        # [n_tokens, 5]: min, step, target logp, argmax, target
        self._rows: np.ndarray | None = None
        self._codes_sha = hashlib.sha256()
        self.filled = 0

    @classmethod
    def create(
        cls, path: str | Path, n_tokens: int, vocab: int, meta: dict | None = None
    ) -> ReferenceLogprobs:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # "finished" marker first (written last); every file is unlinked before it is written, so
        # a link planted in the run directory is replaced, never written through
        for name in ("meta.json", CODES, ROWS, "meta.json.tmp"):
            if (path / name).is_dir() and not (path / name).is_symlink():
                raise QuantlabError(
                    f"'{path / name}' is a directory where quantlab keeps a file; move it away"
                )
            (path / name).unlink(missing_ok=True)
        ref = cls(path, n_tokens, vocab, meta)
        ref._rows = np.zeros((n_tokens, 5), dtype=np.float64)
        ref._writer = open(ref._file, "wb")  # noqa: SIM115 - closed in finish()
        return ref

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> ReferenceLogprobs | None:
        """A finished reference at ``path``, or None when there is none, it is incomplete, or
        its files do not match the digests recorded when it was finished (said in a log line:
        the caller computes it again). ``verify=False`` only for files verified just before
        (quantlab.cache's entries)."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            return None  # none there, or an unfinished write (its marker comes last)
        try:
            return cls._open(path, verify)
        except _Damaged as e:
            log(f"the base model's reference distributions in '{path}' are recomputed: {e}")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            log(
                f"the base model's reference distributions in '{path}' are recomputed: they cannot "
                f"be read ({type(e).__name__})"
            )
        return None

    @classmethod
    def _open(cls, path: Path, verify: bool) -> ReferenceLogprobs:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, dict) or not all(
            isinstance(files.get(n), dict) for n in (CODES, ROWS)
        ):
            raise _Damaged("they carry no digest of their files (written by an earlier quantlab)")
        n_tokens, vocab = int(meta["n_tokens"]), int(meta["vocab"])
        ref = cls(path, n_tokens, vocab, meta)
        # the codes are read through this handle, later: the bytes verified here are the ones
        # used, even if the path is replaced or removed meanwhile
        reader = open(ref._file, "rb")  # noqa: SIM115 - closed with the object
        ref._reader = reader
        weakref.finalize(ref, reader.close)
        _check(reader, files[CODES], CODES, n_tokens * vocab * 2, verify)
        raw = (path / ROWS).read_bytes()
        _check(io.BytesIO(raw), files[ROWS], ROWS, len(raw), verify)
        ref._rows = np.load(io.BytesIO(raw), allow_pickle=False)
        if ref._rows.shape != (n_tokens, 5):
            raise _Damaged(f"{ROWS} holds {ref._rows.shape}, not ({n_tokens}, 5)")
        ref.filled = n_tokens
        return ref

    @torch.no_grad()
    def append(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = logits.shape[0]
        if self.filled + n > self.n_tokens:
            raise ValueError("more reference tokens than the plan scores")
        lp = F.log_softmax(logits.float(), dim=-1)
        lo = lp.min(dim=-1).values
        step = ((lp.max(dim=-1).values - lo) / _LEVELS).clamp(min=1e-30)
        codes = torch.round((lp - lo[:, None]) / step[:, None]).to(torch.int32)
        s = slice(self.filled, self.filled + n)
        data = codes.cpu().numpy().astype(np.uint16).tobytes()
        self._writer.write(data)
        self._codes_sha.update(data)
        rows = torch.stack(
            [
                lo.double(),
                step.double(),
                lp.gather(1, targets[:, None])[:, 0].double(),
                lp.argmax(-1).double(),
                targets.double(),
            ],
            dim=1,
        )
        self._rows[s] = rows.cpu().numpy()
        self.filled += n

    def finish(self) -> None:
        if self.filled != self.n_tokens:
            raise ValueError(f"reference holds {self.filled} of {self.n_tokens} tokens")
        self._writer.close()
        self._writer = None
        buf = io.BytesIO()
        np.save(buf, self._rows)
        (self.path / ROWS).write_bytes(buf.getvalue())
        files = {
            CODES: {"sha256": self._codes_sha.hexdigest(), "bytes": self.n_tokens * self.vocab * 2},
            ROWS: {"sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "bytes": buf.tell()},
        }
        tmp = self.path / "meta.json.tmp"
        meta = dict(self.meta, n_tokens=self.n_tokens, vocab=self.vocab, files=files)
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.path / "meta.json")

    def logprobs(
        self, start: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs [n, V] renormalized, target log-probs [n], top-1 ids [n], targets [n])
        of tokens start..start+n."""
        rows = torch.from_numpy(self._rows[start : start + n])
        if start < 0 or start + n > self.n_tokens:
            raise ValueError(
                f"tokens {start}..{start + n} are outside the reference's {self.n_tokens}"
            )
        self._reader.seek(start * self.vocab * 2)
        raw = np.frombuffer(self._reader.read(n * self.vocab * 2), dtype=np.uint16)
        codes = torch.from_numpy(raw.reshape(n, self.vocab).astype(np.float32))
        lp = rows[:, :1].float() + codes * rows[:, 1:2].float()
        return F.log_softmax(lp, dim=-1), rows[:, 2], rows[:, 3].long(), rows[:, 4].long()


class DivergenceStats:
    """Per-token KL(base || candidate), top-1 agreement and Δp, accumulated over batches.

    Either pass both logits to :meth:`update`, or feed candidate logits to :meth:`compare`,
    which reads the base distributions of the same tokens from a :class:`ReferenceLogprobs`."""

    def __init__(self, reference: ReferenceLogprobs | None = None):
        self.reference = reference
        self._pos = 0
        self._kld: list[torch.Tensor] = []
        self._same: list[torch.Tensor] = []
        self._p_base: list[torch.Tensor] = []
        self._p_cand: list[torch.Tensor] = []

    def _add(
        self,
        lp: torch.Tensor,
        lq: torch.Tensor,
        targets: torch.Tensor,
        lp_target: torch.Tensor,
        top_base: torch.Tensor,
    ) -> None:
        self._kld.append((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).double().cpu())
        self._same.append(top_base.cpu() == lq.argmax(-1).cpu())
        self._p_base.append(lp_target.double().cpu())  # log-probabilities of the targets
        self._p_cand.append(lq.gather(1, targets[:, None])[:, 0].double().cpu())

    @torch.no_grad()
    def update(
        self, base_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """base_logits, logits: [n, V] for the same positions; targets [n]."""
        if base_logits is logits:
            raise ValueError("divergence of logits from themselves: pass the base model's logits")
        lp = F.log_softmax(base_logits.float(), dim=-1)
        lq = F.log_softmax(logits.float(), dim=-1)
        self._add(lp, lq, targets, lp.gather(1, targets[:, None])[:, 0], lp.argmax(-1))

    @torch.no_grad()
    def compare(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Hook for :func:`quantlab.bench.perplexity.score`: candidate logits [n, V] of the
        next n scored tokens, against the stored reference. The reference may cover only the
        first tokens of the plan (its first windows); later tokens are not compared."""
        if self.reference is None:
            raise ValueError("compare() needs a reference")
        n = min(logits.shape[0], self.reference.n_tokens - self._pos)
        if n <= 0:
            return
        if logits.shape[-1] != self.reference.vocab:
            raise QuantlabError(
                f"vocabulary sizes differ: reference {self.reference.vocab}, "
                f"candidate {logits.shape[-1]}; compare models that share a tokenizer"
            )
        lp, lp_target, top, ref_targets = self.reference.logprobs(self._pos, n)
        targets = targets[:n].cpu()
        if not torch.equal(ref_targets, targets):
            raise QuantlabError(
                "the candidate is scored on other tokens than the reference; "
                "compare on the same text, tokenizer and windows"
            )
        lq = F.log_softmax(logits[:n].float(), dim=-1).cpu()
        self._add(lp, lq, targets, lp_target, top)
        self._pos += n

    def result(self) -> dict:
        if not self._kld:
            raise QuantlabError("no tokens were compared")
        if self.reference is not None and self._pos != self.reference.n_tokens:
            raise QuantlabError(
                f"compared {self._pos} tokens, but the reference holds "
                f"{self.reference.n_tokens}; were they scored on the same windows?"
            )
        kld = torch.cat(self._kld)
        same = torch.cat(self._same).double()
        lp_base, lp_cand = torch.cat(self._p_base), torch.cat(self._p_cand)
        dp = lp_cand.exp() - lp_base.exp()
        n = kld.numel()
        q = lambda t, p: float(torch.quantile(t.float(), p))  # noqa: E731
        top1 = float(same.mean())
        out = {
            "kld_mean": float(kld.mean()),
            "kld_stderr": float(kld.std() / math.sqrt(n)) if n > 1 else 0.0,
            "kld_median": float(kld.median()),
            "kld_p90": q(kld, 0.90),
            "kld_p95": q(kld, 0.95),
            "kld_p99": q(kld, 0.99),
            "kld_max": float(kld.max()),
            "top1_agreement": top1,
            "top1_stderr": math.sqrt(top1 * (1 - top1) / n),
            "dp_mean": float(dp.mean()),
            "dp_std": float(dp.std()) if n > 1 else 0.0,
            "dp_rms": float(dp.pow(2).mean().sqrt()),
            "dp_p01": q(dp, 0.01),
            "dp_p05": q(dp, 0.05),
            "dp_median": float(dp.median()),
            "dp_p95": q(dp, 0.95),
            "dp_p99": q(dp, 0.99),
            "dp_min": float(dp.min()),
            "dp_max": float(dp.max()),
            # mean ln(PPL(candidate) / PPL(base)) over these tokens, as llama.cpp prints it
            "ln_ppl_ratio": float((lp_base - lp_cand).mean()),
            "kld_tokens": n,
        }
        return out


def check_distinct(base, candidate) -> None:
    """Refuse to compare a model with itself (AutoAWQ's example does, and reports 0)."""
    if base is candidate:
        raise QuantlabError(
            "the base model and the candidate are the same object: divergence "
            "would be 0 by construction; load the base model separately"
        )
