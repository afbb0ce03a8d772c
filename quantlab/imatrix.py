"""Importance matrices as llama.cpp uses them: computed from calibration windows, read from and
written to llama.cpp's imatrix files.

An importance matrix holds, for each linear layer, the sum of x² of every input column over
the calibration tokens and the number of tokens; llama-quantize's importance is their
quotient (a float32 division, as it does it). Entries are keyed by GGUF tensor names
(``blk.0.attn_q.weight``), as llama.cpp's files are; :func:`gguf_names` maps a model's linear
layers to them the way quantlab's GGUF export names tensors.

Two file formats, both read by ``llama-quantize --imatrix`` of the pinned build:

- GGUF (what ``llama-imatrix`` writes by default): ``general.type = imatrix``,
  ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``, and per entry the
  F32 tensors ``NAME.in_sum2`` ([1, columns]) and ``NAME.counts`` ([1, 1], tokens);
- legacy ``.dat`` (``llama-imatrix --output-format dat``): int32 entry count; per entry the
  name, ``ncall`` and the values sum/count * ncall; then the chunk count and the dataset name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantlab.errors import QuantlabError

_GGUF_MAGIC = b"GGUF"


@dataclass
class Imatrix:
    """Per GGUF tensor name: the sum of x² per input column (float32) and the token count."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    #: read from a legacy .dat file (whose entries with ncall 0 llama-quantize takes as they are)
    legacy: bool = False

    def importance(self, name: str) -> np.ndarray:
        """llama-quantize's importance of ``name``: sum / count in float32 (1 where no token
        was seen, as it does)."""
        sums = self.sums[name].astype(np.float32)
        count = self.counts[name]
        if count > 0:
            return sums / np.float32(count)
        return sums if self.legacy else np.ones_like(sums)


def gguf_names(model: nn.Module, layers: list[str]) -> dict[str, str]:
    """{linear layer name: GGUF tensor name} for the llama layout (what quantlab's GGUF export
    writes); a layer without a GGUF name is an error naming it."""
    import gguf

    n_blocks = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    out = {}
    for layer in layers:
        gname = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise QuantlabError(f"layer '{layer}' has no tensor name in the llama GGUF layout")
        out[layer] = gname
    return out


@torch.no_grad()
def compute_imatrix(
    model: nn.Module,
    calibration: torch.Tensor,
    layers: dict[str, str],
    batch_size: int = 4,
    dataset: str = "quantlab calibration",
) -> Imatrix:
    """Sum of x² per input column of each layer in ``layers`` ({module name: GGUF name}) over
    every token of ``calibration`` (LongTensor [windows, seq]), in one pass of the float model
    (float64 sums, stored as float32 like llama-imatrix's)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def add(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return add

    device = next(model.parameters()).device  # windows come on the CPU; the model may not be
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
    try:
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return Imatrix(
        {layers[n]: sums[n].float().cpu().numpy() for n in layers if n in sums},
        {layers[n]: counts[n] for n in layers if n in counts},
        [dataset],
        int(calibration.shape[0]),
        int(calibration.shape[1]),
    )


def check_imatrix(imatrix: Imatrix, columns: dict[str, int], source: str) -> None:
    """Before any quantization: ``imatrix`` has an entry of the right width for every tensor
    in ``columns`` ({GGUF name: input columns}), else one error naming what differs."""
    missing = sorted(n for n in columns if n not in imatrix.sums)
    wrong = sorted(
        f"{n} ({imatrix.sums[n].shape[0]} columns, the tensor has {c})"
        for n, c in columns.items()
        if n in imatrix.sums and imatrix.sums[n].shape[0] != c
    )
    if not missing and not wrong:
        return
    problems = []
    if missing:
        problems.append(
            f"no entry for {len(missing)} tensors ({', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''})"
        )
    if wrong:
        problems.append(
            f"{len(wrong)} entries of another width ({', '.join(wrong[:2])}"
            f"{'...' if len(wrong) > 2 else ''})"
        )
    raise QuantlabError(
        f"the importance matrix {source} is not this model's: {'; '.join(problems)}; "
        "use one computed on this model (imatrix: true computes it from the calibration "
        "windows, or llama-imatrix -m MODEL.gguf)"
    )


# -------------------------------------------------------------------------- files


def read_imatrix(path: str | Path) -> Imatrix:
    """An imatrix file in either of llama.cpp's formats (GGUF, or legacy .dat)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantlabError(
            f"cannot read the importance matrix '{path}': {e.strerror or e}"
        ) from None
    try:
        return _read_gguf(path) if magic == _GGUF_MAGIC else _read_legacy(path)
    except (ValueError, KeyError, IndexError, struct.error) as e:
        raise QuantlabError(
            f"'{path}' is not a llama.cpp importance matrix ({type(e).__name__}: {str(e)[:120]})"
        ) from None


