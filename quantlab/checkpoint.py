"""Exported checkpoints: one directory per method, written atomically.

Layout::

    model.safetensors   weights (quantized tensors in the backend's ecosystem format)
    config.json         the model config, with ``quantization_config`` when quantized
    generation_config.json, tokenizer files
    quantlab.json       sidecar, written last: backend, its config version and options,
                        quantized module names, their layout (quantlab.formats) and its
                        version, quantlab version, source model, and the
                        manifest: sha256 and size of every other file, verified on load

The directory is built under a temporary name and renamed into place, so a directory with
``quantlab.json`` is always complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab import __version__
from quantlab.errors import QuantlabError
from quantlab.modelfiles import LoadedModel, check_no_remote_code, check_safetensors

SIDECAR = "quantlab.json"


def export_checkpoint(model: nn.Module, tokenizer, backend, out_dir: Path, *,
                      source: dict[str, Any], label: str) -> Path:
    """Write ``model`` (quantized by ``backend``) into ``out_dir``, atomically. An existing
    ``out_dir`` is replaced only when it is a checkpoint quantlab wrote (it has a sidecar)."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not (out_dir / SIDECAR).is_file()):
        raise QuantlabError(f"'{out_dir}' exists but is not a checkpoint quantlab wrote (a file, a link, or a "
                            "directory without quantlab.json); move it away and run again")
    # half-written exports of killed runs (the run directory's lock makes this run the only writer)
    for stale in out_dir.parent.glob(f"{out_dir.name}.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        _write(model, tokenizer, backend, tmp, source, label)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or Ctrl-C leaves no half checkpoint behind
        raise
    return out_dir


def _write(model: nn.Module, tokenizer, backend, tmp: Path, source: dict[str, Any], label: str) -> None:
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
    link_source_files(tmp, source.get("path"))
    meta = {
        "format": SIDECAR_FORMAT,
        "label": label,
        "backend": backend.name,
        "backend_config_version": backend.Config.version,
        "options": backend.config.model_dump(mode="json"),
        "modules": backend.quantized_modules(model),
        **_layout_record(backend),
        "quantlab_version": __version__,
        "source": source,
        "files": manifest(tmp),
    }
    meta["sidecar_sha256"] = sidecar_digest(meta)
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))


#: files smaller than this are copied even when identical to the source's (not worth a link)
LINK_MIN_BYTES = 1 << 20


def link_source_files(ckpt_dir: Path, source_dir: str | Path | None) -> list[str]:
    """Replace each file of ``ckpt_dir`` that is byte-identical to the file of the same name in
    the (local) source model directory by a hard link to it: the float baseline's weights are
    then stored once, not once per run (a 135M model: 517 MB per run). A hard link is a file,
    not a reference: the checkpoint stays complete if the source is deleted, its manifest
    covers the same bytes, and a source rewritten by replacement leaves it unchanged. Across
    file systems (no hard links) the copy stays. Returns the names linked."""
    if not source_dir or not Path(source_dir).is_dir():
        return []
    linked = []
    for f in sorted(ckpt_dir.iterdir()):
        src = Path(source_dir) / f.name
        if (not f.is_file() or f.stat().st_size < LINK_MIN_BYTES or not src.is_file() or src.is_symlink()
                or src.stat().st_size != f.stat().st_size or _sha256(src) != _sha256(f)):
            continue
        tmp_link = f.with_name(f.name + ".link")
        try:
            os.link(src, tmp_link)
        except OSError:  # another file system, or links not allowed: keep the copy
            continue
        os.replace(tmp_link, f)
        linked.append(f.name)
    return linked


def _layout_record(backend) -> dict[str, Any]:
    """The sidecar's record of the layout the layers are stored in (checked on load)."""
    layout = backend.layout()
    return {} if layout is None else {"layout": {"name": layout.name, "version": layout.version}}


