"""``ggml`` ``type: auto``: a GGUF type for every tensor under a size target, one GGUF file.

1. **Tensors.** Every 2-D weight the file stores: the decoder blocks' linears, the token
   embedding (tied to the output head, or an untied head on its own). Norms stay F32 and are
   not counted. ``units: fused`` gives the layers engines fuse (q/k/v, gate/up) one type, as
   ``bits: auto`` does (:func:`quantlab.allocation.fused_units`); ``units: tensor`` (the
   default) lets each tensor take its own, which llama.cpp runs as well (it never fuses them).
2. **Candidates.** The requested types, by default the six llama.cpp quantizers quantlab runs
   exactly (:mod:`quantlab.formats.ggml_quants`) plus F16 for tensors of at most
   :data:`SMALL_WEIGHTS` weights; a type is a default candidate of a tensor only when its rows
   are whole blocks. A type named explicitly that a tensor cannot take is an error.
3. **Cost** is the tensor's bytes in the type; the target is those bytes (or bits per weight
   over the same weights).
4. **KL per type**, like ``bits: auto`` (:func:`quantlab.allocation.measure`): the tensor
   replaced by what llama.cpp reads back of its blocks in that type (``fake_quant``, with the
   importance matrix exactly where the file uses one), everything else float; KL(float ||
   probe) per token on the probe windows, forward from the tensor's decoder layer (the
   sensitivity runner's cached hidden states).
5. **Knapsack**: :func:`quantlab.allocation.solve` minimises the summed KL with the summed
   bytes within the target; the chosen mix is then probed as a whole and its measured KL
   recorded beside the predicted sum. llama.cpp's own KLD of the file is the final word.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.ggml_quants import BLOCK, BLOCK_BYTES, TYPES, fake_quant, row_bytes

#: bytes per weight of the float types a tensor can stay in
FLOAT_BYTES = {"F16": 2, "F32": 4}
#: every type the allocation can give a tensor
ALL_TYPES = (*TYPES, *FLOAT_BYTES)
#: tensors of at most this many weights get F16 among the default candidates (its 16 bits
#: matter little there; a large tensor at F16 would only be probed to be refused)
SMALL_WEIGHTS = 1 << 17
#: budget steps of the knapsack: each unit's bytes round up to target / STEPS, so the chosen
#: mix can fall short of the target by at most units / STEPS of it (0.2% for 200 units)
STEPS = 100_000
_UNITS = ("B", "KB", "MB", "GB", "KIB", "MIB", "GIB")
_SCALE = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_target(value: float | str) -> tuple[str, float]:
    """("bpw", bits per weight) for a number, ("bytes", n) for '85MB', '81MiB', '9e7B'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value <= 32:
            raise ValueError(f"size_target {value} bits per weight: give 0 < bits <= 32")
        return "bpw", float(value)
    text = str(value).strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), None)
    try:
        number = float(text[: -len(unit)] if unit else text)
    except ValueError:
        number = None
    if unit is None or number is None or number <= 0:
        raise ValueError(
            f"size_target {value!r}: give bits per weight (a number, e.g. 4.5) or bytes with "
            "a unit (e.g. 85MB, 81MiB, 90000000B)"
        )
    return "bytes", number * _SCALE[unit]


def tensor_bytes(shape: tuple[int, int], qtype: str) -> int:
    """Bytes of a [rows, columns] tensor stored as ``qtype``."""
    rows, cols = shape
    if qtype in FLOAT_BYTES:
        return rows * cols * FLOAT_BYTES[qtype]
    return rows * row_bytes(qtype, cols)


def fits(shape: tuple[int, int], qtype: str) -> bool:
    """Whether a tensor's rows are whole blocks of ``qtype`` (floats fit any row)."""
    return qtype in FLOAT_BYTES or (qtype in BLOCK_BYTES and shape[1] % BLOCK == 0)


def allocated_weights(model: nn.Module, block_linears: list[str]) -> dict[str, tuple[int, int]]:
    """{module name: [rows, columns]} of every 2-D weight the file stores: the blocks'
    linears, the token embedding (the output head too when tied), an untied output head."""
    out = {n: tuple(model.get_submodule(n).weight.shape) for n in block_linears}
    emb = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    out[names[id(emb)]] = tuple(emb.weight.shape)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        out[names[id(head)]] = tuple(head.weight.shape)
    return out


