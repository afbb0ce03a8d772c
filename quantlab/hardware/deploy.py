"""Where to deploy: every row of a run on every card, projected. One record per row and card
(``quantlab hardware RUN --json`` prints them; the report's "Where to deploy" section shows them).
Every speed here is *projected*, never measured; records say so (``projected: true``) and
name what the projection's efficiency was fitted to (``efficiency_source``)."""

from __future__ import annotations

from quantlab.errors import QuantlabError
from quantlab.hardware.cards import GIB, Card
from quantlab.hardware.efficiency import cpu_efficiency, gpu_efficiency
from quantlab.hardware.projection import (
    decode_rate,
    max_batch,
    max_context,
    prefill_rate,
    usable_bytes,
)
from quantlab.hardware.rows import RowModel

#: the context projected when none is asked for (at most the model's own)
DEFAULT_CONTEXT = 4096
#: KV cache element widths; 'auto': 16 bits on a GPU, the run's dtype in the torch CPU engine
KV_DTYPES = {"auto": None, "fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}


def resolve_context(rows: list[RowModel], context: int | None) -> int:
    """The context to project: the one asked for (an error past any row's model context),
    else :data:`DEFAULT_CONTEXT` capped at the shortest model context."""
    shortest = min(rows, key=lambda r: r.shape.max_context)
    if context is None:
        return min(DEFAULT_CONTEXT, shortest.shape.max_context)
    if context < 1:
        raise QuantlabError(f"--context must be at least 1 token, not {context}")
    if context > shortest.shape.max_context:
        raise QuantlabError(
            f"--context {context} is longer than the model's context: {shortest.shape.max_context} "
            f"tokens (max_position_embeddings of row '{shortest.method}' in {shortest.run})"
        )
    return context


def _kv_width(row: RowModel, card: Card, kv_dtype: str) -> float:
    if kv_dtype not in KV_DTYPES:
        raise QuantlabError(f"unknown KV cache dtype '{kv_dtype}'; known: {', '.join(KV_DTYPES)}")
    if KV_DTYPES[kv_dtype]:
        return KV_DTYPES[kv_dtype]
    return row.cpu_kv_bytes if card.kind == "cpu" and row.cpu.engine.startswith("torch") else 2


def _capacity(row: RowModel, card: Card, fp, context: int, batch: int, kv_width: float) -> dict:
    """Fit: bytes held, usable memory, the largest batch and the longest context."""
    kv = row.shape.kv_bytes_per_token(kv_width)
    usable = usable_bytes(card)
    most = max_batch(usable, fp.weight_bytes, kv, context)
    return {
        "kv_cache_bytes_per_element": kv_width,
        "weight_bytes": fp.weight_bytes,
        "weight_bytes_read_per_step": fp.read_bytes,
        "kv_bytes_per_token": kv,
        "usable_bytes": usable,
        "fits": most >= batch,
        "max_batch": most,
        "max_context": max_context(usable, fp.weight_bytes, kv, batch, row.shape.max_context),
    }


def _speeds(row: RowModel, card: Card, fp, eff, cap: dict, context: int, batch: int) -> dict:
    """Projected speeds; none for a row that does not fit (it does not run there)."""
    out = {
        "decode_tokens_per_s_projected": None,
        "decode_bound": None,
        "prefill_tokens_per_s_projected": None,
    }
    if cap["fits"]:
        kv = cap["kv_bytes_per_token"]
        out["decode_tokens_per_s_projected"], out["decode_bound"] = decode_rate(
            row.shape, fp.read_bytes, kv, context, batch, card, eff, row.compute
        )
        out["prefill_tokens_per_s_projected"] = prefill_rate(
            row.shape, fp.read_bytes, context, batch, card, eff, row.compute
        )[0]
    return out


def project(row: RowModel, card: Card, context: int, batch: int, kv_dtype: str = "auto") -> dict:
    """One row on one card: does it fit, and its projected decode and prefill tokens/s there."""
    fp = row.cpu if card.kind == "cpu" else row.gpu
    eff = cpu_efficiency(fp.engine) if card.kind == "cpu" else gpu_efficiency()
    cap = _capacity(row, card, fp, context, batch, _kv_width(row, card, kv_dtype))
    return {
        "run": row.run,
        "method": row.method,
        "backend": row.backend,
        "card": card.name,
        "card_kind": card.kind,
        "engine": fp.engine,
        "projected": True,
        "context": context,
        "batch": batch,
        **cap,
        **_speeds(row, card, fp, eff, cap, context, batch),
        "efficiency_source": eff.source,
        "memory_efficiency": eff.memory,
        "compute_efficiency": eff.compute,
        "layer_overhead_s": eff.layer_overhead_s,
        "kld_mean": row.kld_mean,
        "ppl": row.ppl,
    }


def check_batch(batch: int) -> int:
    if batch < 1:
        raise QuantlabError(f"--batch must be at least 1, not {batch}")
    return batch


def project_rows(
    rows: list[RowModel], cards: list[Card], context: int, batch: int, kv_dtype: str = "auto"
) -> list[dict]:
    """Every row on every card, cards in the order given."""
    check_batch(batch)
    return [project(r, c, context, batch, kv_dtype) for c in cards for r in rows]


def nothing_fits(records: list[dict], card: str) -> str | None:
    """A plain sentence when ``card`` fits none of the rows, else None."""
    mine = [r for r in records if r["card"] == card]
    if not mine or any(r["fits"] for r in mine):
        return None
    small = min(mine, key=lambda r: r["weight_bytes"])
    need = small["weight_bytes"] + small["batch"] * small["context"] * small["kv_bytes_per_token"]
    return (
        f"{card} fits none of the rows at context {small['context']}, batch {small['batch']}: "
        f"the smallest, '{small['method']}', needs {need / GIB:.1f} GiB (weights "
        f"{small['weight_bytes'] / GIB:.1f} GiB + KV cache), the card leaves "
        f"{small['usable_bytes'] / GIB:.1f} GiB to the engine"
    )
