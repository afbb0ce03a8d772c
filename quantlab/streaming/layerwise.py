"""Layer-at-a-time quantization: a model larger than memory quantized and exported with one
decoder layer in memory at a time.

The model is built from its ``config.json`` with every parameter on the ``meta`` device (no
memory; buffers such as the rotary frequencies are real, they are small), its embedding read
from the shards, and the calibration windows run through it up to the first decoder layer
(:func:`quantlab.quantizers.sequential.first_layer_inputs`: the hidden states and the keyword
arguments the model gives its layers, attention mask and position embeddings as the model
computes them). Then for each decoder layer: its tensors are read from the shards onto the
compute device, its linears quantized by the method (:mod:`quantlab.streaming.methods`, on
quantlab's own algorithm cores), the layer's output on the calibration hidden states becomes
the next layer's input, its quantized tensors are appended to the export's shards, and the
layer goes back to ``meta``. The checkpoint is the one the in-memory backend exports, tensor
for tensor (``tests/test_streaming.py`` checks it byte for byte on a tiny model).

``device`` is where a layer is materialized and computed: CPU here, ``cuda`` on a GPU box
(one decoder layer and the calibration hidden states on the device; the shards stay on disk).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.log import log as default_log
from quantlab.progress import Progress
from quantlab.quantizers.arch import ArchSpec, arch_spec, decoder_layers
from quantlab.quantizers.base import check_not_tied, target_linears, timed
from quantlab.streaming.export import building, write_model_files, write_sidecar
from quantlab.streaming.shards import ShardedSource
from quantlab.streaming.writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The architecture of ``config`` with its parameters on ``meta`` (no memory, no
    initialisation) and its buffers real (rotary frequencies: computed from the config)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # from_config leaves tying to from_pretrained in transformers 5
    return model.eval()


def materialize(
    module: nn.Module, prefix: str, source: ShardedSource, dtype: torch.dtype, device: torch.device
) -> None:
    """Read ``module``'s parameters (``prefix`` + their names) from ``source`` onto ``device``
    in ``dtype``; every parameter must be there (strict)."""
    names = [n for n, _ in module.named_parameters()]
    tensors = source.read([prefix + n for n in names], dtype=dtype, device=device)
    state = {n: tensors[prefix + n] for n in names}
    module.load_state_dict(state, strict=False, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)


def release(module: nn.Module) -> None:
    """Free ``module``'s parameters and buffers (back to ``meta``), and hand the freed heap
    back to the OS: glibc keeps it otherwise, fragmented across its arenas, and the next
    layer's tensors then raise the resident memory instead of reusing it."""
    from quantlab.bench.memory import release_free_memory

    module.to("meta")
    release_free_memory()


def buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the real buffers of ``model`` (not the meta ones) to ``device``."""
    for mod in model.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != device:
                mod._buffers[k] = b.to(device)


@dataclass
class StreamResult:
    """What :func:`quantize_streaming` did: the checkpoint, per-layer statistics, seconds."""

    out_dir: Path
    layer_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    #: wall time of the whole walk and export (quantizing and writing interleave)
    quantize_s: float = 0.0
    #: its named parts (seconds): reading weights, quantizing (the calibration forward passes
    #: included), writing shards, and the export's end (config, tokenizer, manifest hashes)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    total_size: int = 0

    def stage(self, name: str):
        """Add the wall time of the block to ``stage_seconds[name]``."""
        return timed(self.stage_seconds, name)


@dataclass
class _Walk:
    """The skeleton being walked and where its tensors come from."""

    model: nn.Module
    spec: ArchSpec
    layers: nn.ModuleList
    source: ShardedSource
    dtype: torch.dtype
    device: torch.device
    targets: list[str]


def open_walk(source_dir: Path, dtype: torch.dtype, device: torch.device, skip: list[str]) -> _Walk:
    """The meta skeleton of the model in ``source_dir``, its shards, its targeted linears."""
    from transformers import AutoConfig

    source = ShardedSource(source_dir)
    config = AutoConfig.from_pretrained(source_dir, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        raise QuantlabError(f"'{source_dir}' holds a quantized model; quantize a float model")
    model = skeleton(config, dtype)
    spec = arch_spec(model)
    layers = decoder_layers(model, spec)
    buffers_to(model, device)
    targets = target_linears(model, skip)
    if not targets:
        raise QuantlabError("no linear layer is left to quantize: 'skip' excludes them all")
    check_not_tied(model, targets)
    check_layer_fits(largest_layer_bytes(model, layers, dtype), available_bytes(device), device)
    return _Walk(model, spec, layers, source, dtype, device, [n for n, _ in targets])


#: what quantizing a layer holds beside its weights in the compute dtype: the largest linear's
#: int64 codes and float32 temporaries of the grid and its error (measured: ~1.5 GB for a 7B
#: layer of 0.8 GB in float32), rounded up
WORKING_FACTOR = 3.0


def largest_layer_bytes(model: nn.Module, layers: nn.ModuleList, dtype: torch.dtype) -> int:
    """Bytes of the largest decoder layer's parameters in ``dtype`` (from the meta skeleton)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return max(sum(p.numel() for p in layer.parameters()) * size for layer in layers)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a layer on ``device``: CUDA's free memory, the kernel's MemAvailable on
    CPU (None where neither is known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_layer_fits(layer_bytes: int, available: int | None, device: torch.device) -> None:
    """One clear error, before any work, when a decoder layer and its working memory cannot
    fit on ``device`` (the one thing streaming cannot split)."""
    need = int(layer_bytes * WORKING_FACTOR)
    if available is not None and need > available:
        raise QuantlabError(
            f"one decoder layer of this model needs about {need / 2**30:.1f} GiB on {device} to be "
            f"quantized ({layer_bytes / 2**30:.1f} GiB of weights in the compute dtype and its "
            f"working memory); {available / 2**30:.1f} GiB is free. Free memory, use a device "
            "with more, or a smaller compute dtype (model.dtype: bfloat16)"
        )


def _outer_names(walk: _Walk) -> tuple[list[str], list[str]]:
    """The parameters outside the decoder layers: (the input embedding's, the others), in the
    skeleton's order; tied parameters once (as the in-memory export stores them)."""
    from quantlab.formats.base import tied_parameter_names

    inside = walk.spec.layers + "."
    emb = walk.model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()}
    tied = tied_parameter_names(walk.model) if walk.model.config.tie_word_embeddings else set()
    first, rest = [], []
    for n, p in walk.model.named_parameters(remove_duplicate=False):
        if n.startswith(inside) or n in tied:
            continue
        (first if id(p) in emb_ids else rest).append(n)
    return first, rest


@torch.no_grad()
def quantize_streaming(
    source_dir: str | Path,
    out_dir: str | Path,
    method,
    *,
    calibration: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: dict[str, Any] | None = None,
    label: str = "streamed",
    tokenizer=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log=default_log,
) -> StreamResult:
    """Quantize the float model in ``source_dir`` with ``method`` (a
    :class:`~quantlab.streaming.methods.LayerMethod`) one decoder layer at a time and export
    its checkpoint into ``out_dir`` (atomically: complete or absent). ``calibration``: token
    ids [n, L] when the method needs them. ``source``: the sidecar's record of the source
    model (the run's ``source_info``). Returns a :class:`StreamResult`."""
    source_dir, device = Path(source_dir), torch.device(device)
    walk = open_walk(source_dir, dtype, device, method.config.skip_list())
    method.check(walk.model, [(n, walk.model.get_submodule(n)) for n in walk.targets])
    if method.needs_calibration and calibration is None:
        raise QuantlabError(f"{method.backend} needs calibration data")
    result = StreamResult(Path(out_dir))
    t0 = time.perf_counter()
    with building(Path(out_dir)) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        try:
            _walk_layers(walk, method, writer, calibration, result, log)
            with result.stage("write shards"):
                done = writer.close()
        except BaseException:
            writer.abort()
            raise
        result.files, result.total_size = done["files"], done["total_size"]
        widths = {n: method.config.bits_for(n) for n in result.modules}
        with result.stage("finish export"):
            qconfig = method.quantization_config(widths, walk.model)
            write_model_files(tmp, source_dir, qconfig, dtype, tokenizer)
            _sidecar(tmp, method, result, source or {"path": str(source_dir)}, label)
    result.quantize_s = time.perf_counter() - t0
    return result


