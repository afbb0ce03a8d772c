"""AWQ's scale search with the GGUF type's own quantizer in the loop (``ggml`` ``search: awq``).

For each scale group (the linears reading one norm's output, up -> down), candidate input
channel scales s come from :func:`quantlab.quantizers.awq.awq_candidates` (identity first);
each is scored by the mean squared output error of the group's linears when W * s is
quantized by llama.cpp's quantizer of the target type (:func:`quantlab.formats.ggml_quants.
fake_quant`: importance-weighted search, float16 block scales included) with the importance
the scaled inputs x / s have (imatrix / s^2), and read back divided by s. The best s is folded
into the preceding norm (or linear), which leaves the float model's function unchanged, so the
file stays plain GGUF that stock llama.cpp runs. Why not awq.py's own search: its candidates
are scored on quantlab's min/max grid, not on the blocks llama.cpp will actually write.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from quantlab.formats.ggml_quants import fake_quant
from quantlab.quantizers.arch import arch_spec, decoder_layers
from quantlab.quantizers.awq import awq_candidates, fold_scales, gram, output_mse
from quantlab.quantizers.sequential import first_layer_inputs, input_hooks, layer_output


def ggml_search_scales(
    w: torch.Tensor,
    sigma: torch.Tensor,
    x_mean: torch.Tensor,
    qtype: str,
    importance: np.ndarray | None,
    n_grid: int,
    duo_scaling: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best input-channel scales for the linears stacked in W [out, in] (inputs' second moment
    ``sigma`` [in, in], mean |x| ``x_mean`` [in], llama.cpp importance [in] or None), scored
    with ``qtype``'s own quantizer. Returns (scales [in], losses [n_grid + 1]); losses[0] is
    no scaling and the scales returned are the argmin, so never worse than no scaling."""
    w = w.float()
    wn = w.abs().view(w.shape[0], -1, 32)
    # AWQ's mean |w| per column, each weight relative to its block's max (the block is 32)
    w_mean = (wn / wn.amax(dim=2, keepdim=True).clamp(min=1e-12)).view_as(w).mean(dim=0)
    losses, best, best_loss = [], None, float("inf")
    for s in awq_candidates(x_mean.float(), w_mean, n_grid, duo_scaling):
        s_np = s.numpy().astype(np.float32)
        imp = None if importance is None else importance / (s_np * s_np)
        wq = torch.from_numpy(fake_quant((w * s).numpy(), qtype, imp)) / s
        loss = output_mse(wq - w, sigma)
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = s, loss
    return best, torch.tensor(losses)


def _layer_statistics(layer, mine: dict, hidden, kwargs, pick: torch.Tensor):
    """One pass through ``layer``: per linear, the inputs' mean |x| (all tokens) and second
    moment (the ``pick`` subset of token positions); and the layer's float outputs."""
    abs_sum: dict[str, torch.Tensor] = {}
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in mine}
    offset, n_tok = [0], [0]

    def collect(name, x):
        x = x.reshape(-1, x.shape[-1]).float()
        abs_sum[name] = abs_sum.get(name, 0) + x.abs().sum(dim=0)
        lo = offset[0]
        sel = pick[(pick >= lo) & (pick < lo + x.shape[0])] - lo
        chunks[name].append(x[sel.to(x.device)])

    outs = []
    with input_hooks(mine, collect) as seen:
        for h, kw in zip(hidden, kwargs):
            seen.clear()
            outs.append(layer_output(layer(h, **kw)))
            offset[0] += h.shape[0] * h.shape[1]
    n_tok[0] = offset[0]
    sig: dict[str, torch.Tensor] = {}
    for n in mine:  # one second moment per distinct input (q/k/v share one, gate/up another)
        twin = next((m for m in sig if torch.equal(chunks[m][0], chunks[n][0])), None)
        sig[n] = sig[twin] if twin else gram(torch.cat(chunks[n]))
    return sig, {n: abs_sum[n] / n_tok[0] for n in mine}, outs


@torch.no_grad()
def awq_fold(
    model: nn.Module,
    calibration: torch.Tensor,
    qtype: str,
    imatrix,
    names: dict,
    config,
    stats: dict,
) -> None:
    """Search and fold every layer's scales in place (layer by layer, each calibrated on the
    previous float layer's outputs). ``imatrix`` (an :class:`quantlab.imatrix.Imatrix` or
    None) is updated to the scaled inputs (sums / s^2), so the file written beside the
    checkpoint is the importance of the model it holds; ``names``: {layer name: GGUF name};
    ``config``: the ggml config (n_grid, duo_scaling, search_tokens, seed); ``stats``
    receives each linear's identity and best loss."""
    spec = arch_spec(model)
    layers = decoder_layers(model, spec)
    hidden, kwargs = first_layer_inputs(model, layers, calibration, 4)
    n_tok = sum(h.shape[0] * h.shape[1] for h in hidden)
    gen = torch.Generator().manual_seed(config.seed)
    pick = torch.randperm(n_tok, generator=gen)[: config.search_tokens].sort().values
    for li, layer in enumerate(layers):
        prefix = f"{spec.layers}.{li}."
        mine = {
            n: m
            for n, m in layer.named_modules()
            if isinstance(m, nn.Linear) and prefix + n in names
        }
        sig, x_mean, hidden = _layer_statistics(layer, mine, hidden, kwargs, pick)
        for sg in spec.scale_groups:
            group = [n for n in sg.linears if n in mine]
            prev = layer.get_submodule(sg.prev)
            width = mine[group[0]].in_features if group else 0
            if len(group) != len(sg.linears) or (
                isinstance(prev, nn.Linear) and prev.out_features != width
            ):
                continue  # a partial group or v -> o under grouped-query attention
            gnames = [names[prefix + n] for n in group]
            imp = None if imatrix is None else imatrix.importance(gnames[0])
            w_cat = torch.cat([mine[n].weight.data for n in group])
            s, losses = ggml_search_scales(
                w_cat,
                sig[group[0]],
                x_mean[group[0]],
                qtype,
                imp,
                config.n_grid,
                config.duo_scaling,
            )
            fold_scales(prev, s)
            s2 = (s * s).numpy().astype(np.float32)
            for n, g in zip(group, gnames):
                mine[n].weight.data.mul_(s.view(1, -1).to(mine[n].weight.dtype))
                if imatrix is not None:
                    imatrix.sums[g] = (imatrix.sums[g] / s2).astype(np.float32)
                stats[prefix + n] = {
                    "search_loss_identity": float(losses[0]),
                    "search_loss_best": float(losses.min()),
                    "search_best_grid_index": int(losses.argmin()),
                }
