"""Size figures: bytes on disk and effective bits per weight of the linear layers."""

from __future__ import annotations

import fnmatch

from torch import nn


def checkpoint_tensor_bytes(ckpt_dir, model: nn.Module | None = None) -> dict[str, int]:
    """Bytes of every tensor in a checkpoint's ``*.safetensors`` files, read from their
    headers (nothing is loaded); a GGUF checkpoint's tensors under the model's own names
    (``model`` gives them)."""
    import json
    import struct
    from pathlib import Path

    if model is not None and not any(Path(ckpt_dir).glob("*.safetensors")):
        from quantlab.formats.gguf import gguf_tensor_bytes

        return {
            k: v
            for f in sorted(Path(ckpt_dir).glob("*.gguf"))
            for k, v in gguf_tensor_bytes(f, model).items()
        }
    sizes: dict[str, int] = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                sizes[key] = end - start
    return sizes


def _linear_like(model: nn.Module):
    """(name, in_features, out_features) of every linear layer, float or quantized by any
    backend (they all keep in_features/out_features)."""
    for name, m in model.named_modules():
        fin, fout = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if isinstance(fin, int) and isinstance(fout, int):
            yield name, fin, fout


def _owned(sizes: dict[str, int], name: str, with_bias: bool = False) -> int:
    prefix = f"{name}."
    return sum(
        v for k, v in sizes.items() if k.startswith(prefix) and (with_bias or k != f"{name}.bias")
    )


def checkpoint_bits_per_weight(
    model: nn.Module, sizes: dict[str, int], exclude: tuple[str, ...] = ("lm_head",)
) -> float:
    """Stored bits per weight of the linear layers (except ``exclude``) as written in the
    checkpoint: every tensor a layer stores except its bias (codes, scales, zeros, maps,
    outlier statistics, whatever the format holds), over its in x out weights."""
    bits = weights = 0
    for name, fin, fout in _linear_like(model):
        if any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in exclude
        ):
            continue
        stored = _owned(sizes, name)
        if stored:
            bits += 8 * stored
            weights += fin * fout
    return bits / weights if weights else float("nan")


def checkpoint_quantized_bytes(sizes: dict[str, int], modules: list[str]) -> int:
    """Bytes the checkpoint stores for the quantized modules (bias excluded)."""
    return sum(_owned(sizes, n) for n in modules)


def directory_bytes(path) -> int:
    """Bytes of every file under ``path`` (the checkpoint as it sits on disk)."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
