"""Exported checkpoints: one directory per method, written atomically.

Layout::

    model.safetensors   weights (quantized tensors in the backend's ecosystem format)
    config.json         the model config, with ``quantization_config`` when quantized
    generation_config.json, tokenizer files
    quantlab.json       sidecar, written last: backend, its config version and options,
                        quantized module names, quantlab version, source model

The directory is built under a temporary name and renamed into place, so a directory with
``quantlab.json`` is always complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab import __version__
from quantlab.errors import QuantlabError
from quantlab.models import LoadedModel

SIDECAR = "quantlab.json"


def export_checkpoint(model: nn.Module, tokenizer, backend, out_dir: Path, *,
                      source: dict[str, Any], label: str) -> Path:
    """Write ``model`` (quantized by ``backend``) into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    qconfig = backend.save(model, tmp)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if qconfig is not None:
        config.quantization_config = qconfig
    config.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {
        "format": 1,
        "label": label,
        "backend": backend.name,
        "backend_config_version": backend.Config.version,
        "options": backend.config.model_dump(mode="json"),
        "modules": backend.quantized_modules(model),
        "quantlab_version": __version__,
        "source": source,
    }
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_sidecar(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / SIDECAR
    if not path.is_file():
        raise QuantlabError(f"'{ckpt_dir}' is not a quantlab checkpoint (no {SIDECAR}); "
                            "an incomplete export leaves none")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuantlabError(f"'{path}' is corrupt: {e}") from None


def load_checkpoint(ckpt_dir: Path, *, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Reload an exported checkpoint from disk with the backend that wrote it."""
    from transformers import AutoTokenizer

    from quantlab.registry import get_backend

    ckpt_dir = Path(ckpt_dir)
    meta = read_sidecar(ckpt_dir)
    backend = get_backend(meta.get("backend", "?"), where=f"{ckpt_dir}/{SIDECAR}")
    model = backend.load(ckpt_dir, meta, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    info = {"source": str(ckpt_dir), "kind": "checkpoint", "backend": meta["backend"],
            "options": meta.get("options", {})}
    return LoadedModel(model, tokenizer, info)


def weight_bytes(ckpt_dir: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(ckpt_dir).glob("*.safetensors"))