def _sidecar(tmp: Path, method, result: StreamResult, source: dict, label: str) -> None:
    write_sidecar(
        tmp,
        backend=method.backend,
        config_version=method.config.version,
        options=method.options(),
        modules=result.modules,
        layout={"name": method.layout.name, "version": method.layout.version},
        source=source,
        label=label,
    )


def _module_of(model: nn.Module, param: str) -> tuple[str, nn.Module]:
    path = param.rpartition(".")[0]
    return path, model.get_submodule(path)


def _walk_layers(
    walk: _Walk,
    method,
    writer: ShardWriter,
    calibration: torch.Tensor | None,
    result: StreamResult,
    log,
) -> None:
    """Embedding, every decoder layer, then the rest (final norm, output head), each read,
    quantized where targeted, written and freed in turn."""
    from quantlab.quantizers.sequential import first_layer_inputs

    model, spec = walk.model, walk.spec
    first, rest = _outer_names(walk)
    emb_path, emb = _module_of(model, first[0])
    with result.stage("read weights"):
        materialize(emb, emb_path + ".", walk.source, walk.dtype, walk.device)
    hidden = kwargs = None
    if method.needs_calibration:
        with result.stage("quantize"):
            hidden, kwargs = first_layer_inputs(
                model, walk.layers, calibration.to(walk.device), method.batch_size
            )
    with result.stage("write shards"):
        for n in first:
            writer.add(n, model.get_parameter(n))
    release(emb)
    with Progress(len(walk.layers), f"{method.backend}: quantize", log=log) as progress:
        for i, layer in enumerate(walk.layers):
            prefix = f"{spec.layers}.{i}."
            with result.stage("read weights"):
                materialize(layer, prefix, walk.source, walk.dtype, walk.device)
            mine = {
                n[len(prefix) :]: model.get_submodule(n)
                for n in walk.targets
                if n.startswith(prefix)
            }
            with result.stage("quantize"):
                out = method.quantize_layer(
                    layer, prefix, mine, hidden, kwargs, spec, result.layer_stats
                )
            hidden = out if out is not None else hidden
            with result.stage("write shards"):
                for k, v in layer.state_dict().items():
                    writer.add(prefix + k, v)
            result.modules += [
                prefix + n for n, m in layer.named_modules() if hasattr(m, "qweight")
            ]
            release(layer)
            progress.step()
    _write_rest(walk, method, writer, rest, result)


def _write_rest(
    walk: _Walk, method, writer: ShardWriter, rest: list[str], result: StreamResult
) -> None:
    """The parameters after the decoder layers, module by module; a targeted linear among
    them (an lm_head not skipped) quantized as the backend does."""
    from quantlab.quantizers.base import set_module

    paths = list(dict.fromkeys(n.rpartition(".")[0] for n in rest))
    for path in paths:
        module = walk.model.get_submodule(path)
        materialize(module, path + ".", walk.source, walk.dtype, walk.device)
        if path in walk.targets:
            q = method.quantize_outer(path, module, result.layer_stats)
            if q is not None:
                set_module(walk.model, path, q)
                result.modules.append(path)
                module = q
        for k, v in module.state_dict().items():
            writer.add(f"{path}.{k}", v)
        release(module)
