"""Exported checkpoints: one directory per method, written atomically.

Layout::

    model.safetensors   weights (quantized tensors in the backend's ecosystem format)
    config.json         the model config, with ``quantization_config`` when quantized
    generation_config.json, tokenizer files
    quantlab.json       sidecar, written last: backend, its config version and options,
                        quantized module names, their layout (quantlab.formats) and its
                        version, quantlab version, source model, and the
                        manifest: sha256 and size of every other file, verified on load
                        (with their modification times, ``mtime_ns``: a reader's shortcut)

The directory is built under a temporary name and renamed into place, so a directory with
``quantlab.json`` is always complete.

Two rules keep a checkpoint what it was when it was scored:

- it shares no storage that a write elsewhere can change (:func:`share_source_files`: a
  copy-on-write clone or a copy of the source's files, never a hard link);
- whoever reads it notices a change: :func:`verify_checkpoint` (every sha256, on load) or
  :func:`changes_since_export` (size and modification time first, the sha256 where they
  differ: for the report, compare and resume).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from quantlab import __version__
from quantlab.atomicdir import TMP_MARKER, atomic_directory
from quantlab.cache import sha256_file as _sha256
from quantlab.errors import QuantlabError
from quantlab.layout import SIDECAR
from quantlab.modelfiles import LoadedModel, check_no_remote_code, check_safetensors


def export_checkpoint(
    quantized, tokenizer, backend, out_dir: Path, *, source: dict[str, Any], label: str
) -> Path:
    """Write ``quantized`` (the :class:`~quantlab.quantizers.base.Quantized` that
    ``backend.quantize`` returned, or a model that needs nothing beyond its modules to be
    saved: a float model, or one whose backend keeps no artifacts) into ``out_dir``,
    atomically (:func:`quantlab.atomicdir.atomic_directory`). An existing ``out_dir`` is
    replaced only when it is a checkpoint quantlab wrote (it has a sidecar).

    Where ``out_dir`` may be is the caller's rule (a run's method directory under its lock,
    :func:`quantlab.direct.save` outside every quantlab output). The temporary directory is
    removed on any failure; leftovers of killed exports are removed only when provably
    quantlab's (:func:`quantlab.atomicdir.remove_stale`)."""
    from quantlab.quantizers.base import Quantized

    if not isinstance(quantized, Quantized):
        quantized = Quantized(quantized)
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    with atomic_directory(out_dir, replace=True) as tmp:
        _write(quantized, tokenizer, backend, tmp, source, label)
    return out_dir


def check_replaceable(out_dir: Path) -> None:
    """An export may write ``out_dir`` when it is absent or a checkpoint quantlab wrote (it has
    a sidecar): a user's file, link or other directory is never replaced."""
    if out_dir.is_symlink() or (out_dir.exists() and not (out_dir / SIDECAR).is_file()):
        raise QuantlabError(
            f"'{out_dir}' exists but is not a checkpoint quantlab wrote (a file, a link, or a "
            "directory without quantlab.json); move it away and run again"
        )


def _write(quantized, tokenizer, backend, tmp: Path, source: dict[str, Any], label: str) -> None:
    model = quantized.model
    qconfig = backend.save(quantized, tmp)
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
    share_source_files(tmp, source.get("path"))
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
        "mtime_ns": file_times(tmp),
    }
    meta["sidecar_sha256"] = sidecar_digest(meta)
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))


#: files smaller than this are never cloned (not worth the hashing)
CLONE_MIN_BYTES = 1 << 20
#: ``FICLONE`` of linux/fs.h (``_IOW(0x94, 9, int)``): make a file share another's blocks,
#: copy-on-write
FICLONE = 0x40049409


