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
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.procs import run_tool, scratch_dir
from quantlab.quantizers.base import Backend, BackendConfig, QuantizeContext, Quantized

CHECKPOINT_GGUF = "model.gguf"
#: the working directory of one quantization (an F32 copy of the model, the imatrix)
SCRATCH_PREFIX = "quantlab-llamacpp-"


class LlamaCppConfig(BackendConfig):
    type: str = Field(
        "Q4_K_M",
        description="A llama-quantize type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_M, "
        "Q4_K_S, Q4_K_M, Q5_K_M, Q6_K... (`llama-quantize --help` lists them).",
    )
    imatrix: bool = Field(
        False,
        description="Compute an importance matrix with llama-imatrix on the recipe's "
        "calibration windows and quantize with it.",
    )

    def table_fields(self) -> dict[str, Any]:
        digits = "".join(ch for ch in self.type.split("_")[0] if ch.isdigit())
        return {"bits": int(digits) if digits else None, "group_size": None}


class LlamaCpp(Backend):
    name = "llamacpp"
    gguf_checkpoint = True
    description = (
        "llama.cpp's own quantization (llama-quantize, optional imatrix): a GGUF reference row."
    )
    Config = LlamaCppConfig
    replaces_only = False

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.imatrix

    def check_dependencies(self) -> None:
        from quantlab.engines.llamacpp import find_llamacpp

        tools = find_llamacpp()
        types = _known_types(tools)
        if types and self.config.type not in types:
            from quantlab.errors import did_you_mean

            raise QuantlabError(
                "llama-quantize has no type "
                f"'{self.config.type}'{did_you_mean(self.config.type, types)};"
                f" types: {', '.join(sorted(types))}"
            )

    def quantized_modules(self, model: nn.Module) -> list[str]:
        return []  # the weights live in the GGUF file, not in replaced modules

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        from quantlab.engines.llamacpp import find_llamacpp
        from quantlab.formats.gguf import gguf_type_counts, template_for

        tools = find_llamacpp()
        info = context.source_info
        template = template_for(info, Path(info["path"]) if info.get("path") else None, tools)
        # the F32 copy (4 bytes per weight) and the imatrix live only as long as this block,
        # whatever ends it (in context.scratch_dir when given: a run's disk; else the system's
        # temporary directory); the quantized file outlives it as an open file (below)
        with scratch_dir(SCRATCH_PREFIX, inside=context.scratch_dir) as work:
            gguf = self._quantize_in(work, model, calibration, tools, template, out, context)
            out.layer_stats = {"gguf_tensor_types": gguf_type_counts(gguf)}
            loaded = _load_gguf(gguf, next(model.parameters()).dtype)
            # closed by save(); the name goes with work
            out.artifacts["gguf"] = open(gguf, "rb")  # noqa: SIM115
        return loaded

    def _quantize_in(
        self,
        work: Path,
        model: nn.Module,
        calibration,
        tools,
        template: Path,
        out: Quantized,
        context: QuantizeContext,
    ) -> Path:
        """F32 GGUF of ``model``, (imatrix,) llama-quantize: the quantized file in ``work``."""
        from quantlab.engines.llamacpp import tool_timeout
        from quantlab.formats.gguf import export_gguf

        f32 = work / "f32.gguf"
        with out.stage("write F32 GGUF"):
            export_gguf(model, f32, template, float_type="F32")
        cmd = [tools.tool("llama-quantize")]
        if self.config.imatrix:
            with out.stage("llama-imatrix"):
                cmd += ["--imatrix", self._imatrix(tools, f32, calibration, work, context)]
        gguf = work / CHECKPOINT_GGUF
        with out.stage("llama-quantize"):
            run_tool(
                cmd + [f32, gguf, self.config.type],
                outputs=[gguf],
                what=f"llama-quantize to {self.config.type}",
                timeout_s=tool_timeout(f32.stat().st_size, rewrite=True),
            )
        f32.unlink()
        return gguf

    def _imatrix(
        self,
        tools,
        f32: Path,
        calibration: torch.Tensor | None,
        work: Path,
        context: QuantizeContext,
    ) -> Path:
        from quantlab.engines.llamacpp import tool_timeout

        if calibration is None:
            raise QuantlabError("llamacpp with imatrix: true needs calibration windows")
        tok = context.tokenizer
        if tok is None:
            raise QuantlabError(
                "llamacpp with imatrix: true needs the model's tokenizer "
                "(llama-imatrix reads calibration as text)"
            )
        text = work / "calibration.txt"
        text.write_text(
            "\n\n".join(tok.decode(w, skip_special_tokens=True) for w in calibration),
            encoding="utf-8",
        )
        out = work / "imatrix.gguf"
        n, seq = calibration.shape
        run_tool(
            [
                tools.tool("llama-imatrix"),
                "-m",
                f32,
                "-f",
                text,
                "-o",
                out,
                "-c",
                str(seq),
                "--chunks",
                str(n),
                "--no-ppl",
            ],
            what="llama-imatrix",
            outputs=[out],
            timeout_s=tool_timeout(f32.stat().st_size, eval_tokens=n * seq),
        )
        return out

    def save(self, quantized: Quantized, out_dir: Path) -> dict | None:
        """The quantized GGUF file (held open since quantize(): its directory is gone) as the
        checkpoint."""
        gguf = quantized.artifacts.get("gguf")
        if gguf is None:
            raise QuantlabError(
                "this model was not quantized by the llamacpp backend in this "
                "process (its GGUF file is what gets saved); quantize it first"
            )
        with gguf as src, open(out_dir / CHECKPOINT_GGUF, "wb") as dst:
            src.seek(0)
            shutil.copyfileobj(src, dst, 1 << 22)
        return None  # config.json describes the float architecture; the GGUF holds the quantization

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        return _load_gguf(Path(ckpt_dir) / CHECKPOINT_GGUF, dtype).to(device)


def _known_types(tools) -> set[str]:
    """The type names ``llama-quantize --help`` lists."""
    import re

    from quantlab.engines.llamacpp import PROBE_TIMEOUT_S

    proc = run_tool(
        [tools.tool("llama-quantize"), "--help"],
        what="llama-quantize --help",
        timeout_s=PROBE_TIMEOUT_S,
        check=False,
    )  # it exits 1 after its help
    return set(re.findall(r"^\s+\d+\s+or\s+([A-Z0-9_]+)\s*:", proc.stdout + proc.stderr, re.M))


def _load_gguf(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False
        )
    except Exception as e:  # transformers cannot dequantize every GGUF type
        raise QuantlabError(
            f"transformers cannot read '{path}' back ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()
