"""Kernels chosen at load: what executes a packed layer.

A layout (GPTQ v1, AWQ gemm) says how a grid is *stored*; a kernel says how a layer holding it
*runs*. Every packed layer can run ``dense`` (its codes dequantized once into a float weight,
``F.linear``: :class:`~quantlab.formats.base.DenseDequantLinear`). The kernels here read
packed weights instead, which is what makes a 4-bit model faster than a float one where decode
is memory-bound:

- ``int4pack``: 4-bit codes in groups of 32-256 columns. CPU:
  ``aten._weight_int4pack_mm_for_cpu``; CUDA: ``aten._weight_int4pack_mm``. Both take
  bfloat16 activations and bfloat16 scales and zero points; the layer casts its input to
  bfloat16 and its output back. Act-order grids (GPTQ ``desc_act``) are run by permuting the
  input columns so that each group is contiguous.
- ``int8pack``: 8-bit codes with one group per output channel (``group_size: -1``).
  ``aten._weight_int8pack_mm`` (CPU), bfloat16 activations; a zero point other than 128 is
  added back exactly as ``sum(x) * (128 - zero) * scale`` per output.

Both kernels change the numerics (bfloat16 activations, bfloat16 scales): a row records the
kernel that produced it, and the tests check each against ``dense``.

``auto`` prepares every kernel that can run a shape and times it against ``dense`` at several
token counts, every pass running all the packed layers in model order (so the weights come
from wherever a decode step finds them, not from a cache warmed by one layer), and keeps a
kernel for the token counts up to the largest at which it beat ``dense`` at every smaller
count; above that (prefill) the layer keeps its dense path. The
choice and the timings are returned (and recorded in the results row); replaying a recorded
choice (``choices``) skips the timing, so the speed phase measures what the scoring measured.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.base import DenseDequantLinear, QuantizedWeight

#: what ``eval.kernel`` / ``--kernel`` accept
KERNEL_CHOICES = ("auto", "dense", "int4pack", "int8pack")
#: the default of every entry point a person uses (recipes, ``quantlab eval``, ``quantlab.load``,
#: ``quantlab.evaluate``): the fastest path that is exact enough. ``auto`` keeps a kernel only
#: where it beat dense on this machine and scores long windows densely, so perplexity and KL
#: equal dense's; ``dense`` as a default told newcomers that 4-bit decodes slower than float
DEFAULT_KERNEL = "auto"
#: token counts ``auto`` times (1: decode at batch 1; 64: a short prefill)
TIMING_TOKENS = (1, 4, 16, 64)
INT4_GROUPS = (32, 64, 128, 256)


class FastPath(nn.Module):
    """A packed layer's kernel: tensors in the kernel's own layout (non-persistent buffers:
    never saved, rebuilt at every load) and a ``forward`` without the bias (the layer adds it).
    ``max_tokens``: the layer uses it for inputs of at most that many tokens (None: all)."""

    name: str = ""
    max_tokens: int | None = None

    def label(self) -> str:
        act = "bf16 activations"
        return (
            f"{self.name}({act})"
            if self.max_tokens is None
            else f"{self.name}({act}, <={self.max_tokens} tokens; dense-dequant above)"
        )


def _contiguous_groups(q: QuantizedWeight) -> tuple[torch.Tensor | None, int]:
    """The input permutation that makes every group contiguous (None: already is), and the
    group size; raises ValueError when groups are not of one size."""
    in_f = q.codes.shape[1]
    gs = in_f if q.group_size == -1 else q.group_size
    g_idx = q.g_idx.long().cpu()
    static = torch.arange(in_f) // gs
    if torch.equal(g_idx, static):
        return None, gs
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], static):
        raise ValueError("its groups are not all of one size")
    return perm, gs


class Int4Pack(FastPath):
    name = "int4pack"

    def __init__(self, q: QuantizedWeight, device: torch.device):
        super().__init__()
        perm, gs = _contiguous_groups(q)
        codes, g_idx = q.codes.to(device), q.g_idx.long().to(device)
        if perm is not None:
            codes, g_idx = codes[:, perm.to(device)], g_idx[perm.to(device)]
        self.group_size, self.out_features = gs, codes.shape[0]
        self.register_buffer("perm", None if perm is None else perm.to(device), persistent=False)
        # the kernel dequantizes (code - 8) * scale + zero; the grid is (code - z) * scale
        scales = q.scales.float().to(device)
        zeros = (8 - q.zeros.float().to(device)) * scales
        sz = (
            torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).contiguous()
        )  # [n_groups, out, 2]
        self.register_buffer("scales_and_zeros", sz, persistent=False)
        w = codes.to(torch.int32).contiguous()
        if device.type == "cuda":
            pairs = ((w[:, ::2] << 4) | w[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 2)
        self.register_buffer("packed", packed, persistent=False)
        self._mm = (
            torch.ops.aten._weight_int4pack_mm
            if device.type == "cuda"
            else torch.ops.aten._weight_int4pack_mm_for_cpu
        )

    @staticmethod
    def check(q: QuantizedWeight, device: torch.device) -> str | None:
        if q.bits != 4:
            return f"int4pack runs 4-bit codes, not {q.bits}-bit"
        if device.type not in ("cpu", "cuda"):
            return f"int4pack runs on CPU and CUDA, not {device.type}"
        try:
            _, gs = _contiguous_groups(q)
        except ValueError as e:
            return f"int4pack cannot run it: {e}"
        if gs not in INT4_GROUPS:
            return f"int4pack takes groups of {', '.join(map(str, INT4_GROUPS))} columns, not {gs}"
        out_f, in_f = q.codes.shape
        if device.type == "cuda":  # the tensor-core layout: [n/8][k/(8*16)][32][4]
            if torch.cuda.get_device_capability(device) < (8, 0):
                return "int4pack on CUDA needs compute capability 8.0 or newer"
            if in_f % 128 or out_f % 8:
                return (
                    "int4pack on CUDA needs input widths a multiple of 128 and outputs of 8 "
                    f"(got {in_f}x{out_f})"
                )
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = self._mm(
            x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Pack(FastPath):
    name = "int8pack"

    def __init__(self, q: QuantizedWeight, device: torch.device):
        super().__init__()
        scales = q.scales[0].float().to(device)  # one group: [out]
        zeros = q.zeros[0].float().to(device)
        self.out_features = q.codes.shape[0]
        self.register_buffer(
            "weight", (q.codes.to(device) - 128).to(torch.int8).contiguous(), persistent=False
        )
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        # (code - z) * s = (code - 128) * s + (128 - z) * s: the second term is per output
        corr = (128 - zeros) * scales
        self.register_buffer("correction", None if not corr.any() else corr, persistent=False)

    @staticmethod
    def check(q: QuantizedWeight, device: torch.device) -> str | None:
        if q.bits != 8:
            return f"int8pack runs 8-bit codes, not {q.bits}-bit"
        if device.type != "cpu":
            return f"int8pack runs on CPU here, not {device.type}"
        if q.scales.shape[0] != 1:
            return "int8pack runs one group per output channel (group_size: -1)"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.aten._weight_int8pack_mm(
            x2.to(torch.bfloat16).contiguous(), self.weight, self.scales
        )
        y = y.to(x.dtype)
        if self.correction is not None:
            y = y + x2.sum(-1, keepdim=True) * self.correction
        return y.reshape(*x.shape[:-1], self.out_features)


KERNELS: dict[str, type[FastPath]] = {k.name: k for k in (Int4Pack, Int8Pack)}


def check_kernel_name(kernel: str) -> None:
    if kernel not in KERNEL_CHOICES:
        from difflib import get_close_matches

        near = get_close_matches(kernel, KERNEL_CHOICES, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise QuantlabError(
            f"unknown kernel '{kernel}'{hint}; choose one of {', '.join(KERNEL_CHOICES)}"
        )


def shape_key(q: QuantizedWeight) -> str:
    """What a kernel choice depends on: widths, bits, group size, act-order."""
    out_f, in_f = q.codes.shape
    try:
        act = _contiguous_groups(q)[0] is not None
    except ValueError:
        act = True
    return f"{in_f}x{out_f} w{q.bits} g{q.group_size}" + (" act-order" if act else "")


def apply_kernels(
    model: nn.Module,
    kernel: str,
    device: torch.device | str,
    *,
    choices: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Give every packed layer of ``model`` the kernel ``kernel`` asks for (see the module
    docstring); returns the record: per shape, the kernel used, the token counts it serves,
    the timings (``auto``) and why other kernels could not run it. ``choices`` (a previous
    record's ``shapes``) replays a choice instead of timing again."""
    from quantlab.formats import unpack_layer

    check_kernel_name(kernel)
    device = torch.device(device)
    log = log or (lambda _m: None)
    record: dict[str, Any] = {"requested": kernel, "device": str(device), "shapes": {}}
    if kernel == "dense":
        return record
    layers = []  # (shape key, layer, grid) in model order
    for _, m in model.named_modules():
        if isinstance(m, DenseDequantLinear) and (q := unpack_layer(m)) is not None:
            layers.append((shape_key(q), m, q))
    by_shape: dict[str, list] = defaultdict(list)
    if not layers:  # a float model (the baseline): nothing to choose
        return record
    for key, m, q in layers:
        by_shape[key].append((m, q))
    why_not = {
        key: {name: why for name, k in KERNELS.items() if (why := k.check(group[0][1], device))}
        for key, group in by_shape.items()
    }
    timings = {}
    if kernel == "auto" and choices is None:
        timings = _time_in_model_order(
            layers, {k: [n for n in KERNELS if n not in w] for k, w in why_not.items()}, device
        )
    for key, group in by_shape.items():
        rec = _choose(
            key, len(group), kernel, why_not[key], timings.get(key), (choices or {}).get(key), log
        )
        record["shapes"][key] = rec
        _install(group, rec, device)
    return record


