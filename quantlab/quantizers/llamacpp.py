"""``llamacpp``: llama.cpp's own quantizations as reference rows.

The float model is written as an F32 GGUF (metadata from the source's GGUF, see
:mod:`quantlab.formats.gguf`), ``llama-quantize`` turns it into ``type`` (any type the tool
knows: Q4_0, Q4_K_M, Q8_0...), optionally with an importance matrix that ``llama-imatrix``
computes on the recipe's calibration windows (the same windows GPTQ and AWQ see, as text:
llama.cpp tokenizes them again). The GGUF file is the checkpoint (``model.gguf``); quantlab
reloads it through transformers' GGUF reader (which dequantizes it) for the same harness as
every row, and the llama.cpp engine measures the file itself. The tensor types the preset
really used are recorded: a "K" type needs rows that are multiples of 256, so on a model
576 wide llama-quantize falls back to other types for most tensors.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.quantizers.base import Backend, BackendConfig

CHECKPOINT_GGUF = "model.gguf"


class LlamaCppConfig(BackendConfig):
    type: str = Field("Q4_K_M", description="A llama-quantize type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_M, "
                      "Q4_K_S, Q4_K_M, Q5_K_M, Q6_K... (`llama-quantize --help` lists them).")
    imatrix: bool = Field(False, description="Compute an importance matrix with llama-imatrix on the recipe's "
                          "calibration windows and quantize with it.")

    def table_fields(self) -> dict[str, Any]:
        digits = "".join(ch for ch in self.type.split("_")[0] if ch.isdigit())
        return {"bits": int(digits) if digits else None, "group_size": None}


class LlamaCpp(Backend):
    name = "llamacpp"
    description = "llama.cpp's own quantization (llama-quantize, optional imatrix): a GGUF reference row."
    Config = LlamaCppConfig
    replaces_only = False

    def __init__(self, config: LlamaCppConfig | None = None):
        super().__init__(config)
        #: set by the pipeline before quantize(): the source model's info (for the GGUF
        #: metadata template) and the tokenizer (to write calibration windows as text)
        self.context: dict[str, Any] = {}

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.imatrix

    def check_dependencies(self) -> None:
        from quantlab.engines.llamacpp import find_llamacpp

        tools = find_llamacpp()
        types = _known_types(tools)
        if types and self.config.type not in types:
            from quantlab.errors import did_you_mean

            raise QuantlabError(f"llama-quantize has no type '{self.config.type}'{did_you_mean(self.config.type, types)};"
                                f" types: {', '.join(sorted(types))}")

    def quantized_modules(self, model: nn.Module) -> list[str]:
        return []  # the weights live in the GGUF file, not in replaced modules

    @torch.no_grad()
    def quantize(self, model: nn.Module, calibration: torch.Tensor | None) -> nn.Module:
        from quantlab.engines.llamacpp import find_llamacpp
        from quantlab.formats.gguf import export_gguf, gguf_type_counts, template_for

        tools = find_llamacpp()
        info = self.context.get("source_info", {})
        template = template_for(info, Path(info["path"]) if info.get("path") else None, tools)
        work = Path(tempfile.mkdtemp(prefix="quantlab-llamacpp-"))
        self._work = work
        f32 = work / "f32.gguf"
        with self.stage("write F32 GGUF"):
            export_gguf(model, f32, template, float_type="F32")
        cmd = [str(tools.tool("llama-quantize"))]
        if self.config.imatrix:
            with self.stage("llama-imatrix"):
                cmd += ["--imatrix", str(self._imatrix(tools, f32, calibration, work))]
        out = work / CHECKPOINT_GGUF
        with self.stage("llama-quantize"):
            _run(cmd + [str(f32), str(out), self.config.type], "llama-quantize")
        f32.unlink()
        self.layer_stats = {"gguf_tensor_types": gguf_type_counts(out)}
        return _load_gguf(out, next(model.parameters()).dtype)

    def _imatrix(self, tools, f32: Path, calibration: torch.Tensor | None, work: Path) -> Path:
        if calibration is None:
            raise QuantlabError("llamacpp with imatrix: true needs calibration windows")
        tok = self.context["tokenizer"]
        text = work / "calibration.txt"
        text.write_text("\n\n".join(tok.decode(w, skip_special_tokens=True) for w in calibration), encoding="utf-8")
        out = work / "imatrix.gguf"
        n, seq = calibration.shape
        _run([str(tools.tool("llama-imatrix")), "-m", str(f32), "-f", str(text), "-o", str(out), "-c", str(seq),
              "--chunks", str(n), "--no-ppl"], "llama-imatrix")
        return out

    def save(self, model: nn.Module, out_dir: Path) -> dict | None:
        shutil.copyfile(self._work / CHECKPOINT_GGUF, out_dir / CHECKPOINT_GGUF)
        shutil.rmtree(self._work, ignore_errors=True)
        return None  # config.json describes the float architecture; the GGUF holds the quantization

    @classmethod
    def load(cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return _load_gguf(Path(ckpt_dir) / CHECKPOINT_GGUF, dtype).to(device)


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise QuantlabError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout + proc.stderr


def _known_types(tools) -> set[str]:
    """The type names ``llama-quantize --help`` lists."""
    import re

    proc = subprocess.run([str(tools.tool("llama-quantize")), "--help"], capture_output=True, text=True)
    return set(re.findall(r"^\s+\d+\s+or\s+([A-Z0-9_]+)\s*:", proc.stdout + proc.stderr, re.M))


def _load_gguf(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False)
    except Exception as e:  # transformers cannot dequantize every GGUF type
        raise QuantlabError(f"transformers cannot read '{path}' back ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()
