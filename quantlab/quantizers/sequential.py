"""Layer-by-layer calibration: the orchestration that GPTQ and AWQ share.

The calibration windows go through the embeddings once; after that only one decoder layer
at a time runs, on the hidden states the previous (already quantized) layers produced.
Statistics are collected by forward hooks here; the algorithms themselves are pure tensor
functions in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs were seen."""


def layer_output(out):
    """The hidden states a decoder layer returned (some return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering ``layers[0]`` for each batch of ``ids`` [n, L], with the
    keyword arguments (position embeddings, mask...) the model passes to its layers."""
    device = next(model.parameters()).device
    hidden, kwargs = [], []

    def catch(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(ids[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    for kw in kwargs:  # no cache while calibrating
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
    return hidden, kwargs


@torch.no_grad()
def run_layer(
    layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]
) -> list[torch.Tensor]:
    """Outputs of one decoder layer for every batch."""
    return [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]


@contextmanager
def input_hooks(
    modules: dict[str, nn.Module],
    fn: Callable[[str, torch.Tensor], None],
    stop_after: Iterable[str] = (),
):
    """Call ``fn(name, x)`` with the input of each module in ``modules`` during forwards.

    When every module named in ``stop_after`` has been called in the current forward pass,
    the pass stops (the layer's later computations are not needed)."""
    stop_set = set(stop_after)
    seen: set[str] = set()

    def make(name):
        def hook(module, args):
            fn(name, args[0])
            seen.add(name)
            if stop_set and stop_set <= seen:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def feed(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], seen: set[str]) -> None:
    """Run the layer on every batch for its hooks' sake (outputs discarded)."""
    for h, kw in zip(hidden, kwargs):
        seen.clear()
        try:
            layer(h, **kw)
        except _Stop:
            pass


def _capture_input(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """Run ``run()`` until ``module`` is called; return the input it was called with."""
    box: list[torch.Tensor] = []

    def hook(mod, args):
        box.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{type(module).__name__} was never called")
    return box[0]


@torch.no_grad()
def staged_prenorm_layer(
    layer: nn.Module,
    prenorm: tuple[str, ...],
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    on_inputs: Callable[[str, list[torch.Tensor]], None],
) -> list[torch.Tensor]:
    """Run a pre-norm decoder layer over all batches stage by stage, each stage once.

    ``on_inputs(stage, xs)`` is called with the inputs of every linear group before that group
    is used (stage 'attn_in': the q/k/v input, 'o_in', 'mlp_in': the gate/up input, 'down_in'),
    so a quantizer can replace the group's weights before the next stage sees their outputs
    (true-sequential order at the cost of about one forward pass). Returns the layer outputs.

    ``xs`` is a one-pass iterable that computes each batch's input when asked, so only the
    layer's input, the attention output and the residual stream are held for all batches
    (the MLP's 4×-wide intermediate never is); a stage whose inputs are not consumed costs
    nothing."""
    norm1, attn, _, norm2, mlp, down = (layer.get_submodule(n) for n in prenorm)

    on_inputs("attn_in", (norm1(h) for h in hidden))
    o_proj = layer.get_submodule(prenorm[2])
    a = [
        _capture_input(o_proj, lambda h=h, kw=kw: attn(hidden_states=norm1(h), **kw))
        for h, kw in zip(hidden, kwargs)
    ]
    on_inputs("o_in", iter(a))
    o_proj = layer.get_submodule(prenorm[2])  # it may have been replaced by a quantized one
    h2 = [h + o_proj(ai) for h, ai in zip(hidden, a)]
    del a
    on_inputs("mlp_in", (norm2(t) for t in h2))
    mlp = layer.get_submodule(prenorm[4])
    down = layer.get_submodule(prenorm[5])
    on_inputs("down_in", (_capture_input(down, lambda t=t: mlp(norm2(t))) for t in h2))
    return [t + mlp(norm2(t)) for t in h2]
