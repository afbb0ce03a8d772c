"""The backend interface every quantizer implements, and the helpers they share.

A backend is a small class:

- ``name``, ``description``, ``Config`` (a frozen pydantic model, unknown keys are errors,
  with a ``version`` that changes whenever the same options would give different output),
  ``needs_calibration`` and ``extra`` (the pip extra its library comes with, if any);
- ``check(model)`` raises a clear error before any work when the model cannot be quantized
  with these options;
- ``quantize(model, calibration, context)`` returns a :class:`Quantized`: the quantized model
  (``model`` may be modified in place), its per-layer statistics, the wall time of its named
  stages and whatever ``save`` needs beyond the model. A backend implements ``_quantize``;
  nothing is handed back by setting attributes on the backend or on the model;
- ``save(quantized, out_dir)`` writes the weight files and returns the
  ``quantization_config`` that goes into ``config.json`` (``None`` for an unquantized
  model), in the format the ecosystem expects for the method;
- ``load(ckpt_dir, meta, dtype, device)`` rebuilds the model from a checkpoint directory.

Everything else (config, tokenizer, sidecar metadata, atomic writes) is done once, in
:mod:`quantlab.checkpoint`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.base import GridSpec, tied_parameter_names

WEIGHTS_NAME = "model.safetensors"


class BackendConfig(BaseModel):
    """Base of every backend's options: frozen, unknown keys rejected, strict types (``true``
    is not a group size of 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    version: ClassVar[int] = 1

    def table_fields(self) -> dict[str, Any]:
        """Columns this config contributes to the results table (bits, group_size)."""
        return {}

    def skip_list(self) -> list[str]:
        """The ``skip`` patterns; ``skip: auto`` starts from the output head (the sensitivity
        pass replaces it with the layers it chose, see :mod:`quantlab.sensitivity`)."""
        skip = getattr(self, "skip", [])
        return list(AUTO_SKIP_BASE) if skip == "auto" else list(skip)


#: what ``skip: auto`` always leaves in float: the output head (tied to the embeddings in
#: most small models, and the most sensitive layer)
AUTO_SKIP_BASE = ("lm_head",)


