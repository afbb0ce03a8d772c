"""llama.cpp's own quantizers (ggml-quants.c of the pinned llama.cpp) for the 32-wide block
types, re-implemented in numpy so that quantlab writes the **same bytes** as ``llama-quantize``.

==========  ========================================  ===================================
type        without importance (``imatrix`` None)      with importance
==========  ========================================  ===================================
Q4_0/Q5_0   d = max / -8 (-16), truncating rounding     ``make_qx_quants``: 18 scales around
            of x/d + 8.5 (16.5)                         -max/8 refitted by weighted LSQ
Q4_1/Q5_1   d = (max - min) / 15 (31), m = min          ``make_qkx3_quants``: 37 scales, the
                                                        minimum refitted with the scale
Q8_0        d = amax / 127, roundf(x / d)               (the same: llama.cpp ignores it)
IQ4_NL      non-uniform 16 levels, 15 scales tried      the same search, importance-weighted
==========  ========================================  ===================================

Why it is exact, not approximately equal: every step is the C code's float32 operation in the
C code's order. numpy's float32 ufuncs round each operation as SSE does (the pinned build
compiles ggml-quants.c without FMA: no fused multiply-add to imitate, checked with objdump);
sums that C accumulates one element at a time are ``np.add.accumulate`` (sequential, not
numpy's pairwise ``sum``); ``nearest_int`` (adding 1.5 * 2**23) is ``np.rint`` (ties to even);
``roundf`` (ties away from zero) and C's truncating casts are written out; float16 rounding
happens where C calls GGML_FP32_TO_FP16 (round to nearest even, as numpy's astype), after the
search. The loops left in Python run over candidate scales (at most 38), never over blocks.

Importance (``imatrix``): one value per input column, llama.cpp's mean of x² over calibration
tokens; llama.cpp weights column j of a row by ``imatrix[j] * sqrt(sigma2 + w[j]**2)``,
sigma2 the row's (IQ4_NL: the block's, doubled) mean square weight.
"""

from __future__ import annotations

import numpy as np

from quantlab.errors import QuantlabError

BLOCK = 32
#: bytes of one block of 32 weights
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "IQ4_NL": 18}
TYPES = tuple(BLOCK_BYTES)
#: types whose quantizer reads an importance matrix (Q8_0's does not)
USES_IMATRIX = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"})
#: IQ4_NL's 16 levels (kvalues_iq4nl)
IQ4NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)
#: ggml's GROUP_MAX_EPS: a block whose largest |x| is below it is all zero
_EPS = np.float32(1e-15)
_F = np.float32
#: weights quantized at a time (rows of a tensor; 2**20: a few MB per temporary array)
CHUNK = 1 << 20


