"""``ggml``: llama.cpp's own quantizers, run by quantlab, written as a GGUF file.

The same bytes ``llama-quantize --pure`` writes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL; see
:mod:`quantlab.formats.ggml_quants`), without llama.cpp's tools: every linear layer of the
blocks takes ``type``, the token embedding (and an untied output head) ``embedding_type``,
norms stay F32. With ``imatrix: true`` quantlab computes the importance matrix on the recipe's
calibration windows (the mean of x² per input column of each layer, what ``llama-imatrix``
collects) and the search weights by it as llama.cpp does; ``imatrix_file`` reads one of
llama.cpp's imatrix files instead. The GGUF file is the checkpoint (``model.gguf``, with the
importance matrix beside it as ``imatrix/imatrix.gguf`` when one was used); quantlab scores it read
back through transformers' GGUF reader, like the ``llamacpp`` rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.ggml_quants import BLOCK, TYPES, check_quantizable
from quantlab.procs import scratch_dir
from quantlab.quantizers.base import Backend, BackendConfig, QuantizeContext, Quantized

CHECKPOINT_GGUF = "model.gguf"
#: the importance matrix a checkpoint was quantized with, in a folder of its own: the
#: checkpoint's top-level *.gguf files are its weights (sizes, bits per weight)
IMATRIX_FILE = "imatrix/imatrix.gguf"
SCRATCH_PREFIX = "quantlab-ggml-"
GgmlType = Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]


class GgmlConfig(BackendConfig):
    type: GgmlType = Field(
        "Q4_0",
        description="The GGUF type of every linear layer: Q4_0, Q4_1, Q5_0, "
        "Q5_1, Q8_0 or IQ4_NL (lower case accepted).",
    )
    imatrix: bool = Field(
        False,
        description="Compute an importance matrix on the recipe's calibration "
        "windows and quantize with it (llama.cpp's importance-weighted scale search).",
    )
    imatrix_file: str | None = Field(
        None,
        description="Read the importance matrix from this llama.cpp "
        "imatrix file (GGUF or legacy .dat) instead of computing it.",
    )
    embedding_type: Literal["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"] = Field(
        "Q8_0",
        description="The GGUF type of the token embedding (and of an untied output head): "
        "Q8_0, as llama.cpp's presets store it on models whose width is not a multiple of 256.",
    )

    search: Literal["none", "awq"] = Field(
        "none",
        description="'none': llama.cpp's quantizer alone (its exact bytes); 'awq': first "
        "AWQ's per-channel scale search, each candidate scored with this type's own quantizer "
        "(importance and float16 scales included), the scales folded into the preceding norms "
        "(the file stays plain GGUF). Needs calibration windows.",
    )
    n_grid: int = Field(20, ge=1, le=200, description="search: awq: grid points of the scales.")
    duo_scaling: bool = Field(
        True, description="search: awq: s = mean|x|^a / mean|w|^(1-a) (else mean|x|^a)."
    )
    search_tokens: int = Field(
        4096,
        ge=64,
        description="search: awq: calibration tokens (seeded subset) whose second moment "
        "scores the candidates.",
    )
    seed: int = Field(0, description="search: awq: seed of the token subset.")

    @field_validator("type", "embedding_type", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _search_knobs(self) -> GgmlConfig:
        # a knob of a search that does not run would be silently ignored: say so instead
        # (only values other than the default: a checkpoint's sidecar holds every option)
        knobs = sorted(
            k
            for k in ("n_grid", "duo_scaling", "search_tokens", "seed")
            if getattr(self, k) != type(self).model_fields[k].default
        )
        if self.search == "none" and knobs:
            raise ValueError(f"{', '.join(knobs)} only apply with search: awq (search is none)")
        return self

    def table_fields(self) -> dict[str, Any]:
        return {"bits": int(self.type[1] if self.type[0] == "Q" else 4), "group_size": BLOCK}


class Ggml(Backend):
    name = "ggml"
    gguf_checkpoint = True
    description = (
        "llama.cpp's own quantizers (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL, optional importance matrix) "
        "run by quantlab: the bytes llama-quantize writes, as a GGUF checkpoint."
    )
    Config = GgmlConfig
    config: GgmlConfig
    replaces_only = False

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        c = self.config
        return (c.imatrix and c.imatrix_file is None) or c.search == "awq"

    def quantized_modules(self, model: nn.Module) -> list[str]:
        return []  # the weights live in the GGUF file, not in replaced modules

    def check(self, model: nn.Module) -> None:
        """Before any work: every tensor can take its type, and an imatrix file is this
        model's."""
        c = self.config
        if c.imatrix and c.imatrix_file:
            raise QuantlabError("ggml: set imatrix: true (computed here) or imatrix_file, not both")
        for name, shape, qtype in _planned(model, c):
            if qtype in TYPES:
                check_quantizable(name, shape, qtype)
        if c.imatrix_file:
            self._read_imatrix(model)
        if c.search == "awq":
            from quantlab.quantizers.arch import arch_spec, decoder_layers

            spec = arch_spec(model)
            decoder_layers(model, spec)
            if not spec.scale_groups:
                raise QuantlabError(
                    f"ggml search: awq cannot fold scales in a '{model.config.model_type}' "
                    "model (no scale groups for this architecture); use search: none"
                )

    def _read_imatrix(self, model: nn.Module):
        from quantlab.imatrix import check_imatrix, read_imatrix

        im = read_imatrix(self.config.imatrix_file)
        check_imatrix(im, _block_columns(model), f"'{self.config.imatrix_file}'")
        return im

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        from quantlab.formats.gguf import export_ggml, gguf_type_counts, template_for
        from quantlab.imatrix import write_imatrix
        from quantlab.quantizers.llamacpp import _load_gguf

        self.check(model)
        info = context.source_info
        template = template_for(info, Path(info["path"]) if info.get("path") else None)
        with out.stage("importance matrix"):
            im = self._importance(model, calibration)
        if self.config.search == "awq":
            from quantlab.quantizers.ggml_awq import awq_fold

            if calibration is None:
                raise QuantlabError("ggml with search: awq needs calibration windows")
            names = gguf_names_of(model)
            with out.stage("scale search"):
                awq_fold(
                    model, calibration, self.config.type, im, names, self.config, out.layer_stats
                )
        with scratch_dir(SCRATCH_PREFIX, inside=context.scratch_dir) as work:
            gguf = work / CHECKPOINT_GGUF
            with out.stage("quantize and write GGUF"):
                importance = {n: im.importance(n) for n in im.sums} if im is not None else None
                export_ggml(
                    model,
                    gguf,
                    template,
                    self.config.type,
                    embedding_type=self.config.embedding_type,
                    importance=importance,
                )
            out.layer_stats["gguf_tensor_types"] = gguf_type_counts(gguf)
            loaded = _load_gguf(gguf, next(model.parameters()).dtype)
            # held open: closed by save(); the name goes with work
            out.artifacts["gguf"] = open(gguf, "rb")  # noqa: SIM115
            if im is not None:
                out.artifacts["imatrix"] = write_imatrix(im, work / "imatrix.gguf").read_bytes()
        return loaded

    def _importance(self, model: nn.Module, calibration: torch.Tensor | None):
        """The importance matrix the options ask for (None: none)."""
        from quantlab.imatrix import compute_imatrix, gguf_names

        if self.config.imatrix_file:
            return self._read_imatrix(model)
        if not self.config.imatrix:
            return None
        if calibration is None:
            raise QuantlabError("ggml with imatrix: true needs calibration windows")
        return compute_imatrix(model, calibration, gguf_names(model, _block_linears(model)))

    def save(self, quantized: Quantized, out_dir: Path) -> dict | None:
        """The GGUF file (held open since quantize: its directory is gone) as the checkpoint,
        and the importance matrix it was quantized with."""
        gguf = quantized.artifacts.get("gguf")
        if gguf is None:
            raise QuantlabError(
                "this model was not quantized by the ggml backend in this process (its GGUF "
                "file is what gets saved); quantize it first"
            )
        with gguf as src, open(out_dir / CHECKPOINT_GGUF, "wb") as dst:
            src.seek(0)
            shutil.copyfileobj(src, dst, 1 << 22)
        if "imatrix" in quantized.artifacts:
            (out_dir / IMATRIX_FILE).parent.mkdir()
            (out_dir / IMATRIX_FILE).write_bytes(quantized.artifacts["imatrix"])
        return None  # config.json describes the float architecture; the GGUF holds the quantization

    @classmethod
    def load(
        cls, ckpt_dir: Path, meta: dict, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        from quantlab.quantizers.llamacpp import _load_gguf

        return _load_gguf(Path(ckpt_dir) / CHECKPOINT_GGUF, dtype).to(device)


def _block_linears(model: nn.Module) -> list[str]:
    """The linear layers of the decoder blocks (what takes ``type``; the head is tied or takes
    ``embedding_type``)."""
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"
    ]


def gguf_names_of(model: nn.Module) -> dict[str, str]:
    """{layer name: GGUF name} of the blocks' linear layers."""
    from quantlab.imatrix import gguf_names

    return gguf_names(model, _block_linears(model))


def _block_columns(model: nn.Module) -> dict[str, int]:
    """{GGUF name: input columns} of the blocks' linear layers (an imatrix's entries)."""
    from quantlab.imatrix import gguf_names

    names = gguf_names(model, _block_linears(model))
    return {names[n]: model.get_submodule(n).in_features for n in names}


def _planned(model: nn.Module, c: GgmlConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, GGUF type) of every 2-D weight the file quantizes."""
    out = [(n, tuple(model.get_submodule(n).weight.shape), c.type) for n in _block_linears(model)]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        out.append(("token embedding", tuple(emb.weight.shape), c.embedding_type))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and emb is not None and head.weight is not emb.weight:
        out.append(("output head", tuple(head.weight.shape), c.embedding_type))
    return out