def write_imatrix(imatrix: Imatrix, path: str | Path, legacy: bool = False) -> Path:
    """Write ``imatrix`` as llama.cpp's GGUF imatrix file (or, ``legacy``, its .dat format),
    whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if legacy:
            tmp.write_bytes(_legacy_bytes(imatrix))
        else:
            _write_gguf(imatrix, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_gguf(imatrix: Imatrix, path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix")
    w.kv_data[0].pop("general.architecture")  # llama-imatrix's files have none
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(imatrix.datasets))
    w.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    w.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):  # llama-imatrix's deterministic order
        w.add_tensor(f"{name}.in_sum2", imatrix.sums[name].astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[imatrix.counts[name]]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    sums, counts = {}, {}
    for tname, data in tensors.items():
        if tname.endswith(".in_sum2"):
            name = tname.removesuffix(".in_sum2")
            if f"{name}.counts" not in tensors:
                raise ValueError(f"{name} has sums and no counts")
            sums[name] = data
            counts[name] = int(np.rint(tensors[f"{name}.counts"][0]))  # llama.cpp: lround
    if not sums:
        raise ValueError("no .in_sum2 tensors")
    f = reader.fields

    def value(key, default):
        return f[key].contents() if key in f else default

    return Imatrix(
        sums,
        counts,
        list(value("imatrix.datasets", [])),
        int(value("imatrix.chunk_count", 0)),
        int(value("imatrix.chunk_size", 0)),
    )


def _legacy_bytes(imatrix: Imatrix) -> bytes:
    """The .dat layout; its values are sum/count * ncall (ncall: chunks, at least 1), which
    llama-quantize divides by ncall again."""
    chunk = max(imatrix.chunk_size, 1)
    out = [struct.pack("<i", len(imatrix.sums))]
    for name in sorted(imatrix.sums):
        count = imatrix.counts[name]
        ncall = max(1, (count + chunk - 1) // chunk)
        sums = imatrix.sums[name].astype(np.float32)
        values = (sums / np.float32(count) if count else np.ones_like(sums)) * np.float32(ncall)
        raw = name.encode()
        out += [
            struct.pack("<i", len(raw)),
            raw,
            struct.pack("<ii", ncall, values.shape[0]),
            values.astype("<f4").tobytes(),
        ]
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    out += [struct.pack("<ii", imatrix.chunk_count, len(dataset)), dataset]
    return b"".join(out)


def _read_legacy(path: Path) -> Imatrix:
    """A .dat file: its values (sum/count * ncall) come back as sums over ncall 'tokens', so
    that :meth:`Imatrix.importance` divides them as llama-quantize does."""
    data = path.read_bytes()
    (n,), pos = struct.unpack_from("<i", data, 0), 4
    if n < 1:
        raise ValueError("no entries")
    sums, counts = {}, {}
    for _ in range(n):
        (size,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4 : pos + 4 + size].decode()
        ncall, nval = struct.unpack_from("<ii", data, pos + 4 + size)
        pos += 12 + size
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"entry {name!r} is cut short")
        sums[name] = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        counts[name] = ncall
        pos += 4 * nval
    chunks, datasets = 0, []
    if pos + 8 <= len(data):
        chunks, size = struct.unpack_from("<ii", data, pos)
        if size > 0:
            datasets = [data[pos + 8 : pos + 8 + size].decode(errors="replace")]
    return Imatrix(sums, counts, datasets, chunks, 0, legacy=True)
