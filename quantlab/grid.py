"""Uniform integer grids for weight quantization, as pure tensor functions.

This module sits below both :mod:`quantlab.quantizers` (the methods, which choose grids) and
:mod:`quantlab.formats` (the layouts, which store and read them): it imports nothing of
quantlab's, and neither package imports the other's internals to reach it.

A weight matrix W [out, in] is split into groups of ``group_size`` input columns; each
(output row, group) pair gets a scale s and an integer zero point z, and
``q = clamp(round(w / s) + z, 0, 2**bits - 1)``, ``w_hat = (q - z) * s``.

Symmetric grids follow GPTQ's convention (scale = 2 * max|w| / (2**bits - 1), zero =
2**(bits-1)), so the codes are valid in any GPTQ loader. Scales are rounded to float16 before
the codes are computed, because float16 is what the checkpoint stores: the model scored
after reload is then bit-for-bit the model that was quantized.
"""

from __future__ import annotations

import torch

FP16_TINY = torch.finfo(torch.float16).tiny


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros for the rows of ``w`` [R, G] (each row one group).

    Returns (scale [R] float32 holding float16-representable values, zero [R] int64)."""
    maxq = 2**bits - 1
    w = w.float()
    wmin = w.amin(dim=1).clamp(max=0)
    wmax = w.amax(dim=1).clamp(min=0)
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        scale = (wmax - wmin) / maxq
    scale = scale.clamp(min=FP16_TINY).half().float()
    if not sym:
        zero = torch.round(-wmin / scale).clamp(0, maxq).to(torch.int64)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes of ``w`` [R, G] on the grid (scale [R], zero [R])."""
    maxq = 2**bits - 1
    q = torch.round(w.float() / scale.unsqueeze(1)) + zero.unsqueeze(1)
    return q.clamp(0, maxq).to(torch.int64)


def quantize_matrix(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest quantization of a weight matrix W [out, in].

    Returns (codes int64 [out, in], scales float32 [n_groups, out], zeros int64 [n_groups, out]).
    ``group_size == -1`` means one group per output row (per-channel)."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    n_groups = in_f // g
    wg = w.reshape(out_f * n_groups, g)  # row r = (output o, group j), r = o * n_groups + j
    scale, zero = group_params(wg, bits, sym)
    codes = quantize_codes(wg, scale, zero, bits).reshape(out_f, in_f)
    return (
        codes,
        scale.view(out_f, n_groups).t().contiguous(),
        zero.view(out_f, n_groups).t().contiguous(),
    )


def dequantize_matrix(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """W_hat [out, in] from codes [out, in], scales/zeros [n_groups, out] and g_idx [in]."""
    s = scales.float().t()[:, g_idx.long()]  # [out, in]
    z = zeros.t()[:, g_idx.long()]
    return (codes - z).float() * s


def fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """W [out, in] rounded to its grid and dequantized (float32)."""
    codes, scales, zeros = quantize_matrix(w, bits, group_size, sym)
    g = w.shape[1] if group_size == -1 else group_size
    return dequantize_matrix(codes, scales, zeros, torch.arange(w.shape[1], device=w.device) // g)


def clip_search(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, error, *, steps: int, n_grid: int
) -> torch.Tensor:
    """The clipping-range search AWQ and RTN's scale_search share: bounds max|w| x (1 - i/n_grid)
    for i < ``steps``, each (row, group) keeping the bound whose rounding ``error(dq)`` (dq: the
    rounding error [out, n_groups, g]) is smallest. Returns max_val [out, n_groups]."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    wb = w.float().view(out_f, in_f // g, g)
    org_max = wb.abs().amax(dim=2, keepdim=True)  # [o, ng, 1]
    best_err = torch.full(wb.shape[:2], float("inf"), device=w.device)
    best_max = org_max.squeeze(2).clone()
    for i in range(steps):
        mx = org_max * (1 - i / n_grid)
        cur = torch.clamp(wb, -mx, mx)
        dq = (
            fake_quant(cur.reshape(-1, g), bits, -1, sym).view_as(wb) - wb
        )  # one grid per (row, group)
        err = error(dq)
        better = err < best_err
        best_err[better] = err[better]
        best_max[better] = mx.squeeze(2)[better]
    return best_max