def candidates(
    shapes: dict[str, tuple[int, int]], requested: list[str] | None
) -> dict[str, list[str]]:
    """Each tensor's candidate types (see the module docstring); a requested type a tensor
    cannot take is one error naming the tensor and the types it can."""
    out = {}
    for name, shape in shapes.items():
        if requested is None:
            small = ["F16"] if shape[0] * shape[1] <= SMALL_WEIGHTS else []
            out[name] = [t for t in TYPES if fits(shape, t)] + small
            if not out[name]:  # no block type fits: it can only stay float
                out[name] = ["F16"]
            continue
        bad = [t for t in requested if not fits(shape, t)]
        if bad:
            ok = [t for t in ALL_TYPES if fits(shape, t)]
            raise QuantlabError(
                f"ggml type: auto: tensor '{name}' of shape {shape} cannot take "
                f"{', '.join(bad)} (rows of {shape[1]} weights are not whole {BLOCK}-weight "
                f"blocks); types it can take: {', '.join(ok)}"
            )
        out[name] = list(requested)
    return out


def unit_costs(
    units: dict[str, list[str]],
    cands: dict[str, list[str]],
    shapes: dict[str, tuple[int, int]],
) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """(types every member of a unit can take, {unit: {type: bytes of its members}})."""
    types = {
        u: [t for t in cands[ms[0]] if all(t in cands[m] for m in ms)] for u, ms in units.items()
    }
    for u, ts in types.items():
        if not ts:
            raise QuantlabError(
                f"ggml type: auto: the fused layers {', '.join(units[u])} have no candidate type "
                "in common; use units: tensor"
            )
    cost = {
        u: {t: sum(tensor_bytes(shapes[m], t) for m in units[u]) for t in types[u]} for u in units
    }
    return types, cost


def target_bytes(target: float | str, n_weights: int) -> float:
    """The size target in bytes of the allocated tensors."""
    kind, value = parse_target(target)
    return value * n_weights / 8 if kind == "bpw" else value


def check_target(target: float | str, cost: dict[str, dict[str, int]], n_weights: int) -> None:
    """A target below the smallest mix or above the largest is one error naming the range."""
    lo = sum(min(c.values()) for c in cost.values())
    hi = sum(max(c.values()) for c in cost.values())
    want = target_bytes(target, n_weights)
    if not lo <= want <= hi:
        near = min(max(want, lo), hi)
        raise QuantlabError(
            f"ggml type: auto: size_target {target} ({want:.0f} bytes, "
            f"{8 * want / n_weights:.3f} bits per weight) cannot be met: the candidate types "
            f"store these {n_weights} weights in {lo} to {hi} bytes ({8 * lo / n_weights:.3f} to "
            f"{8 * hi / n_weights:.3f} bits per weight); choose a target in that range "
            f"(nearest feasible: {8 * near / n_weights:.3f} bits per weight, {near:.0f}B)"
        )


def plan(model: nn.Module, block_linears: list[str], config) -> dict:
    """Before any work: the units, their candidate types and costs, and the target checked.
    ``config``: the ggml config (size_target, candidates, units)."""
    from quantlab.allocation import fused_units

    shapes = allocated_weights(model, block_linears)
    cands = candidates(shapes, config.candidates)
    if config.units == "fused":
        units = fused_units(model, block_linears)
        units.update({n: [n] for n in shapes if n not in block_linears})
    else:
        units = {n: [n] for n in shapes}
    types, cost = unit_costs(units, cands, shapes)
    n_weights = sum(r * c for r, c in shapes.values())
    check_target(config.size_target, cost, n_weights)
    return {"shapes": shapes, "units": units, "types": types, "cost": cost, "weights": n_weights}


def _probe_weight(w: torch.Tensor, qtype: str, importance: np.ndarray | None) -> torch.Tensor:
    """What llama.cpp computes with in place of ``w`` stored as ``qtype``."""
    if qtype == "F32":
        return w
    if qtype == "F16":
        return w.half().to(w.dtype)
    fq = fake_quant(w.detach().float().cpu().numpy(), qtype, importance)
    return torch.from_numpy(fq).to(w.dtype)


