"""Size figures: bytes on disk and effective bits per weight of the linear layers."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

PACKED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def linear_bits_per_weight(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> float:
    """Stored bits per weight averaged over the model's linear layers (except ``exclude``),
    counting everything a quantized layer stores for its weight (codes, scales, zeros, group
    index) and the dtype width for layers left in float."""
    bits = 0
    weights = 0
    for name, m in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in exclude):
            continue
        if hasattr(m, "qweight"):
            stored = [getattr(m, t, None) for t in PACKED_TENSORS]
            bits += sum(t.numel() * t.element_size() * 8 for t in stored if isinstance(t, torch.Tensor))
            weights += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            bits += m.weight.numel() * m.weight.element_size() * 8
            weights += m.weight.numel()
    return bits / weights if weights else float("nan")


def quantized_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the tensors that encode quantized weights (codes, scales, zeros, group index)."""
    total = 0
    for m in model.modules():
        if hasattr(m, "qweight"):
            total += sum(t.numel() * t.element_size() for t in (getattr(m, n, None) for n in PACKED_TENSORS)
                         if isinstance(t, torch.Tensor))
    return total


def directory_bytes(path) -> int:
    """Bytes of every file under ``path`` (the checkpoint as it sits on disk)."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