def _choose(
    key: str,
    count: int,
    kernel: str,
    why_not: dict[str, str],
    timings: dict | None,
    replay: dict | None,
    log,
) -> dict[str, Any]:
    rec: dict[str, Any] = {"layers": count, "why_not": why_not}
    if replay is not None:
        name = replay.get("kernel", "dense-dequant")
        if name != "dense-dequant" and name in why_not:
            raise QuantlabError(
                f"the recorded kernel '{name}' cannot run layers {key} here: {why_not[name]}"
            )
        return {**rec, "kernel": name, "max_tokens": replay.get("max_tokens"), "replayed": True}
    if kernel != "auto":
        if kernel in why_not:
            log(f"kernel: {key} ({count} layers) stays dense-dequant: {why_not[kernel]}")
            return {
                **rec,
                "kernel": "dense-dequant",
                "max_tokens": None,
                "fallback": why_not[kernel],
            }
        return {**rec, "kernel": kernel, "max_tokens": None}
    if not timings or len(timings) == 1:  # no kernel can run this shape
        return {**rec, "kernel": "dense-dequant", "max_tokens": None}
    name, max_tokens = _pick(timings)
    log(
        f"kernel: {key} ({count} layers) -> {name}"
        + (f" up to {max_tokens} tokens" if name != "dense-dequant" else "")
        + "; us/layer "
        + ", ".join(
            f"{c} " + "/".join(f"{t:.0f}" for t in ts.values()) for c, ts in timings.items()
        )
        + f" at {'/'.join(map(str, TIMING_TOKENS))} tokens"
    )
    return {**rec, "kernel": name, "max_tokens": max_tokens, "timings_us": timings}


