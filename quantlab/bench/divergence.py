"""Divergence of a quantized model from its base on the same tokens, as llama.cpp's
``--kl-divergence`` mode reports it: per-token KL(base || quantized) over the full
vocabulary (mean, median, p99) and how often both pick the same top token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DivergenceStats:
    """Accumulates per-token KL divergence and top-1 agreement over batches of logits."""

    def __init__(self):
        self._kld: list[torch.Tensor] = []
        self._same: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, base_logits: torch.Tensor, logits: torch.Tensor) -> None:
        """base_logits, logits: [..., V] for the same positions (float32 math)."""
        if base_logits is logits:
            raise ValueError("divergence of a tensor from itself: pass the base model's logits")
        lp = F.log_softmax(base_logits.float().reshape(-1, base_logits.shape[-1]), dim=-1)
        lq = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        self._kld.append((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).double().cpu())
        self._same.append((lp.argmax(-1) == lq.argmax(-1)).cpu())

    def result(self) -> dict:
        kld = torch.cat(self._kld)
        same = torch.cat(self._same).double()
        return {"kld_mean": float(kld.mean()), "kld_median": float(kld.median()),
                "kld_p99": float(torch.quantile(kld.float(), 0.99)),
                "top1_agreement": float(same.mean()), "kld_tokens": int(kld.numel())}