def sidecar_digest(meta: dict[str, Any]) -> str:
    """sha256 of the sidecar's content (its own digest left out): the manifest covers every
    other file, this covers the sidecar, so no part of a checkpoint can be edited unnoticed."""
    body = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_sidecar(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / SIDECAR
    if not path.is_file():
        raise QuantlabError(f"'{ckpt_dir}' is not a quantlab checkpoint (no {SIDECAR}); "
                            "an incomplete export leaves none")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise QuantlabError(f"'{path}' is corrupt: {str(e)[:200] or type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise QuantlabError(f"'{path}' is corrupt: expected a JSON object")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def manifest(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of a checkpoint directory but the sidecar."""
    ckpt_dir = Path(ckpt_dir)
    return {p.relative_to(ckpt_dir).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != SIDECAR}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")


def _manifest_entries(ckpt_dir: Path, meta: dict[str, Any], hint: str) -> dict[str, dict[str, Any]]:
    """The sidecar's manifest, checked for shape: a mapping of relative paths inside the
    checkpoint to {sha256, bytes}. Anything else is an error, never a reason to skip."""
    files = meta.get("files")
    where = f"'{Path(ckpt_dir) / SIDECAR}'"
    if not isinstance(files, dict) or not files:
        raise QuantlabError(f"{where} has no manifest of its files ('files' is missing or not a mapping), so "
                            f"the checkpoint cannot be verified; {hint}")
    for name, want in files.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise QuantlabError(f"{where} lists '{name}', which is outside the checkpoint; {hint}")
        if not isinstance(want, dict) or not isinstance(want.get("sha256"), str) or not isinstance(want.get("bytes"), int):
            raise QuantlabError(f"{where}: the manifest entry of '{name}' is not {{sha256, bytes}}; {hint}")
    return files


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Check the sidecar against its own digest and every file against the manifest in it:
    present, same size, same sha256; no weight file the manifest does not list. A sidecar
    without a manifest (or with a malformed one) fails: verification is never skipped
    silently (``--no-verify`` is the explicit way)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_sidecar(ckpt_dir)
    hint = "re-export it (run the recipe again with --force), or pass --no-verify to load it anyway"
    files = _manifest_entries(ckpt_dir, meta, hint)
    if "sidecar_sha256" not in meta:
        raise QuantlabError(f"'{ckpt_dir / SIDECAR}' has no digest of its own (written by an earlier quantlab, "
                            f"or edited), so it cannot be verified; {hint}")
    if meta["sidecar_sha256"] != sidecar_digest(meta):
        raise QuantlabError(f"'{ckpt_dir / SIDECAR}' was changed since export (its digest does not match "
                            f"its content); {hint}")
    for name, want in files.items():
        path = ckpt_dir / name
        if path.is_symlink() or not path.is_file():
            raise QuantlabError(f"checkpoint '{ckpt_dir}' is missing '{name}', which its manifest lists; {hint}")
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            raise QuantlabError(f"checkpoint file '{path}' does not match its manifest (sha256 or size "
                                f"differs: damaged or changed since export); {hint}")
    extra = [p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob("*")
             if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.relative_to(ckpt_dir).as_posix() not in files]
    if extra:
        raise QuantlabError(f"checkpoint '{ckpt_dir}' holds weight files its manifest does not list: "
                            f"{', '.join(sorted(extra))}; {hint}")


def load_checkpoint(ckpt_dir: Path, *, dtype: torch.dtype, device: torch.device, verify: bool = True,
                    kernel: str = "dense", kernel_choices: dict | None = None, log=None) -> LoadedModel:
    """Reload an exported checkpoint from disk with the backend that wrote it; ``verify``
    checks every file against the manifest first. ``kernel`` chooses what executes its packed
    layers (quantlab.formats.kernels; ``kernel_choices`` replays a recorded ``auto`` choice);
    the choice is ``info["kernels"]``."""
    from transformers import AutoTokenizer

    from quantlab.formats.kernels import check_kernel_name
    from quantlab.registry import get_backend

    check_kernel_name(kernel)
    ckpt_dir = Path(ckpt_dir)
    meta = read_sidecar(ckpt_dir)
    if verify:
        verify_checkpoint(ckpt_dir)
    # a checkpoint is data: code it names (auto_map) never runs, whatever it says
    check_no_remote_code(ckpt_dir, str(ckpt_dir), trust_remote_code=False)
    check_safetensors(ckpt_dir)
    backend = get_backend(str(meta.get("backend", "?")), where=f"{ckpt_dir}/{SIDECAR}")
    _check_versions(ckpt_dir, meta, backend)
    try:
        model = backend.load(ckpt_dir, meta, dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir, trust_remote_code=False)
    except QuantlabError:
        raise
    except Exception as e:  # a sidecar that contradicts its tensors, a config transformers rejects...
        detail = (str(e).splitlines() or [""])[0][:200]
        raise QuantlabError(f"checkpoint '{ckpt_dir}' cannot be loaded by backend '{meta.get('backend')}' "
                            f"({type(e).__name__}: {detail}); re-export it (run its recipe again with "
                            "--force)") from None
    from quantlab.formats.kernels import apply_kernels

    kernels = apply_kernels(model, kernel, device, choices=kernel_choices, log=log)
    info = {"source": str(ckpt_dir), "kind": "checkpoint", "backend": meta["backend"],
            "options": meta.get("options", {}), "kernels": kernels}
    return LoadedModel(model, tokenizer, info)


#: the sidecar's own format (``"format"`` in quantlab.json)
SIDECAR_FORMAT = 1


def _check_versions(ckpt_dir: Path, meta: dict[str, Any], backend) -> None:
    """A checkpoint written under another sidecar format, another version of its backend's
    config or of its layout (the same options or tensors meaning something else) is not read
    as if it were this one."""
    hint = "re-export it (run its recipe again with --force)"
    if meta.get("format") != SIDECAR_FORMAT:
        raise QuantlabError(f"checkpoint '{ckpt_dir}' has sidecar format {meta.get('format')!r}; this quantlab "
                            f"reads format {SIDECAR_FORMAT}: {hint}")
    if meta.get("backend_config_version") != backend.Config.version:
        raise QuantlabError(f"checkpoint '{ckpt_dir}' was written by {meta.get('backend')} config version "
                            f"{meta.get('backend_config_version')!r}; this quantlab's is {backend.Config.version}: "
                            f"{hint}")
    rec = meta.get("layout")
    if rec is None:  # a library's own format (torchao, bitsandbytes...), or an older sidecar
        return
    from quantlab.formats import get_layout

    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        raise QuantlabError(f"checkpoint '{ckpt_dir}': the sidecar's 'layout' is not {{name, version}}; {hint}")
    layout = get_layout(rec["name"])
    if rec.get("version") != layout.version:
        raise QuantlabError(f"checkpoint '{ckpt_dir}' was written in layout {layout.name} version "
                            f"{rec.get('version')}; this quantlab reads version {layout.version}: {hint}")


def weight_bytes(ckpt_dir: Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.gguf``) of a checkpoint directory."""
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.gguf") for p in Path(ckpt_dir).glob(pattern))
