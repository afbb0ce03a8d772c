"""The environment a run executed in: versions, hardware, threads."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

#: versions recorded in environment.json: the core stack and the backends' libraries (their
#: kernels and defaults change what a method computes; compare warns when runs differ)
PACKAGES = (
    "quantlab",
    "torch",
    "transformers",
    "safetensors",
    "gguf",
    "accelerate",
    "numpy",
    "pandas",
    "pydantic",
    "tokenizers",
    "torchao",
    "bitsandbytes",
    "optimum-quanto",
    "gptqmodel",
    "hqq",
    "lm-eval",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "cuda_available": torch.cuda.is_available(),
    }
    if device is not None:
        env["device"] = str(device)
        if device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(device)
    if dtype is not None:
        env["dtype"] = str(dtype).removeprefix("torch.")
    return env


def extra_packages(extra: str) -> list[str]:
    """The distribution names a pip extra of quantlab installs (from the installed metadata)."""
    import re

    try:
        requires = importlib.metadata.requires("quantlab") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    out = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", marker):
            out.append(re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0))
    return out