def share_source_files(ckpt_dir: Path, source_dir: str | Path | None) -> list[str]:
    """Store the files of ``ckpt_dir`` that are byte-identical to the (local) source model's
    as copy-on-write clones of them, where the file system makes clones; returns the names
    cloned.

    The rule: a checkpoint never shares storage that a write elsewhere can change. A clone
    (``FICLONE``: btrfs, XFS with reflink, bcachefs, ZFS 2.2+ block cloning) shares the
    source's blocks only until either side writes; a write, even in place, goes to new
    blocks, so the checkpoint keeps its bytes and the float baseline costs no disk until then.
    Elsewhere (ext4, tmpfs, across file systems) the plain copy the export wrote stays: one
    copy of the float weights per run. Never a hard link: one inode, so the source edited in
    place would change the run's checkpoint behind its back."""
    if not source_dir or not Path(source_dir).is_dir():
        return []
    cloned = []
    for f in sorted(ckpt_dir.iterdir()):
        src = Path(source_dir) / f.name
        if not (_plain_file(f) and _plain_file(src)) or f.stat().st_size < CLONE_MIN_BYTES:
            continue
        if src.stat().st_size != f.stat().st_size:
            continue
        digest = _sha256(f)
        if _sha256(src) == digest and _clone_into(src, f, digest):
            cloned.append(f.name)
    return cloned


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _clone_into(src: Path, dest: Path, digest: str) -> bool:
    """Replace ``dest`` by a copy-on-write clone of ``src`` when the file system makes one
    and the clone has ``digest`` (the source may change between the check and the clone);
    False (``dest`` untouched) otherwise."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: keep the copy
        return False
    tmp = dest.with_name(dest.name + ".clone")
    try:
        with open(src, "rb") as s, open(tmp, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        if _sha256(tmp) != digest:
            raise OSError("the source changed while it was cloned")
        os.replace(tmp, dest)
    except OSError:  # no clones on this file system (or another one): the copy stays
        tmp.unlink(missing_ok=True)
        return False
    return True


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
        raise QuantlabError(
            f"'{ckpt_dir}' is not a quantlab checkpoint (no {SIDECAR}); "
            "an incomplete export leaves none"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise QuantlabError(f"'{path}' is corrupt: {str(e)[:200] or type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise QuantlabError(f"'{path}' is corrupt: expected a JSON object")
    return meta


def manifest(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of a checkpoint directory but the sidecar (and a
    temporary export's marker): the proof of its content (:func:`verify_checkpoint`)."""
    ckpt_dir = Path(ckpt_dir)
    return {
        p.relative_to(ckpt_dir).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in _files(ckpt_dir)
    }


def file_times(ckpt_dir: Path) -> dict[str, int]:
    """The modification time (ns) of every file :func:`manifest` lists: the sidecar's
    ``mtime_ns``. Only a shortcut: a reader may skip hashing a file whose size and time are
    as recorded (:func:`changes_since_export`); the sha256 stays the proof."""
    ckpt_dir = Path(ckpt_dir)
    return {p.relative_to(ckpt_dir).as_posix(): p.stat().st_mtime_ns for p in _files(ckpt_dir)}


def _files(ckpt_dir: Path) -> list[Path]:
    return [
        p
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name not in (SIDECAR, TMP_MARKER)
    ]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")


def _manifest_entries(ckpt_dir: Path, meta: dict[str, Any], hint: str) -> dict[str, dict[str, Any]]:
    """The sidecar's manifest, checked for shape: a mapping of relative paths inside the
    checkpoint to {sha256, bytes}. Anything else is an error, never a reason to skip."""
    files = meta.get("files")
    where = f"'{Path(ckpt_dir) / SIDECAR}'"
    if not isinstance(files, dict) or not files:
        raise QuantlabError(
            f"{where} has no manifest of its files ('files' is missing or not a mapping), so "
            f"the checkpoint cannot be verified; {hint}"
        )
    for name, want in files.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise QuantlabError(f"{where} lists '{name}', which is outside the checkpoint; {hint}")
        if (
            not isinstance(want, dict)
            or not isinstance(want.get("sha256"), str)
            or not isinstance(want.get("bytes"), int)
        ):
            raise QuantlabError(
                f"{where}: the manifest entry of '{name}' is not {{sha256, bytes}}; {hint}"
            )
    return files


def _problems(
    ckpt_dir: Path, meta: dict[str, Any], files: dict[str, dict[str, Any]], *, quick: bool
) -> Iterator[str]:
    """Each difference between a checkpoint and its sidecar, as a sentence: the sidecar
    against its own digest, every listed file (missing, size, sha256), weight files the
    manifest does not list. ``quick``: a file whose size and time are as the sidecar's
    ``mtime_ns`` records them is taken as unchanged (an edit in place changes the time);
    any other is hashed, so a copied checkpoint (new times, same bytes) is not reported."""
    sidecar = ckpt_dir / SIDECAR
    if "sidecar_sha256" not in meta:
        yield (
            f"'{sidecar}' has no digest of its own (written by an earlier quantlab, or edited), "
            "so it cannot be verified"
        )
    elif meta["sidecar_sha256"] != sidecar_digest(meta):
        yield f"'{sidecar}' was changed since export (its digest does not match its content)"
    times = meta.get("mtime_ns") if quick and isinstance(meta.get("mtime_ns"), dict) else {}
    for name, want in files.items():
        path = ckpt_dir / name
        if path.is_symlink() or not path.is_file():
            yield f"checkpoint '{ckpt_dir}' is missing '{name}', which its manifest lists"
            continue
        st = path.stat()
        if st.st_size == want["bytes"] and st.st_mtime_ns == times.get(name):
            continue
        if st.st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            yield (
                f"checkpoint file '{path}' does not match its manifest (sha256 or size differs: "
                "damaged or changed since export)"
            )
    weights = [
        p.relative_to(ckpt_dir).as_posix()
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    ]
    extra = sorted(name for name in weights if name not in files)
    if extra:
        yield (
            f"checkpoint '{ckpt_dir}' holds weight files its manifest does not list: "
            f"{', '.join(extra)}"
        )


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Check the sidecar against its own digest and every file against the manifest in it:
    present, same size, same sha256; no weight file the manifest does not list. A sidecar
    without a manifest (or with a malformed one) fails: verification is never skipped
    silently (``--no-verify`` is the explicit way)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_sidecar(ckpt_dir)
    hint = "re-export it (run the recipe again with --force), or pass --no-verify to load it anyway"
    files = _manifest_entries(ckpt_dir, meta, hint)
    for problem in _problems(ckpt_dir, meta, files, quick=False):
        raise QuantlabError(f"{problem}; {hint}")


