"""Perplexity (and divergence from a stored base) of a model larger than memory, layer by
layer over all windows.

The windows are cut and batched exactly as :func:`quantlab.bench.perplexity.score` does
(same plan, same batches, same right-padding, the output head from each batch's first scored
position on), but the loops are swapped: every batch goes through the embedding, then every
batch through decoder layer 0, and so on; only the hidden states of the windows are held for
all batches (4 windows x 256 tokens x 4096 wide: 16 MB in float32), never more than one
layer's weights. The final norm and the output head run last, and each scored position's NLL
is taken as ``score`` takes it, so the result equals quantlab's perplexity of the same model
loaded whole (``tests/test_streaming.py``).

A model directory is a float model (safetensors, sharded or not) or a quantlab checkpoint of a
layout backend (GPTQ v1, AWQ gemm, HQQ: its packed layers are rebuilt per layer, verified
against the sidecar's manifest first unless ``verify`` is off).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from quantlab.bench.perplexity import (
    IGNORE,
    LogitsHook,
    PerplexityResult,
    WindowPlan,
    batch_nlls,
    batches,
    summarize,
)
from quantlab.errors import QuantlabError
from quantlab.log import log as default_log
from quantlab.progress import Progress
from quantlab.quantizers.arch import arch_spec, decoder_layers
from quantlab.quantizers.sequential import first_layer_inputs, layer_output
from quantlab.streaming.layerwise import buffers_to, release, skeleton
from quantlab.streaming.shards import ShardedSource


def open_model(model_dir: Path, dtype: torch.dtype, *, verify: bool = True) -> nn.Module:
    """The meta skeleton of a float model or of a quantlab checkpoint (its quantized modules
    replaced by their layout's empty modules, on meta too)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from quantlab.checkpoint import read_sidecar, verify_checkpoint
    from quantlab.formats import get_layout
    from quantlab.layout import SIDECAR
    from quantlab.quantizers.base import module_config, set_module

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    qcfg = getattr(config, "quantization_config", None) or {}
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = skeleton(config, dtype)
    if not (model_dir / SIDECAR).is_file():
        if qcfg:
            raise QuantlabError(
                f"'{model_dir}' holds weights quantized by another tool; streamed "
                "scoring reads float models and quantlab checkpoints"
            )
        return model
    if verify:
        verify_checkpoint(model_dir)
    meta = read_sidecar(model_dir)
    if "layout" not in meta:
        raise QuantlabError(
            f"checkpoint '{model_dir}' ({meta.get('backend')}) is in a library's own "
            "format, which streamed scoring does not read; load it whole"
        )
    layout = get_layout(meta["layout"]["name"])
    with init_empty_weights(include_buffers=True):
        for name in meta.get("modules", []):
            lin = model.get_submodule(name)
            set_module(model, name, layout.empty(lin, module_config(qcfg, name), dtype))
    return model


def _load(module: nn.Module, prefix: str, source: ShardedSource, dtype, device) -> None:
    """Parameters and persistent buffers of ``module`` from the shards; packed layers' dense
    weights recomputed (as a checkpoint's load does)."""
    want = module.state_dict(keep_vars=True)  # meta tensors: the dtype each one is used in
    tensors = source.read([prefix + n for n in want], device=device)
    # cast as load_state_dict's copy would: float parameters in the compute dtype, packed
    # buffers as their layout holds them (int32 codes, float16 scales)
    state = {n: tensors[prefix + n].to(want[n].dtype) for n in want}
    module.load_state_dict(state, strict=True, assign=True)
    for m in module.modules():
        if hasattr(m, "refresh"):
            m.refresh()


def _batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inputs and targets of one batch, right-padded as ``score`` pads them, and the first
    scored position (-1: none)."""
    length = max(s.input_ids.numel() for s in batch)
    inp = torch.zeros(len(batch), length, dtype=torch.long)
    tgt = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    for j, s in enumerate(batch):
        inp[j, : s.input_ids.numel()] = s.input_ids
        tgt[j, : s.targets.numel()] = s.targets
    scored = (tgt != IGNORE).any(0).nonzero()
    return inp, tgt, int(scored[0]) if scored.numel() else -1


def _head_modules(model: nn.Module, layers_path: str) -> tuple[str, str]:
    """Paths of the final norm and the output head (llama-style: ``model.norm``, ``lm_head``)."""
    norm = layers_path.rpartition(".")[0] + ".norm"
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    try:
        model.get_submodule(norm)
    except AttributeError:
        head = None
    if head is None:
        raise QuantlabError(
            f"streamed scoring does not know where the final norm and output head of a "
            f"'{type(model).__name__}' are (llama-style models only); score it whole"
        )
    return norm, head


@torch.no_grad()
def streaming_score(
    model_dir: str | Path,
    plan: WindowPlan,
    batch_size: int = 4,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    on_logits: LogitsHook | None = None,
    verify: bool = True,
    log=default_log,
) -> tuple[torch.Tensor, float]:
    """What :func:`quantlab.bench.perplexity.score` returns (NLL of every scored token in plan
    order, float64; the seconds taken), computed one decoder layer at a time."""
    model_dir, device = Path(model_dir), torch.device(device)
    model = open_model(model_dir, dtype, verify=verify)
    source = ShardedSource(model_dir)
    spec = arch_spec(model)
    layers = decoder_layers(model, spec)
    norm_path, head_path = _head_modules(model, spec.layers)
    buffers_to(model, device)
    t0 = time.perf_counter()
    work = [b for b in (_batch_tensors(g) for g in batches(plan.segments, batch_size)) if b[2] >= 0]
    emb = model.get_input_embeddings()
    emb_path = next(n for n, m in model.named_modules() if m is emb)
    _load(emb, emb_path + ".", source, dtype, device)
    states = [first_layer_inputs(model, layers, inp.to(device), inp.shape[0]) for inp, _, _ in work]
    hidden, kwargs = [h for hs, _ in states for h in hs], [k for _, ks in states for k in ks]
    release(emb)
    with Progress(len(layers), "streamed scoring", log=log) as progress:
        for i, layer in enumerate(layers):
            _load(layer, f"{spec.layers}.{i}.", source, dtype, device)
            hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            release(layer)
            progress.step()
    norm, head = model.get_submodule(norm_path), model.get_submodule(head_path)
    _load(norm, norm_path + ".", source, dtype, device)
    _load_head(model, head_path, emb_path, source, dtype, device)
    nlls: list[torch.Tensor] = []
    for h, (_, tgt, first) in zip(hidden, work):
        logits = head(norm(h[:, first:]))
        nlls += batch_nlls(logits, tgt[:, first:].to(device), on_logits)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return (torch.cat(nlls) if nlls else torch.zeros(0, dtype=torch.float64)), seconds


def _load_head(
    model: nn.Module, head_path: str, emb_path: str, source: ShardedSource, dtype, device
) -> None:
    """The output head: its own tensors, or the embedding's where they are tied (stored once)."""
    head = model.get_submodule(head_path)
    if f"{head_path}.weight" in source.info or any(
        n.startswith(head_path + ".") for n in source.info
    ):
        _load(head, head_path + ".", source, dtype, device)
        return
    if not getattr(model.config, "tie_word_embeddings", False):
        raise QuantlabError(
            f"'{source.dir}' holds no '{head_path}' tensors and its config does not "
            "tie them to the embedding"
        )
    weight = source.read([f"{emb_path}.weight"], dtype=dtype, device=device)[f"{emb_path}.weight"]
    head.weight = nn.Parameter(weight, requires_grad=False)


def streaming_perplexity(
    model_dir: str | Path, plan: WindowPlan, batch_size: int = 4, **kw
) -> PerplexityResult:
    """:func:`quantlab.bench.perplexity.perplexity` of the model in ``model_dir``, streamed."""
    nll, seconds = streaming_score(model_dir, plan, batch_size, **kw)
    return summarize(plan, nll, seconds)


def streaming_evaluate(
    model_dir: str | Path, plan: WindowPlan, batch_size: int = 4, reference=None, **kw
) -> tuple[PerplexityResult, dict | None]:
    """:func:`quantlab.scoring.evaluate`, streamed: perplexity, and divergence from
    ``reference`` (a :class:`~quantlab.bench.divergence.ReferenceLogprobs`) in the same pass."""
    from quantlab.bench.divergence import DivergenceStats

    stats = DivergenceStats(reference) if reference is not None else None
    nll, seconds = streaming_score(
        model_dir, plan, batch_size, on_logits=stats.compare if stats else None, **kw
    )
    return summarize(plan, nll, seconds), (stats.result() if stats else None)


def streaming_reference(
    model_dir: str | Path, plan: WindowPlan, path: str | Path, batch_size: int, key: str, **kw
):
    """:func:`quantlab.scoring.compute_reference`, streamed: the base model's distributions
    at the scored positions, stored once at ``path`` (reused when a finished one with the same
    key is there and verifies)."""
    from quantlab.bench.divergence import ReferenceLogprobs

    found = ReferenceLogprobs.open(path)
    if found is not None and found.meta.get("key") == key:
        return found
    dtype = kw.get("dtype", torch.float32)
    head = open_model(Path(model_dir), dtype, verify=kw.get("verify", True)).get_output_embeddings()
    ref = ReferenceLogprobs.create(
        path, plan.scored_tokens, head.weight.shape[0], meta={"key": key}
    )
    nll, seconds = streaming_score(model_dir, plan, batch_size, on_logits=ref.append, **kw)
    ref.meta.update(seconds=seconds, ppl=float(torch.exp(nll.mean())))
    ref.finish()
    done = ReferenceLogprobs.open(path, verify=False)
    if done is None:
        raise QuantlabError(
            f"the reference distributions written to '{path}' were changed or "
            "removed while being written: is another process writing there?"
        )
    return done