def skip_field():
    """The ``skip`` option every backend that quantizes linear layers shares."""
    return Field(
        default_factory=lambda: ["lm_head"],
        description="Glob patterns of linear layers left in float (embeddings are never "
        "quantized: they are not linear layers), or 'auto': the sensitivity pass leaves "
        "in float the fewest layers that keep the KL divergence within the method's "
        "sensitivity.kl_budget.",
    )


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str):
    """Add the wall time of the block to ``seconds[name]`` (stage times, summed over layers)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True)
class QuantizeContext:
    """What a backend may need from the caller beyond the model and the calibration windows
    (only the llamacpp backend reads it today)."""

    #: the model's tokenizer (llama-imatrix reads calibration as text)
    tokenizer: Any = None
    #: the source model's description (quantlab.models: the GGUF metadata template)
    source_info: dict[str, Any] = field(default_factory=dict)
    #: where large scratch files go (a run's method directory: counted against its disk)
    scratch_dir: Path | None = None


@dataclass
class Quantized:
    """What :meth:`Backend.quantize` hands back."""

    model: nn.Module
    #: per-layer statistics recorded while quantizing (name -> dict), for reports
    layer_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: wall time of the named stages of quantization (seconds, summed over layers)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: what ``save`` needs beyond the model (bnb: the layers' tensors before a forward pass
    #: could repack them; llamacpp: the quantized GGUF file, held open)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str):
        """Add the wall time of the block to ``stage_seconds[name]``."""
        return timed(self.stage_seconds, name)


class Backend(ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[BackendConfig]]
    needs_calibration: ClassVar[bool] = False
    extra: ClassVar[str | None] = None
    #: ``quantize`` only replaces (or re-parameterizes) the modules it quantizes and changes
    #: nothing else, so the sensitivity pass can undo it in place
    replaces_only: ClassVar[bool] = True
    #: the method changes weights (false only for the float baseline, which every export
    #: writes in float)
    quantizes: ClassVar[bool] = True
    #: the checkpoint is a GGUF file already (llama.cpp's own quantizers): the method exports
    #: GGUF unless told otherwise, and the GGUF export copies that file
    gguf_checkpoint: ClassVar[bool] = False
    #: what quantizing needs in memory, one phrase for ``quantlab backends`` ("streams one
    #: decoder layer at a time ..."); None: the streaming table's entry for this name
    #: (:func:`quantlab.streaming.methods.memory_needs`: whole model unless it streams)
    memory: ClassVar[str | None] = None

    def __init__(self, config: BackendConfig | None = None):
        self.config = config if config is not None else self.Config()

    def grid(self) -> GridSpec | None:
        """The integer grids this method's layers sit on (see :class:`GridSpec`), for exports
        that store grids as they are; None when its layers are not on such a grid (a library's
        own format) or when it quantizes nothing (``quantizes``)."""
        return None

    def quantized_modules(self, model: nn.Module) -> list[str]:
        """Names of the modules ``quantize`` replaced (recorded in the checkpoint sidecar)."""
        return [n for n, m in model.named_modules() if hasattr(m, "qweight")]

    def check_dependencies(self) -> None:
        """Raise :class:`MissingDependencyError` (naming the pip extra) when the library this
        config needs is not installed. Called before any model is loaded."""
        return None

    def check(self, model: nn.Module) -> None:
        """Raise :class:`QuantlabError` if ``model`` cannot be quantized with this config
        (the default accepts every model)."""
        return None

    def quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        context: QuantizeContext | None = None,
    ) -> Quantized:
        """Quantize ``model`` (it may be modified in place); ``calibration`` is a LongTensor
        [samples, seq_len] of token ids (``None`` for backends that need none)."""
        out = Quantized(model)
        out.model = self._quantize(model, calibration, out, context or QuantizeContext())
        return out

    @abstractmethod
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        """The method itself: return the quantized model; record statistics, stage times
        (``with out.stage(name)``) and what ``save`` needs into ``out``."""

    @abstractmethod
    def save(self, quantized: Quantized, out_dir: Path) -> dict[str, Any] | None:
        """Write the weight files of ``quantized.model`` into ``out_dir``; return its
        quantization_config."""

    @classmethod
    @abstractmethod
    def load(
        cls, ckpt_dir: Path, meta: dict[str, Any], dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        """Rebuild the model saved by :meth:`save` (``meta``: the checkpoint's quantlab.json)."""

    def layout(self):
        """The :mod:`quantlab.formats` layout the quantized layers are stored in, recorded in
        the sidecar (``None``: the backend writes a library's own format, e.g. torchao's)."""
        return None


# --------------------------------------------------------------------------- shared helpers


def target_linears(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of ``model`` whose names match no pattern in ``skip``.

    Patterns are shell-style globs on module names (``lm_head``, ``*.mlp.down_proj``,
    ``model.layers.0.*``); a plain name also matches as a suffix after a dot."""

    def skipped(name: str) -> bool:
        return any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in skip
        )

    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(n)]


def quantizable_linears(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """:func:`target_linears`, refusing an empty result and tied weights (the checks every
    backend that quantizes linear layers starts with)."""
    targets = target_linears(model, skip)
    if not targets:
        raise QuantlabError("no linear layer is left to quantize: 'skip' excludes them all")
    check_not_tied(model, targets)
    return targets


def check_not_tied(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    tied = tied_parameter_names(model)
    for name, _ in targets:
        if f"{name}.weight" in tied:
            raise QuantlabError(
                f"layer '{name}' shares its weight with another layer (tied embeddings); "
                "quantizing it alone is not supported: keep it in 'skip'"
            )


def save_weights(model: nn.Module, path: Path, max_shard_bytes: int | None = None) -> None:
    """Save the state dict as safetensors, storing tied tensors once: ``path`` (one file), or,
    past ``max_shard_bytes`` of tensor data (default 5 GB, the Hub's convention), shards of
    at most that much beside it with ``model.safetensors.index.json`` (the streamed export's
    :class:`~quantlab.streaming.writer.ShardWriter`)."""
    from safetensors.torch import save_file

    from quantlab.streaming.writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter

    tied = tied_parameter_names(model)
    tensors = {}
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        tensors[name] = t.detach().contiguous().cpu()
    budget = DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    if sum(t.numel() * t.element_size() for t in tensors.values()) <= budget:
        save_file(tensors, str(path), metadata={"format": "pt"})
        return
    writer = ShardWriter(Path(path).parent, budget)
    try:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's ``path`` (``DIR/model.safetensors``): that file, or, where
    it is absent, ``DIR/model.safetensors.index.json`` and its shards, checked as the
    streaming source checks them (one error naming the file and what would work)."""
    from safetensors.torch import load_file

    from quantlab.streaming.shards import INDEX, ShardedSource

    path = Path(path)
    if not path.exists() and (path.parent / INDEX).is_file():
        source = ShardedSource(path.parent)
        return source.read(source.names())
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise QuantlabError(
            f"checkpoint weights '{path}' are missing (nor is there a {INDEX} beside it)"
        ) from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise QuantlabError(f"checkpoint weights '{path}' cannot be read: {e}") from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's safetensors weights into ``model`` (one file or shards with their
    index: :func:`read_weights`); only tied tensors may be absent from them."""
    state = read_weights(path)
    tied = tied_parameter_names(model)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise QuantlabError(
            f"checkpoint weights '{path}' do not match the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """An architecture from its config, weights left uninitialised (they are loaded next)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # from_config leaves tying to from_pretrained in transformers 5
    return model.eval()


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def module_config(qcfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``quantization_config`` of one module: the checkpoint's, with the overrides of the
    first ``dynamic`` entry whose pattern matches ``name`` (gptqmodel's per-module form:
    ``{"+:REGEX": {"bits": 8}}``; ``-:`` entries exclude modules and change nothing here)."""
    import re

    for key, override in (qcfg.get("dynamic") or {}).items():
        if key.startswith("-:"):
            continue
        if re.match(key.removeprefix("+:"), name) and isinstance(override, dict):
            return {**{k: v for k, v in qcfg.items() if k != "dynamic"}, **override}
    return qcfg


def load_quantized(
    ckpt_dir: Path, meta: dict[str, Any], dtype: torch.dtype, device: torch.device, make
) -> nn.Module:
    """Rebuild a quantized checkpoint: the architecture from ``config.json``, each module named
    in ``meta['modules']`` replaced by ``make(float_linear, quantization_config)``, the weights
    loaded, then every packed module's dense weight recomputed (``refresh``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ckpt_dir, trust_remote_code=False)
    qcfg = getattr(config, "quantization_config", None) or {}
    if not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = build_skeleton(config, dtype)
    for name in meta.get("modules", []):
        set_module(model, name, make(model.get_submodule(name), module_config(qcfg, name)))
    load_weights(model, Path(ckpt_dir) / WEIGHTS_NAME)
    for m in model.modules():
        if hasattr(m, "refresh"):
            m.refresh()
    return model.to(device).eval()
