"""A model directory's safetensors weights, read lazily: ``model.safetensors`` or
``model.safetensors.index.json`` with its shards (the Hugging Face Hub's layouts).

Nothing is read when a source is opened but the headers, which are checked first (a shard
missing from the directory, a truncated shard, an index naming a file outside the directory, a
tensor stored twice are one :class:`QuantlabError` naming the file and what would work).
Tensors are read on demand through safetensors' memory map (``safe_open``), a few at a time
(one decoder layer's), and copied into memory the caller owns: the map is closed after each
read, so pages of the file touched while reading never stay in this process's resident memory
(a mapped page counts in RSS for as long as the map is open, and a 7B model's 13.5 GB would).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlab.errors import QuantlabError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: the largest safetensors header read (real ones are well under a megabyte)
MAX_HEADER = 100 << 20
#: bytes per element of the safetensors dtype names
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_FIX = "re-download or re-export the model (every shard its index names, complete)"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its shard (a file name inside the directory), dtype, shape."""

    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 1)
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _TORCH_DTYPES.get(self.dtype)


def read_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's size: a header size the
    file cannot hold, JSON that does not parse, a tensor whose bytes lie past the end of the
    file (a truncated download) are a QuantlabError naming the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(size - 8, MAX_HEADER):
                raise QuantlabError(
                    f"weights file '{path}' is not a safetensors file (its header "
                    f"size is impossible for a file of {size} bytes); {_FIX}"
                )
            header = json.loads(fh.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except (ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8
        raise QuantlabError(
            f"weights file '{path}' has a header that is not valid JSON "
            f"({type(e).__name__}); {_FIX}"
        ) from None
    if not isinstance(header, dict):
        raise QuantlabError(f"weights file '{path}' has a header that is not a JSON object; {_FIX}")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise QuantlabError(
                f"weights file '{path}': the header entry of '{name}' is not "
                f"{{dtype, shape, data_offsets}}; {_FIX}"
            ) from None
        if end > data:
            raise QuantlabError(
                f"weights file '{path}' is truncated: tensor '{name}' ends at byte "
                f"{end} of its data, the file holds {data}; {_FIX}"
            )
        if begin > end or end - begin != TensorInfo("", dtype, shape).nbytes:
            raise QuantlabError(
                f"weights file '{path}': tensor '{name}' spans {end - begin} bytes, "
                f"not the {TensorInfo('', dtype, shape).nbytes} its shape needs; "
                f"{_FIX}"
            )
    return header


def _no_duplicates(path: Path):
    """A JSON object hook that refuses a key given twice (json keeps the last one silently:
    a tensor listed twice would be read from whichever came last)."""

    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise QuantlabError(f"'{path}' lists '{k}' twice; a tensor is stored once. {_FIX}")
            seen.add(k)
        return dict(pairs)

    return hook


def _index_shards(model_dir: Path, index: Path) -> dict[str, str]:
    """The index's weight map (tensor -> shard file name), each shard a file inside
    ``model_dir``."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates(index))
    except (OSError, ValueError, RecursionError) as e:
        raise QuantlabError(
            f"index '{index}' cannot be read ({type(e).__name__}); {_FIX}"
        ) from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise QuantlabError(
            f"index '{index}' has no weight_map of tensor names to shard files; {_FIX}"
        )
    for shard in sorted(set(wmap.values())):
        target = model_dir / shard
        # by name, not by resolving links: the Hub's cache keeps shards as links into its
        # blobs/ directory, and they are the directory's own files
        if Path(shard).is_absolute() or Path(shard).name != shard or shard in (".", ".."):
            raise QuantlabError(
                f"index '{index}' names shard '{shard}', which is outside the model "
                f"directory '{model_dir}'; an index names files beside it only"
            )
        if not target.is_file():
            raise QuantlabError(
                f"shard '{model_dir / shard}' named by index '{index}' is missing; {_FIX}"
            )
    return wmap


class ShardedSource:
    """The tensors of a model directory, by name, read on demand (see the module docstring).

    ``ShardedSource(model_dir)`` checks the index and every shard's header; ``info[name]`` is a
    :class:`TensorInfo`; :meth:`read` returns copies of the named tensors."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index, single = self.dir / INDEX, self.dir / SINGLE
        if index.is_file():
            wmap = _index_shards(self.dir, index)
        elif single.is_file():
            wmap = None
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            hint = (
                f"it holds {', '.join(found[:3])} without {INDEX}: add the index that came "
                "with them"
                if found
                else "point at a directory with the model's weights"
            )
            raise QuantlabError(
                f"model directory '{self.dir}' has neither {SINGLE} nor {INDEX}; {hint}"
            )
        self.info: dict[str, TensorInfo] = {}
        shards = sorted(set(wmap.values())) if wmap is not None else [SINGLE]
        for shard in shards:
            self._add_shard(shard, wmap)
        if wmap is not None:
            lost = sorted(set(wmap) - set(self.info))
            if lost:
                raise QuantlabError(
                    f"index '{index}' places '{lost[0]}' in '{wmap[lost[0]]}', which "
                    f"does not hold it ({len(lost)} such tensors); {_FIX}"
                )

    def _add_shard(self, shard: str, wmap: dict[str, str] | None) -> None:
        path = self.dir / shard
        for name, entry in read_header(path).items():
            if name == "__metadata__":
                continue
            if name in self.info:
                raise QuantlabError(
                    f"tensor '{name}' is stored twice, in '{self.dir / self.info[name].shard}' "
                    f"and in '{path}'; a tensor is stored once. {_FIX}"
                )
            if wmap is not None and wmap.get(name) != shard:
                raise QuantlabError(
                    f"shard '{path}' holds '{name}', which the index places "
                    f"{'in ' + repr(wmap[name]) if name in wmap else 'nowhere'}; "
                    f"{_FIX}"
                )
            self.info[name] = TensorInfo(shard, str(entry["dtype"]), tuple(entry["shape"]))

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all shards."""
        return sum(t.nbytes for t in self.info.values())

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with ``prefix``, in the order the source lists them."""
        return [n for n in self.info if n.startswith(prefix)]

    def read(
        self,
        names: Iterable[str],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Copies of the named tensors on ``device``, floating ones cast to ``dtype`` (None:
        as stored). Each shard's map is opened for this call only (see the module docstring)."""
        from safetensors import safe_open

        names = list(names)
        unknown = [n for n in names if n not in self.info]
        if unknown:
            raise QuantlabError(
                f"model directory '{self.dir}' holds no tensor '{unknown[0]}' "
                f"({len(unknown)} missing); is it the model its config.json describes?"
            )
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.info[n].shard, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for shard, group in by_shard.items():
            with safe_open(str(self.dir / shard), framework="pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    # copy=True: the result must not keep the map (and its pages) alive
                    out[n] = t.to(device=device, dtype=cast, copy=True)
                    del t
        return {n: out[n] for n in names}