def row_bytes(qtype: str, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` weights in ``qtype``."""
    return n_cols // BLOCK * BLOCK_BYTES[qtype]


def check_quantizable(name: str, shape: tuple[int, ...], qtype: str) -> None:
    """A clear error when a 2-D tensor cannot be stored as ``qtype`` (unknown type, or rows
    that are not a whole number of 32-weight blocks)."""
    if qtype not in BLOCK_BYTES:
        raise QuantlabError(
            f"'{qtype}' is not a type quantlab quantizes as llama.cpp does; "
            f"types: {', '.join(TYPES)}"
        )
    if len(shape) != 2 or shape[1] % BLOCK:
        raise QuantlabError(
            f"tensor '{name}' of shape {tuple(shape)}: rows of {shape[-1]} weights are not a "
            f"multiple of {BLOCK}, the block of {qtype}; it can stay F16/F32, or the model "
            "needs rows that are multiples of 32"
        )


def quantize(w: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The GGUF data of ``w`` (float32 [rows, cols], cols a multiple of 32, ggml's row order:
    blocks run along a row) in ``qtype``: uint8 [rows, row_bytes], what ``llama-quantize``
    writes for the same F32 tensor (and, ``imatrix`` float32 [cols], the same importance)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    check_quantizable("weight", w.shape, qtype)
    rows, cols = w.shape
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != cols:
            raise QuantlabError(
                f"importance of {imatrix.shape[0]} columns for a tensor {cols} wide"
            )
    if qtype not in USES_IMATRIX:
        imatrix = None
    out = np.empty((rows, row_bytes(qtype, cols)), dtype=np.uint8)
    # rows are quantized independently: slices of about CHUNK weights bound the temporaries
    # (a dozen arrays of the slice's size) whatever the tensor
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        part = w[r : r + step]
        # blocks as columns, [32, n_blocks]: each of a block's 32 elements is one contiguous
        # row, so C's element-by-element loops are 32 whole-array operations
        x = np.ascontiguousarray(part.reshape(-1, BLOCK).T)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            parts = _quantize_blocks(x, part, qtype, imatrix)
        out[r : r + step] = _pack(qtype, *parts).reshape(part.shape[0], -1)
    return out


def _quantize_blocks(x: np.ndarray, w: np.ndarray, qtype: str, imatrix: np.ndarray | None):
    """(d, [m,] codes [32, n_blocks]) of the blocks ``x`` of the matrix ``w``."""
    if qtype == "Q8_0":
        return _q8_0(x)
    if qtype == "IQ4_NL":
        qw = None if imatrix is None else _block_importance(imatrix, w.shape[0])
        return _iq4_nl(x, qw)
    nmax = 8 if qtype in ("Q4_0", "Q4_1") else 16
    if imatrix is None:
        return _ref_sym(x, nmax) if qtype.endswith("_0") else _ref_asym(x, 2 * nmax - 1)
    weight = _row_weights(w, imatrix)
    if qtype.endswith("_0"):
        return _qx_search(x, nmax, weight)
    return _qkx3_search(x, 2 * nmax - 1, weight)


# ----------------------------------------------------------------------- float32 helpers


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """C's ``float s = 0; for j: s += a[j]`` over the first axis, in float32, in order (numpy's
    own sum is pairwise, which rounds differently)."""
    s = a[0] + _F(0)
    for row in a[1:]:
        s += row
    return s


def _first(x: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """x at the first True of ``hit`` in each block (C's strict comparisons keep the first of
    equal candidates, which decides the sign of a zero)."""
    return x[np.argmax(hit, axis=0), np.arange(x.shape[1])]


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): the largest |x| and the first x that has it; max is +0 for an all-zero
    block, as C's ``max = 0; if (amax < |v|) ...`` leaves it."""
    ax = np.abs(x)
    amax = ax.max(axis=0)
    mx = np.where(amax > 0, _first(x, ax == amax), _F(0))
    return amax, mx.astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """C's ``d ? 1.0f/d : 0.0f``."""
    return np.where(d != 0, _F(1) / d, _F(0)).astype(np.float32)


def _trunc_int(v: np.ndarray) -> np.ndarray:
    """C's (int) cast of a float: toward zero."""
    return np.trunc(v).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.rint would round them to even)."""
    t = np.trunc(v)
    return (t + np.where(np.abs(v - t) >= _F(0.5), np.sign(v), _F(0))).astype(np.int32)


def _fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as 2 little-endian bytes per value."""
    return v.astype(np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)


# ------------------------------------------------------- without importance (the _ref code)


def _ref_sym(x: np.ndarray, nmax: int):
    """quantize_row_q4_0_ref / q5_0_ref: (d, codes in [0, 2 nmax))."""
    _, mx = _signed_absmax(x)
    d = mx / _F(-nmax)
    q = _trunc_int(x * _inverse(d) + _F(nmax + 0.5))
    return d, np.minimum(2 * nmax - 1, q)


def _ref_asym(x: np.ndarray, levels: int):
    """quantize_row_q4_1_ref / q5_1_ref: (d, m, codes); m is the block's minimum."""
    lo = _first(x, x == x.min(axis=0))
    hi = _first(x, x == x.max(axis=0))
    d = (hi - lo) / _F(levels)
    q = _trunc_int((x - lo) * _inverse(d) + _F(0.5))
    if levels == 15:  # Q4_1 clamps to 15; Q5_1's cast does not
        q = np.minimum(15, q)
    return d, lo, q


def _q8_0(x: np.ndarray):
    """quantize_row_q8_0_ref: (d, signed codes)."""
    d = np.abs(x).max(axis=0) / _F(127)
    return d, _roundf(x * _inverse(d))


# ------------------------------------------------------------------ with importance


def _row_weights(w: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """quantize_row_q*_impl's weights of every block, [32, n_blocks]: imatrix[j] *
    sqrt(sigma2 + x[j]^2), sigma2 the row's mean square (a sequential float32 sum)."""
    rows, cols = w.shape
    sigma2 = _seq_sum(np.ascontiguousarray((w * w).T)) / _F(cols)  # [rows]
    weight = imatrix[None, :] * np.sqrt(sigma2[:, None] + w * w)
    return np.ascontiguousarray(weight.reshape(-1, BLOCK).T)


def _block_importance(imatrix: np.ndarray, rows: int) -> np.ndarray:
    """The imatrix slice of every block, [32, rows * cols / 32]."""
    per_row = imatrix.reshape(-1, BLOCK).T  # [32, cols / 32]
    return np.ascontiguousarray(np.tile(per_row, (1, rows)))


def _qx_codes(x, iscale, nmax):
    """nearest_int(iscale x) clamped to [-nmax, nmax - 1], as float32."""
    return np.clip(np.rint(iscale * x), -nmax, nmax - 1).astype(np.float32)


def _qx_sums(x, weight, iscale, nmax):
    """One candidate of make_qx_quants: (sum w x l, sum w l^2) of the codes iscale gives."""
    lv = _qx_codes(x, iscale, nmax)
    wl = weight * lv
    return _seq_sum(weight * x * lv), _seq_sum(wl * lv)


def _qx_search(x: np.ndarray, nmax: int, weight: np.ndarray):
    """make_qx_quants(rmse_type 1, quant weights): (d, codes). The first candidate is -nmax/max;
    then nmax + 0.1 is (is = -9..9, not 0), each kept when its weighted least-squares scale
    explains more: sumlx^2 / suml2 larger. The codes are those of the kept candidate."""
    amax, mx = _signed_absmax(x)
    live = amax >= _EPS
    mx = np.where(live, mx, _F(1))  # all-zero blocks: codes 0, d 0 (set below)
    best_is = _F(-nmax) / mx
    sumlx, suml2 = _qx_sums(x, weight, best_is, nmax)
    scale = np.where(suml2 != 0, sumlx / suml2, _F(0)).astype(np.float32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F(nmax) + _F(0.1) * _F(step)) / mx
        sumlx, suml2 = _qx_sums(x, weight, iscale, nmax)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
        best_is = np.where(take, iscale, best_is)
    codes = _qx_codes(x, best_is, nmax).astype(np.int32) + nmax
    return np.where(live, scale, _F(0)), np.where(live, codes, 0)


def _qkx3_error(x, weight, lv, scale, lo):
    """sum w (scale l + min - x)^2, in make_qkx3_quants' order."""
    diff = scale * lv + lo - x
    return _seq_sum(weight * (diff * diff))


def _qkx3_codes(x, iscale, lo, levels):
    """nearest_int(iscale (x - min)) clamped to [0, levels], as float32."""
    return np.clip(np.rint(iscale * (x - lo)), 0, levels).astype(np.float32)


def _qkx3_search(x: np.ndarray, levels: int, weight: np.ndarray):
    """make_qkx3_quants(nmax=levels, rmin -0.9, rdelta 0.05, 37 steps, squared error):
    (d, m, codes), m = the minimum (<= 0). Each step's codes get the scale and minimum of a
    weighted least-squares fit; a fit with less weighted error is kept, and its minimum is the
    one the next steps' codes are measured from (C updates ``min`` in the loop)."""
    sum_w, sum_x = _seq_sum(weight), _seq_sum(weight * x)
    lo = _first(x, x == x.min(axis=0))
    lo = np.where(lo > 0, _F(0), lo).astype(np.float32)  # C: if (min > 0) min = 0
    hi = _first(x, x == x.max(axis=0))
    flat = hi <= lo  # C returns at once: codes 0, scale 0
    lo_flat, hi = lo, np.where(flat, lo + _F(1), hi)
    iscale = _F(levels) / (hi - lo)
    scale = _F(1) / iscale
    codes = _qkx3_codes(x, iscale, lo, levels)
    best_err = _qkx3_error(x, weight, codes, scale, lo)
    for step in range(37):
        iscale = (_F(-0.9) + _F(0.05) * _F(step) + _F(levels)) / (hi - lo)
        lv = _qkx3_codes(x, iscale, lo, levels)
        wl = weight * lv
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lv), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(np.float32)
        this_min = np.where(positive, _F(0), this_min).astype(np.float32)
        err = _qkx3_error(x, weight, lv, this_scale, this_min)
        take = (det > 0) & (err < best_err)
        best_err = np.where(take, err, best_err)
        scale = np.where(take, this_scale, scale)
        lo = np.where(take, this_min, lo)
        codes = np.where(take, lv, codes)
    return (
        np.where(flat, _F(0), scale),
        np.where(flat, lo_flat, lo),
        np.where(flat, 0, codes.astype(np.int32)),
    )


#: for an integer i in [-128, 114] (index i + 128): the IQ4_NL levels just below and above
#: floor(v) = i (the levels are integers, so these bracket any v with that floor); mu, the
#: first level above v, clipped to [1, 15] as best_index_int8's search ends
_MU = np.clip(np.searchsorted(IQ4NL_VALUES, np.arange(-128, 115), side="right"), 1, 15)
_BELOW, _ABOVE = IQ4NL_VALUES[_MU - 1], IQ4NL_VALUES[_MU]


def _bracket(v: np.ndarray):
    """(slot of floor(v) in _MU, the levels around v, whether best_index_int8 takes the lower):
    the nearest level, the upper one on a tie, with the distances taken in float32 as C does.
    Below the first level and above the last the comparison picks the end level itself."""
    k = np.floor(np.clip(v, _F(-128), _F(114))).astype(np.intp) + 128
    below, above = np.take(_BELOW, k), np.take(_ABOVE, k)
    return k, below, above, (v - below) < (above - v)


def _best_index(v: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, v): the level's index."""
    k, _, _, lower = _bracket(v)
    return np.take(_MU, k) - lower


def _iq4_sums(x, weight, iscale):
    """One candidate scale: (sum w q x, sum w q^2) over the levels q it picks."""
    _, below, above, lower = _bracket(iscale * x)
    q = np.where(lower, below, above)
    wq = weight * q
    return _seq_sum(wq * x), _seq_sum(wq * q)


def _iq4_nl(x: np.ndarray, qw: np.ndarray | None):
    """quantize_iq4_nl (ntry 7, one 32-weight block per scale): (d, codes). Start at
    -max/-127, refit by weighted least squares, try (itry - 127)/max for itry = -7..7, keep the
    best; the codes are then re-chosen with 1/d of the kept (not yet float16) scale."""
    sigma2 = _seq_sum(x * x) * _F(2.0 / BLOCK)
    weight = x * x if qw is None else qw * np.sqrt(sigma2 + x * x)
    amax, mx = _signed_absmax(x)
    live = amax >= _EPS
    mx = np.where(live, mx, _F(1))
    d = -mx / _F(-127)
    sumqx, sumq2 = _iq4_sums(x, weight, _F(1) / d)
    d = np.where(sumq2 > 0, sumqx / sumq2, _F(0)).astype(np.float32)
    best = d * sumqx
    for itry in range(-7, 8):
        iscale = _F(itry - 127) / mx
        sumqx, sumq2 = _iq4_sums(x, weight, iscale)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(take, sumqx / sumq2, d)
        best = np.where(take, d * sumqx, best)
    d = np.where(live, d, _F(0)).astype(np.float32)
    return d, _best_index(_inverse(d) * x)


# --------------------------------------------------------------------------- packing


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [n, 32] two per byte: byte j holds element j (low) and j + 16 (high)."""
    lo = (q & 0x0F).astype(np.uint8)
    return lo[:, :16] | (lo[:, 16:] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of codes [n, 32] as a little-endian uint32 (element j at bit j)."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _pack(qtype: str, *parts) -> np.ndarray:
    """ggml's block layout: [d, (m), (qh), qs] per block, uint8 [n_blocks, block_bytes], from
    (d, [m,] codes [32, n_blocks])."""
    if qtype in ("Q4_1", "Q5_1"):
        d, m, q = parts
        head = [_fp16(d), _fp16(m)]
    else:
        d, q = parts
        head = [_fp16(d)]
    q = np.ascontiguousarray(q.T)
    if qtype == "Q8_0":
        body = [q.astype(np.int8).view(np.uint8)]
    elif qtype in ("Q5_0", "Q5_1"):
        body = [_high_bits(q), _nibbles(q)]
    else:
        body = [_nibbles(q)]
    return np.concatenate(head + body, axis=1)


# ------------------------------------------------------------------------- dequantizing


def fake_quant(w: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``w`` (float32 [rows, cols]) quantized as :func:`quantize` does and read back as
    llama.cpp reads the blocks (the float16 scales included, so a search scoring this sees the
    fp16 rounding inside its objective): float32 [rows, cols]."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    check_quantizable("weight", w.shape, qtype)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if qtype not in USES_IMATRIX:
        imatrix = None
    out = np.empty_like(w)
    step = max(1, CHUNK // w.shape[1])
    for r in range(0, w.shape[0], step):
        part = w[r : r + step]
        x = np.ascontiguousarray(part.reshape(-1, BLOCK).T)  # [32, n_blocks], as quantize
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            parts = _quantize_blocks(x, part, qtype, imatrix)
        out[r : r + step] = _dequantize(qtype, *parts).T.reshape(part.shape)
    return out


def _half(v: np.ndarray) -> np.ndarray:
    """A float32 scale as the file stores it (float16) and ggml reads it back."""
    return v.astype(np.float32).astype(np.float16).astype(np.float32)


def _dequantize(qtype: str, *parts) -> np.ndarray:
    """dequantize_row_* of (d, [m,] codes [32, n_blocks]): float32 [32, n_blocks]."""
    if qtype in ("Q4_1", "Q5_1"):
        d, m, q = parts
        return _half(d) * q.astype(np.float32) + _half(m)
    d, q = parts
    if qtype == "IQ4_NL":
        return _half(d) * IQ4NL_VALUES[q]
    offset = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}[qtype]
    return _half(d) * (q.astype(np.float32) - np.float32(offset))
