"""A quantlab checkpoint assembled without the model in memory: the same directory
:func:`quantlab.checkpoint.export_checkpoint` writes (weights, ``config.json`` with the
``quantization_config``, generation config, tokenizer, the ``quantlab.json`` sidecar with its
manifest, written last), built under a temporary name beside the target and renamed into place
only when complete, so a partial export is never reloaded as a checkpoint. The weights come
from a :class:`~quantlab.streaming.writer.ShardWriter` fed layer by layer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from quantlab import __version__
from quantlab.atomicdir import atomic_directory
from quantlab.checkpoint import (
    SIDECAR,
    SIDECAR_FORMAT,
    check_replaceable,
    file_times,
    manifest,
    sidecar_digest,
)
from quantlab.errors import QuantlabError


@contextlib.contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``out_dir`` that becomes ``out_dir`` when the block
    ends without error, and is removed otherwise (a full disk, Ctrl-C). An existing
    ``out_dir`` is replaced only when it is a checkpoint quantlab wrote; leftovers of killed
    exports beside it are removed by quantlab.atomicdir's rule (provably quantlab's, writer
    gone)."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    with atomic_directory(out_dir, replace=True) as tmp:
        yield tmp
        if not (tmp / SIDECAR).is_file():
            raise QuantlabError(f"the export into '{tmp}' ended without its sidecar")


def write_model_files(
    tmp: Path, source_dir: Path, qconfig: dict | None, dtype: torch.dtype, tokenizer=None
) -> None:
    """``config.json`` (the source's, with ``qconfig`` as its quantization_config and
    ``dtype``), the generation config and the tokenizer, as export_checkpoint writes them.
    ``tokenizer`` None: the source's, when it has one (a model of random weights may not)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source_dir, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if qconfig is not None:
        config.quantization_config = qconfig
    config.dtype = dtype
    config.save_pretrained(tmp)
    try:
        gen = GenerationConfig.from_pretrained(source_dir, trust_remote_code=False)
    except OSError:  # none stored: the one transformers derives from the model's config
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(tmp)
    if tokenizer is None and any((source_dir / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def write_sidecar(
    tmp: Path,
    *,
    backend: str,
    config_version: int,
    options: dict[str, Any],
    modules: list[str],
    layout: dict | None,
    source: dict[str, Any],
    label: str,
) -> None:
    """``quantlab.json``, last: what export_checkpoint records, the manifest of every file."""
    meta = {
        "format": SIDECAR_FORMAT,
        "label": label,
        "backend": backend,
        "backend_config_version": config_version,
        "options": options,
        "modules": modules,
        **({"layout": layout} if layout is not None else {}),
        "quantlab_version": __version__,
        "source": source,
        "files": manifest(tmp),
        "mtime_ns": file_times(tmp),
    }
    meta["sidecar_sha256"] = sidecar_digest(meta)
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))
