"""Sharded safetensors output, written tensor by tensor with bounded memory.

:class:`ShardWriter` appends each tensor's bytes to the current shard's data file as soon as
it is given (a decoder layer at a time: nothing waits in memory for a shard to fill), starts
a new shard when the next tensor would pass ``max_shard_bytes`` (5 GB by default, the Hub's
convention), and seals a shard by writing its header followed by its tensors in the order
safetensors' own writer uses (by dtype, widest first: every tensor stays aligned for readers
that map the file). Until :meth:`ShardWriter.close` every file bears a temporary name: a directory
whose writer failed never holds something a loader takes for weights. One shard is
``model.safetensors``; several are ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json`` (``metadata.total_size``: bytes of tensor data, as
transformers writes it). The caller moves the whole directory into place when it is complete
(:mod:`quantlab.streaming.export`).

A write that fails for want of room (a full disk, a quota, a file size limit) is a
QuantlabError naming the file and the free space; the caller removes what was written.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantlab.errors import QuantlabError
from quantlab.streaming.shards import INDEX, SINGLE

#: the Hub's shard size (transformers' save_pretrained default, "5GB")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",  # quanto's float8 weights
    torch.float8_e5m2: "F8_E5M2",
}
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_COPY_CHUNK = 64 << 20


def no_room_error(path: Path, e: OSError) -> QuantlabError:
    """The one-line error of a write refused for want of room."""
    try:
        free = shutil.disk_usage(path.parent).free
        where = f"{free / 1e9:.2f} GB free on that file system"
    except OSError:
        where = "free space unknown"
    why = {
        errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
        errno.EDQUOT: "the disk quota is used up",
    }.get(e.errno, "the disk is full")
    return QuantlabError(
        f"cannot write '{path}': {why} ({where}); the partial export was removed. "
        "Free space (or write the output elsewhere) and run again"
    )


@dataclass
class _Shard:
    data: Path
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = field(default_factory=list)
    nbytes: int = 0


class ShardWriter:
    """``w = ShardWriter(dir)``; ``w.add(name, tensor)`` ...; ``w.close()`` -> the files written
    and ``total_size``. :meth:`abort` removes every file it wrote."""

    def __init__(
        self,
        directory: str | Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        if max_shard_bytes < 1:
            raise QuantlabError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self.sealed: list[tuple[Path, list[str]]] = []  # (temporary file, tensor names)
        self.total_size = 0
        self._names: set[str] = set()
        self._shard: _Shard | None = None
        self._fh = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (copied to CPU, contiguous) to the current shard."""
        if name in self._names:
            raise QuantlabError(f"tensor '{name}' was written twice into '{self.dir}'")
        if tensor.dtype not in _ST_DTYPES:
            raise QuantlabError(
                f"tensor '{name}' has dtype {tensor.dtype}, which safetensors does not store"
            )
        t = tensor.detach().to("cpu").contiguous()
        # the tensor's own bytes, no copy (tobytes would double a large tensor's memory)
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        s = self._shard
        if s is not None and s.entries and s.nbytes + len(raw) > self.max_shard_bytes:
            self._seal()
        if self._shard is None:
            data = self.dir / f".shard-{len(self.sealed) + 1:05d}.data"
            self._shard = _Shard(data)
            self._fh = open(data, "wb")  # noqa: SIM115 - closed in _seal / abort
        s = self._shard
        _io(s.data, lambda: self._fh.write(raw))
        s.entries.append((name, _ST_DTYPES[t.dtype], tuple(t.shape), s.nbytes, len(raw)))
        s.nbytes += len(raw)
        self.total_size += len(raw)
        self._names.add(name)

    def _seal(self) -> None:
        """Close the current shard: header, then its tensors widest dtype first, into a file
        with a temporary name; its data file is removed."""
        s, fh = self._shard, self._fh
        self._shard = self._fh = None
        _io(s.data, fh.close)
        order = sorted(s.entries, key=lambda e: (-_RANK[e[1]], e[0]))
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name, dtype, shape, _, n in order:
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the spec's padding: data starts 8-byte aligned
        final = s.data.with_suffix(".safetensors.partial")
        with open(s.data, "rb") as src:
            dst = _io(final, lambda: open(final, "wb"))  # noqa: SIM115 - closed below
            try:
                _io(final, lambda: dst.write(len(head).to_bytes(8, "little") + head))
                for _, _, _, begin, n in order:
                    src.seek(begin)
                    while n:
                        chunk = src.read(min(n, _COPY_CHUNK))
                        _io(final, lambda c=chunk: dst.write(c))
                        n -= len(chunk)
            finally:
                _io(final, dst.close)
        s.data.unlink()
        self.sealed.append((final, [e[0] for e in s.entries]))

    def close(self) -> dict:
        """Seal the last shard and give every shard its final name (and the index, when there
        are several). Returns ``{"files": [names], "total_size": bytes of tensor data}``."""
        if self._shard is not None:
            self._seal()
        if not self.sealed:
            raise QuantlabError(f"no tensor was written into '{self.dir}'")
        n = len(self.sealed)
        names = (
            [SINGLE]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        for (tmp, _), name in zip(self.sealed, names):
            tmp.rename(self.dir / name)
        if n > 1:
            wmap = {t: name for (_, tensors), name in zip(self.sealed, names) for t in tensors}
            doc = {"metadata": {"total_size": self.total_size}, "weight_map": wmap}
            _io(self.dir / INDEX, lambda: (self.dir / INDEX).write_text(json.dumps(doc, indent=2)))
        return {"files": names, "total_size": self.total_size}

    def abort(self) -> None:
        """Remove every file this writer made (a failed export leaves none of them)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
        paths = [tmp for tmp, _ in self.sealed]
        if self._shard is not None:
            paths.append(self._shard.data)
        for p in paths:
            p.unlink(missing_ok=True)
            p.with_suffix(".safetensors.partial").unlink(missing_ok=True)
        self._shard = self._fh = None
        self.sealed = []


#: safetensors' own order of dtypes (its Rust ``Dtype`` enum): a shard lists tensors by this rank,
#: highest first, then by name, as ``safetensors.torch.save_file`` does; every tensor then starts
#: aligned to its width, and a one-shard export is byte for byte the file save_file writes
_RANK = {
    "BOOL": 0,
    "U8": 4,
    "I8": 5,
    "F8_E5M2": 6,
    "F8_E4M3": 7,
    "I16": 9,
    "U16": 10,
    "F16": 11,
    "BF16": 12,
    "I32": 13,
    "U32": 14,
    "F32": 15,
    "F64": 16,
    "I64": 17,
    "U64": 18,
}


def _io(path: Path, fn):
    """``fn()``, a write to ``path``: no room to write is a QuantlabError naming the file."""
    try:
        return fn()
    except OSError as e:
        if e.errno in _NO_ROOM:
            raise no_room_error(path, e) from None
        raise
