"""A run's rows as the projection sees them: the model's shape (its ``config.json``, kept in
every checkpoint the run exported), and the bytes an engine holds and reads per decode step,
counted from the checkpoint's own files (safetensors headers, GGUF tensor table).

On a GPU, engines serve a model's float tensors in 16 bits (vLLM, TensorRT-LLM, llama.cpp's
CUDA backend for F16 files); quantized tensors (codes, scales, zeros) stay as stored, and a
GGUF file stays as stored. On this machine's CPU the run's own engine runs the row: the torch
engine reads what the run measured (``decode_bound.weight_bytes_per_step``), llama.cpp the
GGUF file. An untied input embedding is a lookup: a step reads one row of it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from quantlab.errors import QuantlabError
from quantlab.hardware.shape import ModelShape, read_shape
from quantlab.report.data import RunData

#: bytes per element as served on a GPU: floats in 16 bits, fp8 in 8, integers as stored
_SERVED = {"F64": 2, "F32": 2, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_STORED = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
#: backends whose matmuls run in int8 (activations quantized too): their prefill peak is int8's
INT8_COMPUTE = frozenset({"int8-dynamic"})


class CheckpointGone(QuantlabError):
    """A row whose checkpoint is no longer on disk (pruned): the others are still projected."""


@dataclass(frozen=True)
class Footprint:
    """What an engine holds in memory and what one decode step reads of it."""

    engine: str
    weight_bytes: int
    read_bytes: int


@dataclass(frozen=True)
class RowModel:
    """One row of a run, ready to project."""

    run: str
    method: str
    backend: str
    shape: ModelShape
    gpu: Footprint
    cpu: Footprint
    compute: str
    cpu_kv_bytes: int  # the run's dtype width: the torch engine's KV cache element
    kld_mean: float | None
    ppl: float | None


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    numel: int
    nbytes: int
    shape: tuple[int, ...]


def _safetensors(path: Path) -> list[_Tensor]:
    """The tensors in a safetensors file's header (nothing else is read)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out = []
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            out.append(_Tensor(name, info["dtype"], math.prod(shape), end - start, shape))
    return out


def _is_input_embedding(t: _Tensor, shape: ModelShape) -> bool:
    return not shape.tied and t.shape == (shape.vocab, shape.hidden) and "lm_head" not in t.name


def _safetensors_footprints(
    ckpt: Path, shape: ModelShape, metrics: dict, mode: str
) -> tuple[Footprint, Footprint]:
    tensors = [t for f in sorted(ckpt.glob("*.safetensors")) for t in _safetensors(f)]
    served = {t.name: t.numel * _SERVED.get(t.dtype, _STORED.get(t.dtype, 1)) for t in tensors}
    lookup = [t for t in tensors if _is_input_embedding(t, shape)]
    gpu_total = sum(served.values())
    gpu_read = gpu_total - sum(served[t.name] for t in lookup) + 2 * shape.hidden * len(lookup)
    stored = sum(t.nbytes for t in tensors)
    measured = (metrics.get("decode_bound") or {}).get("weight_bytes_per_step")
    cpu_read = measured or stored - sum(t.nbytes for t in lookup)
    return (
        Footprint("vLLM-class CUDA engine", gpu_total, gpu_read),
        Footprint(f"torch {mode}", stored, int(cpu_read)),
    )


def gguf_footprint(path: Path, engine: str) -> Footprint:
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(sizes.values())
    # with an output head of its own, the token embedding is a lookup; tied, it is the head
    lookup = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0
    return Footprint(engine, total, total - lookup)


def _config_path(run: RunData, row: pd.Series) -> Path:
    """The model's config.json: the row's checkpoint's, else another row's of the same model."""
    own = run.path / str(row.get("checkpoint")) / "config.json"
    if pd.notna(row.get("checkpoint")) and own.is_file():
        return own
    same = run.frame[run.frame["model"].astype(str) == str(row.get("model"))]
    for ckpt in same["checkpoint"].dropna().astype(str):
        if (run.path / ckpt / "config.json").is_file():
            return run.path / ckpt / "config.json"
    looked = ", ".join(same["checkpoint"].dropna().astype(str)) or "no checkpoint"
    raise QuantlabError(
        f"'{run.path}' holds no config.json of the model of row '{row['method']}' "
        f"(looked in {looked}): re-run the recipe to export its checkpoints"
    )


def _number(v) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def row_model(run: RunData, row: pd.Series) -> RowModel:
    """The row ready to project; a clear error when its checkpoint is gone."""
    ckpt = run.path / str(row.get("checkpoint"))
    if pd.isna(row.get("checkpoint")) or not ckpt.is_dir():
        raise CheckpointGone(f"row '{row['method']}': its checkpoint ({ckpt}) is no longer on disk")
    shape = read_shape(_config_path(run, row))
    mode = str(row.get("speed_mode")) if pd.notna(row.get("speed_mode")) else "eager"
    ggufs = sorted(ckpt.glob("*.gguf"))
    if ggufs:
        gpu, cpu = gguf_footprint(ggufs[0], "llama.cpp CUDA"), gguf_footprint(ggufs[0], "llama.cpp")
    else:
        metrics = run.metrics.get(str(row["method"]), {})
        gpu, cpu = _safetensors_footprints(ckpt, shape, metrics, mode)
    width = {"float32": 4, "float64": 8}.get(str(row.get("dtype")), 2)
    return RowModel(
        str(run.path),
        str(row["method"]),
        str(row["backend"]),
        shape,
        gpu,
        cpu,
        "int8" if row["backend"] in INT8_COMPUTE else "bf16",
        width,
        _number(row.get("kld_mean")),
        _number(row.get("ppl")),
    )


def run_rows(run: RunData) -> tuple[list[RowModel], list[str]]:
    """The run's projectable rows, and a line for each row that cannot be projected (failed,
    or its checkpoint pruned)."""
    rows, skipped = [], []
    for _, row in run.frame.iterrows():
        if "error" in row and pd.notna(row.get("error")):
            skipped.append(f"{row['method']}: the method failed")
            continue
        try:
            rows.append(row_model(run, row))
        except CheckpointGone as e:
            skipped.append(str(e))
    return rows, skipped
