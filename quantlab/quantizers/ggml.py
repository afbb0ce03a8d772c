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

``type: auto`` with ``size_target`` chooses a type per tensor (the embedding included) under
the target by each tensor's KL at each type (:mod:`quantlab.quantizers.ggml_alloc`); the choice
goes into the checkpoint as ``allocation.json`` and into the row's ``layers`` record.
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
#: the type allocation's record beside the GGUF file (type: auto)
ALLOCATION_FILE = "allocation.json"
GgmlType = Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "AUTO"]
#: options that only type: auto reads
_AUTO_KNOBS = ("size_target", "candidates", "units", "probe", "probe_windows", "probe_seq_len")


class GgmlConfig(BackendConfig):
    type: GgmlType = Field(
        "Q4_0",
        description="The GGUF type of every linear layer: Q4_0, Q4_1, Q5_0, "
        "Q5_1, Q8_0 or IQ4_NL (lower case accepted); 'auto': a type per tensor, the token "
        "embedding included, chosen by KL under size_target.",
    )
    size_target: float | str | None = Field(
        None,
        description="type: auto: the size of the 2-D tensors (linears, embedding, an untied "
        "head): bits per weight (a number, e.g. 4.5) or bytes with a unit ('85MB', '81MiB').",
    )
    candidates: list[str] | None = Field(
        None,
        description="type: auto: the types to choose from (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
        "IQ4_NL, F16, F32); default the six quantized types that fit each tensor, plus F16 "
        "for tensors of at most 131072 weights.",
    )
    units: Literal["tensor", "fused"] = Field(
        "tensor",
        description="type: auto: 'tensor': every tensor its own type; 'fused': the layers "
        "engines fuse (q/k/v, gate/up) share one (fewer probes).",
    )
    probe: Literal["full", "scaled"] = Field(
        "full",
        description="type: auto: 'full': each unit's KL measured at every candidate type (as "
        "bits: auto); 'scaled': measured at its smallest type only, the others predicted by "
        "the ratio of importance-weighted weight errors (one forward per unit, not per type).",
    )
    probe_windows: int = Field(
        4, ge=1, le=64, description="type: auto: calibration windows the KL is measured on."
    )
    probe_seq_len: int = Field(
        256, ge=8, le=8192, description="type: auto: tokens of each probe window."
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

    @field_validator("candidates", mode="before")
    @classmethod
    def _known_types(cls, v: Any) -> Any:
        from quantlab.quantizers.ggml_alloc import ALL_TYPES

        if v is None:
            return v
        v = [t.upper() if isinstance(t, str) else t for t in v]
        bad = [t for t in v if t not in ALL_TYPES]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(
                f"candidates {v}: give distinct types from {', '.join(ALL_TYPES)}"
                + (f" ({', '.join(map(str, bad))} unknown)" if bad else "")
            )
        return v

    @field_validator("size_target")
    @classmethod
    def _target(cls, v: Any) -> Any:
        from quantlab.quantizers.ggml_alloc import parse_target

        if v is not None:
            parse_target(v)
        return v

    @model_validator(mode="after")
    def _auto_knobs(self) -> GgmlConfig:
        # type: auto needs a target; its knobs without it would be silently ignored
        if self.type == "AUTO":
            if self.size_target is None:
                raise ValueError(
                    "type: auto needs size_target (bits per weight, e.g. 4.5, or bytes, '85MB')"
                )
            if self.embedding_type != type(self).model_fields["embedding_type"].default:
                raise ValueError(
                    "type: auto chooses the embedding's type with the rest; leave "
                    "embedding_type out (candidates names the types)"
                )
            if self.search != "none":
                raise ValueError(
                    "search: awq needs one type to search for; with type: auto use search: none"
                )
            return self
        knobs = sorted(
            k for k in _AUTO_KNOBS if getattr(self, k) != type(self).model_fields[k].default
        )
        if knobs:
            raise ValueError(f"{', '.join(knobs)} only apply with type: auto (type is {self.type})")
        return self

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
        if self.type == "AUTO":  # several types: bits per weight says the size
            return {"bits": None, "group_size": BLOCK}
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
        return (c.imatrix and c.imatrix_file is None) or c.search == "awq" or c.type == "AUTO"

    def quantized_modules(self, model: nn.Module) -> list[str]:
        return []  # the weights live in the GGUF file, not in replaced modules

    def check(self, model: nn.Module) -> None:
        """Before any work: every tensor can take its type, and an imatrix file is this
        model's."""
        c = self.config
        if c.imatrix and c.imatrix_file:
            raise QuantlabError("ggml: set imatrix: true (computed here) or imatrix_file, not both")
        if c.type == "AUTO":
            from quantlab.quantizers.ggml_alloc import plan

            plan(model, _block_linears(model), c)  # candidates fit, the target is reachable
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
        importance = {n: im.importance(n) for n in im.sums} if im is not None else None
        types = None
        if self.config.type == "AUTO":
            with out.stage("type allocation"):
                types = self._allocate(model, calibration, template, importance, out)
        with scratch_dir(SCRATCH_PREFIX, inside=context.scratch_dir) as work:
            gguf = work / CHECKPOINT_GGUF
            with out.stage("quantize and write GGUF"):
                export_ggml(  # one type, or the allocation's type per tensor
                    model,
                    gguf,
                    template,
                    types if types is not None else self.config.type,
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

    def _allocate(self, model, calibration, template, importance, out: Quantized) -> dict:
        """type: auto: {GGUF name: type} under the size target (the record goes to the row's
        layers and, by save(), beside the file)."""
        import json

        from quantlab.log import log
        from quantlab.quantizers.ggml_alloc import allocate_gguf

        if calibration is None:
            raise QuantlabError("ggml with type: auto needs calibration windows")
        rec = allocate_gguf(
            model, _block_linears(model), calibration, template, importance, self.config, log
        )
        out.layer_stats["gguf_allocation"] = rec
        out.artifacts["allocation"] = json.dumps(rec, indent=1).encode()
        return rec["gguf_tensor_types"]

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
        if "allocation" in quantized.artifacts:
            (out_dir / ALLOCATION_FILE).write_bytes(quantized.artifacts["allocation"])
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
    if c.type == "AUTO":  # checked by ggml_alloc.plan
        return []
    out = [(n, tuple(model.get_submodule(n).weight.shape), c.type) for n in _block_linears(model)]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        out.append(("token embedding", tuple(emb.weight.shape), c.embedding_type))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and emb is not None and head.weight is not emb.weight:
        out.append(("output head", tuple(head.weight.shape), c.embedding_type))
    return out
