"""What a model directory may hold, checked before anything loads, and the loaded pair.

Shared by :mod:`quantlab.models` (float models) and :mod:`quantlab.checkpoint` (quantlab's
checkpoints), so that neither imports the other's loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: dict = field(default_factory=dict)


def check_no_remote_code(path: Path, source: str, *, trust_remote_code: bool) -> None:
    """Refuse a model directory whose config names code of its own (``auto_map`` in
    config.json or tokenizer_config.json) unless the user allowed remote code: transformers
    would otherwise ask on a terminal (and run it on "y") or fail with a traceback."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            doc = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # ValueError: JSON, UTF-8; deep nesting
            continue
        if isinstance(doc, dict) and doc.get("auto_map"):
            raise QuantlabError(
                f"'{source}' names code of its own ({name}: auto_map), which quantlab does not "
                "run unless told to; set model.trust_remote_code: true (quantlab eval: "
                "--trust-remote-code) only if you trust it. Checkpoints quantlab exported never "
                "run such code"
            )


#: the largest safetensors header quantlab reads (real ones are well under a megabyte)
_MAX_SAFETENSORS_HEADER = 100 << 20


def check_safetensors(path: Path) -> None:
    """Check the header of every ``*.safetensors`` file in ``path``: a plausible size, JSON,
    tensor data inside the file. Random bytes, a truncated file or an absurd header size are
    one clear error here, not a traceback (or a huge allocation) inside the loader."""
    import struct

    for f in sorted(Path(path).glob("*.safetensors")):
        size = f.stat().st_size
        problem = None
        try:
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                if n is None or n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                    problem = "its header size is impossible for the file"
                else:
                    header = json.loads(fh.read(n).decode("utf-8"))
                    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                    if ends and max(ends) > size - 8 - n:
                        problem = "it is shorter than its header says (truncated)"
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            AttributeError,
            RecursionError,
        ) as e:  # ValueError: JSON, UTF-8; RecursionError: deep nesting
            problem = f"its header is not valid ({type(e).__name__})"
        if problem:
            raise QuantlabError(
                f"weights file '{f}' cannot be read: {problem}; it is damaged or not a "
                "safetensors file. Replace it (re-export or re-download the model)"
            )