def make_probe(model: nn.Module, ids: torch.Tensor, importance: dict[str, np.ndarray | None]):
    """(probe, runner): probe({module: type}) sets those weights to their quantized values,
    returns KL(float || model) per token on ``ids`` and puts the float weights back."""
    from quantlab.sensitivity import _Runner

    runner = _Runner(model, ids)

    def probe(types: dict[str, str]) -> float:
        saved = {}
        try:
            for m, t in types.items():
                p = model.get_submodule(m).weight
                saved[m] = p.data
                p.data = _probe_weight(p.data, t, importance.get(m))
            return runner.kl(runner.start_layer(list(types)))
        finally:
            for m, data in saved.items():
                model.get_submodule(m).weight.data = data

    return probe


def choose_types(
    model: nn.Module,
    ids: torch.Tensor,
    layout: dict,
    config,
    importance: dict[str, np.ndarray | None],
    log: Callable[[str], None],
    known_kl: dict | None = None,
) -> dict:
    """The allocation of ``layout`` (:func:`plan`) under ``config.size_target``, measured on
    ``ids`` [windows, tokens]; ``importance``: {module: the importance its blocks are
    quantized with, or None}; ``known_kl``: the "kl" of an earlier record of the same layout,
    windows and probe (it does not depend on the target). Returns the record (JSON-ready;
    ``tensor_types``: {module: type}). ``model`` is left as it was."""
    from quantlab.allocation import solve

    t0 = time.perf_counter()
    units, types, cost, n = layout["units"], layout["types"], layout["cost"], layout["weights"]
    budget = target_bytes(config.size_target, n)
    probe = make_probe(model, ids, importance)
    if known_kl:  # an earlier record's: only this layout's candidates
        kl = {u: {t: known_kl[u][t] for t in types[u]} for u in units}
    else:
        kl = _unit_kls(model, layout, config.probe, probe, importance, log)
    kl_s = time.perf_counter() - t0
    chosen = _solve(kl, cost, budget, solve)
    tensor_types = {m: chosen[u] for u, ms in units.items() for m in ms}
    used = sum(cost[u][t] for u, t in chosen.items())
    rec = {
        "size_target": config.size_target,
        "target_bytes": budget,
        "target_bits_per_weight": 8 * budget / n,
        "bytes": used,
        "bits_per_weight": 8 * used / n,
        "weights": n,
        "units": units,
        "candidates": types,
        "kl": kl,
        "chosen": chosen,
        "tensor_types": tensor_types,
        "type_counts": _counts(tensor_types),
        "predicted_kl": sum(kl[u][t] for u, t in chosen.items()),
        "measured_kl": probe(tensor_types),
        "probe": config.probe,
        "probe_means": PROBES[config.probe],
        "kl_seconds": kl_s,
        "solver": f"multiple-choice knapsack (quantlab.allocation.solve), {STEPS} byte steps",
        "windows": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
    }
    rec["seconds"] = time.perf_counter() - t0
    mix = ", ".join(f"{c} x {t}" for t, c in rec["type_counts"].items())
    log(
        f"type allocation: {mix}; {rec['bits_per_weight']:.3f} bits/weight (target "
        f"{rec['target_bits_per_weight']:.3f}); KL predicted {rec['predicted_kl']:.4f}, "
        f"measured {rec['measured_kl']:.4f} in {rec['seconds']:.0f} s"
    )
    return rec


#: what each ``probe`` measures
PROBES = {
    "full": "every unit at every candidate type: llama.cpp's blocks of the type read back "
    "(ggml_quants.fake_quant, importance as in the file), the rest float, KL(float || probe) "
    "per token (nats)",
    "scaled": "every unit at its smallest quantized type, KL(float || probe) per token "
    "(nats); its other types' KL = that KL x the ratio of their importance-weighted squared "
    "weight errors (one forward per unit instead of one per type: a prediction)",
}


def _unit_kls(model, layout: dict, how: str, probe, importance: dict, log) -> dict:
    """{unit: {type: KL}} by ``how`` (:data:`PROBES`)."""
    from quantlab.allocation import measure

    units, types, cost = layout["units"], layout["types"], layout["cost"]
    if how == "full":
        log(
            f"type allocation: {len(units)} units, {sum(map(len, types.values()))} probes "
            "(KL at every type)"
        )
        return measure(units, types, probe, log=log)
    # the smallest quantized type has the largest error: the best-resolved KL of the unit
    ref = {
        u: min((t for t in types[u] if t not in FLOAT_BYTES), key=cost[u].get, default=types[u][0])
        for u in units
    }
    log(f"type allocation: {len(units)} probes (KL at each unit's smallest type, scaled)")
    at_ref = measure(units, {u: [ref[u]] for u in units}, probe, log=log)
    out = {}
    for u, members in units.items():
        err = {
            t: sum(_weighted_error(model, m, t, importance.get(m)) for m in members)
            for t in types[u]
        }
        k = at_ref[u][ref[u]]
        out[u] = {t: (k * err[t] / err[ref[u]] if err[ref[u]] > 0 else 0.0) for t in types[u]}
    return out


