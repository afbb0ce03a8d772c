"""Bit packing in the GPTQ layout, as pure tensor functions.

GPTQ checkpoints pack integer codes LSB-first into int32 words: along the input dimension
for ``qweight`` ([in * bits / 32, out]) and along the output dimension for ``qzeros``
([groups, out * bits / 32]). Code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of one long
little-endian bit stream, so for 3 bits a value can straddle two words (32 codes fill
exactly 3 words) -- the same order AutoGPTQ's packer produces for 2, 3, 4 and 8 bits.
The functions here handle any width from 1 to 8 bits.
"""

from __future__ import annotations

import math

import torch


def pack_unit(bits: int) -> int:
    """How many codes make a whole number of 32-bit words (the length a packed dim must divide)."""
    return 32 // math.gcd(32, bits)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [N, M] (values in [0, 2**bits)) along dim 0 into int32 [N*bits/32, M]."""
    n, m = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} rows of {bits}-bit codes into whole 32-bit words")
    c = codes.to(torch.int64)
    if 32 % bits == 0:  # fast path: whole codes per word (2, 4, 8 bits)
        per = 32 // bits
        shifts = (torch.arange(per, device=c.device) * bits).view(1, per, 1)
        words = (c.view(n // per, per, m) << shifts).sum(dim=1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    shifts = torch.arange(bits, device=c.device).view(1, bits, 1)
    stream = ((c.unsqueeze(1) >> shifts) & 1).reshape(n * bits // 32, 32, m)  # bit i*bits+b
    weights = torch.arange(32, device=c.device).view(1, 32, 1)
    words = (stream << weights).sum(dim=1)  # [W, M], values in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [n*bits/32, M] -> int64 codes [n, M]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=w.device) * bits).view(1, per, 1)
        return ((w.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(n, -1)
    shifts = torch.arange(32, device=w.device).view(1, 32, 1)
    stream = ((w.unsqueeze(1) >> shifts) & 1).reshape(n, bits, -1)  # [n, bits, M]
    weights = torch.arange(bits, device=w.device).view(1, bits, 1)
    return (stream << weights).sum(dim=1)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [N, M] along dim 1 into int32 [N, M*bits/32] (the ``qzeros`` direction)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    return unpack_rows(words.t(), bits, m).t().contiguous()