def changes_since_export(ckpt_dir: Path) -> list[str]:
    """What changed in a checkpoint since it was exported (and so since it was scored), one
    sentence each; empty when nothing did. Cheap where it can be: size and modification
    time first, the sha256 only of files where they differ (and of every file of a
    checkpoint whose manifest records no times, an earlier quantlab's). What reads a run's
    results without loading its checkpoints (report, compare, resume) asks this; loading
    verifies every sha256 (:func:`verify_checkpoint`)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = read_sidecar(ckpt_dir)
        files = _manifest_entries(ckpt_dir, meta, "run its recipe again to export it anew")
    except QuantlabError as e:
        return [str(e)]
    return list(_problems(ckpt_dir, meta, files, quick=True))


def load_checkpoint(
    ckpt_dir: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    verify: bool = True,
    kernel: str = "dense",
    kernel_choices: dict | None = None,
    log=None,
) -> LoadedModel:
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
    _check_options(ckpt_dir, meta, backend)
    try:
        model = backend.load(ckpt_dir, meta, dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir, trust_remote_code=False)
    except QuantlabError:
        raise
    except (
        Exception
    ) as e:  # a sidecar that contradicts its tensors, a config transformers rejects...
        detail = (str(e).splitlines() or [""])[0][:200]
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}' cannot be loaded by backend '{meta.get('backend')}' "
            f"({type(e).__name__}: {detail}); re-export it (run its recipe again with --force)"
        ) from None
    from quantlab.formats.kernels import apply_kernels

    kernels = apply_kernels(model, kernel, device, choices=kernel_choices, log=log)
    info = {
        "source": str(ckpt_dir),
        "kind": "checkpoint",
        "backend": meta["backend"],
        "options": meta.get("options", {}),
        "kernels": kernels,
    }
    return LoadedModel(model, tokenizer, info)


#: the sidecar's own format (``"format"`` in quantlab.json)
SIDECAR_FORMAT = 1


def _check_versions(ckpt_dir: Path, meta: dict[str, Any], backend) -> None:
    """A checkpoint written under another sidecar format, another version of its backend's
    config or of its layout (the same options or tensors meaning something else) is not read
    as if it were this one."""
    hint = "re-export it (run its recipe again with --force)"
    if meta.get("format") != SIDECAR_FORMAT:
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}' has sidecar format {meta.get('format')!r}; this quantlab "
            f"reads format {SIDECAR_FORMAT}: {hint}"
        )
    if meta.get("backend_config_version") != backend.Config.version:
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}' was written by {meta.get('backend')} config version "
            f"{meta.get('backend_config_version')!r}; this quantlab's is {backend.Config.version}: "
            f"{hint}"
        )
    rec = meta.get("layout")
    if rec is None:  # a library's own format (torchao, bitsandbytes...), or an older sidecar
        return
    from quantlab.formats import get_layout

    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}': the sidecar's 'layout' is not {{name, version}}; {hint}"
        )
    layout = get_layout(rec["name"])
    if rec.get("version") != layout.version:
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}' was written in layout {layout.name} version "
            f"{rec.get('version')}; this quantlab reads version {layout.version}: {hint}"
        )


def _check_options(ckpt_dir: Path, meta: dict[str, Any], backend) -> None:
    """The sidecar's options are valid options of its backend, checked by the backend's own
    Config (as a recipe's are): a sidecar that passes its digest but was written (or re-signed)
    with options its backend rejects is an error naming them, never loaded as if valid."""
    from pydantic import ValidationError

    options = meta.get("options")
    hint = "re-export it (run its recipe again with --force)"
    if not isinstance(options, dict):
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}': the sidecar's 'options' is not a mapping; {hint}"
        )
    try:
        backend.Config(**options)
    except ValidationError as e:
        from quantlab.recipe import _format_errors

        bad = "; ".join(_format_errors(e, backend.Config, "options").splitlines()[:3])
        raise QuantlabError(
            f"checkpoint '{ckpt_dir}' cannot be loaded by backend '{meta.get('backend')}': the "
            f"sidecar's options are not valid {meta.get('backend')} options ({bad}); {hint}"
        ) from None


def weight_bytes(ckpt_dir: Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.gguf``) of a checkpoint directory."""
    return sum(
        p.stat().st_size
        for pattern in ("*.safetensors", "*.gguf")
        for p in Path(ckpt_dir).glob(pattern)
    )