def _weighted_error(model: nn.Module, module: str, qtype: str, importance) -> float:
    """sum_ij importance_j (w_q - w)_ij^2 of a module's weight stored as ``qtype`` (importance
    1 where none)."""
    w = model.get_submodule(module).weight.detach().float()
    d = (_probe_weight(w, qtype, importance) - w).double()
    col = torch.ones(w.shape[1], dtype=torch.float64)
    if importance is not None:
        col = torch.from_numpy(np.asarray(importance, dtype=np.float64))
    return float((d * d).sum(0) @ col)


def _solve(kl: dict, cost: dict, budget: float, solve) -> dict[str, str]:
    """{unit: type}: the knapsack over type indices (the solver's picks are integers)."""
    names = {u: list(kl[u]) for u in kl}
    k_idx = {u: {i: kl[u][t] for i, t in enumerate(names[u])} for u in kl}
    c_idx = {u: {i: cost[u][t] for i, t in enumerate(names[u])} for u in kl}
    try:
        picks = solve(k_idx, c_idx, budget, steps=STEPS)
    except QuantlabError:
        # the target is feasible (checked) but within rounding of the smallest mix: take it
        picks = {u: min(c_idx[u], key=c_idx[u].get) for u in kl}
    return {u: names[u][i] for u, i in picks.items()}


def _counts(tensor_types: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensor_types.values():
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


def write_mixed_gguf(
    model: nn.Module,
    path: Path,
    template: Path,
    types: dict[str, str],
    importance: dict[str, np.ndarray] | None,
) -> dict[str, str]:
    """``model`` as a GGUF file with each tensor in its own type (``types``: {GGUF name:
    type}; blocks by :func:`quantlab.formats.ggml_quants.quantize`, with ``importance[GGUF
    name]`` for the blocks' tensors as llama.cpp applies it), 1-D tensors F32. The file type
    named in its metadata is the type that holds the most weights."""
    from quantlab.formats.gguf import export_ggml

    return export_ggml(model, path, template, types, importance=importance)


def gguf_name_map(model: nn.Module, modules: list[str], template: Path) -> dict[str, str]:
    """{module name: GGUF tensor name of its weight}."""
    from quantlab.formats.gguf import gguf_weight_names

    out = gguf_weight_names(modules, template)
    for m, g in out.items():
        if g is None:
            raise QuantlabError(f"ggml type: auto: '{m}' has no tensor in the GGUF layout")
    return out


def allocate_gguf(
    model: nn.Module,
    block_linears: list[str],
    calibration: torch.Tensor,
    template: Path,
    importance: dict[str, np.ndarray] | None,
    config,
    log: Callable[[str], None],
    known_kl: dict | None = None,
) -> dict:
    """The ggml backend's type: auto: the record of :func:`choose_types` on the first
    ``config.probe_windows`` calibration windows, with ``gguf_tensor_types`` ({GGUF name:
    type}, what :func:`write_mixed_gguf` takes). ``importance``: {GGUF name: imatrix} or None;
    as in the file, it weighs the blocks' tensors and not the embedding/head."""
    layout = plan(model, block_linears, config)
    gnames = gguf_name_map(model, list(layout["shapes"]), template)
    imp = {
        m: (importance or {}).get(g) if g.startswith("blk.") else None for m, g in gnames.items()
    }
    ids = probe_windows(calibration, config.probe_windows, config.probe_seq_len)
    rec = choose_types(model, ids, layout, config, imp, log, known_kl)
    rec["gguf_tensor_types"] = {gnames[m]: t for m, t in rec["tensor_types"].items()}
    return rec


def probe_windows(calibration: torch.Tensor, windows: int, seq_len: int) -> torch.Tensor:
    """The first ``windows`` calibration windows cut to ``seq_len`` tokens."""
    return calibration[:windows, : min(seq_len, calibration.shape[1])]