def _pick(timings: dict[str, dict[int, float]]) -> tuple[str, int | None]:
    """The kernel serving the most token counts faster than dense (ties: the faster at one
    token), and the largest count up to which it wins at every count."""
    best, best_n = "dense-dequant", 0
    dense = timings["dense-dequant"]
    for name, ts in timings.items():
        if name == "dense-dequant":
            continue
        n = 0
        for m in TIMING_TOKENS:
            if ts[m] >= dense[m]:
                break
            n = m
        if n > best_n or (n == best_n and n and ts[1] < timings[best][1]):
            best, best_n = name, n
    return best, (best_n or None) if best != "dense-dequant" else None


@torch.no_grad()
def _time_in_model_order(
    layers: list, usable: dict[str, list[str]], device, passes: int = 3
) -> dict:
    """Microseconds per layer, per shape, of dense and of each usable kernel at each token
    count. Every timing pass runs all the packed layers in model order (a kernel on the
    layers it can run, dense on the others), so the weights come from wherever a decode step
    finds them -- on a CPU whose cache holds a whole layer, timing one layer alone in a loop
    would time the cache. The best of ``passes`` passes is kept."""
    dtype = layers[0][1].compute_dtype
    # the dense path as a loaded checkpoint runs it: from a dense weight made once (a layer a
    # quantizer just left holds only its packed form and would dequantize in every call)
    dense = [m.weight if m.weight is not None else q.dequantize().to(dtype) for _, m, q in layers]
    candidates = ["dense-dequant"] + [n for n in KERNELS if any(n in u for u in usable.values())]
    out: dict[str, dict[str, dict[int, float]]] = {k: {} for k, u in usable.items() if u}
    count = {k: sum(1 for key, _, _ in layers if key == k) for k in out}
    for cand in candidates:
        fns = [KERNELS[cand](q, device) if cand in usable[k] else None for k, _, q in layers]
        fns = [f if f is not None else (lambda x, w=w: F.linear(x, w)) for f, w in zip(fns, dense)]
        for n in TIMING_TOKENS:
            xs = {}
            best: dict[str, float] = {}
            for p in range(passes + 1):  # pass 0 warms up
                spent: dict[str, float] = defaultdict(float)
                for (key, _, q), f in zip(layers, fns):
                    x = xs.setdefault(
                        q.codes.shape[1],
                        torch.randn(n, q.codes.shape[1], dtype=dtype, device=device),
                    )
                    spent[key] += _timed(f, x, device)
                if p:
                    best = {k: min(best.get(k, float("inf")), v) for k, v in spent.items()}
            for key in out:
                if cand == "dense-dequant" or cand in usable[key]:
                    out[key].setdefault(cand, {})[n] = best[key] / count[key] * 1e6
        del fns
    return out


def _timed(f, x: torch.Tensor, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    f(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _install(group, rec: dict, device) -> None:
    if rec["kernel"] == "dense-dequant":
        return
    for m, q in group:
        fast = KERNELS[rec["kernel"]](q, device)
        fast.max_tokens = rec["max_tokens"]
        m.fast = fast
        m.kernel = fast.label()
        if fast.max_tokens is None:
            m.weight = None  # every input goes through the kernel: the dense copy is not needed
        elif m.weight is None:
            m.refresh()  # longer inputs take the dense path: give it its dense weight once
