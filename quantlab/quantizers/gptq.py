"""``gptq``: GPTQ (Frantar et al., 2022), quantlab's own implementation in pure PyTorch.

Per linear layer, with H = 2/n * sum(x x^T) over the calibration inputs x of that layer,
the columns of W are quantized one at a time and each column's rounding error is spread
over the not-yet-quantized columns through the inverse Hessian (its upper Cholesky factor),
in lazy blocks. Options: dampening (a fraction of mean(diag H) added to the diagonal),
act-order (columns in order of decreasing diag H; the checkpoint's g_idx then maps columns
to groups), static groups (group grids fixed from the unquantized weights before any update),
and true-sequential (within a layer, q/k/v first, then o, then gate/up, then down, each
group's Hessian computed with the earlier groups already quantized).

The checkpoint is the standard GPTQ v1 layout (see :mod:`quantlab.formats.gptq_v1`).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import MissingDependencyError, QuantlabError
from quantlab.formats import GridSpec, QuantizedWeight, drop_dense_weights
from quantlab.formats.gptq_v1 import GPTQ_BITS, PackedLinear
from quantlab.grid import group_params, quantize_codes
from quantlab.quantizers.arch import arch_spec, decoder_layers
from quantlab.quantizers.base import (
    QuantizeContext,
    Quantized,
    check_not_tied,
    set_module,
    target_linears,
)
from quantlab.quantizers.sequential import (
    feed,
    first_layer_inputs,
    input_hooks,
    run_layer,
    staged_prenorm_layer,
)
from quantlab.quantizers.weightonly import (
    LayoutBackend,
    WeightQuantConfig,
    check_allocation,
    check_layers,
)

# --------------------------------------------------------------------------- algorithm core


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    *,
    damp_percent: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
):
    """GPTQ of one weight matrix W [out, in] given the Hessian H [in, in] of its inputs.

    Returns (codes int64 [out, in], scales float32 [n_groups, out], zeros int64
    [n_groups, out], g_idx int64 [in]) in the original column order, ready for packing."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    n_groups = in_f // g
    w = w.detach().float().clone()
    h = h.detach().float().clone()

    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0

    static = None
    if static_groups or group_size == -1:
        # grid of each group fixed from the unquantized weights, in original column order
        static = [group_params(w[:, j * g : (j + 1) * g], bits, sym) for j in range(n_groups)]

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    w = w[:, perm]
    h = h[perm][:, perm]

    damp = damp_percent * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise QuantlabError(
            f"GPTQ: the Hessian is not positive definite even with damp_percent={damp_percent}; "
            "raise damp_percent (e.g. 0.1) or use more calibration samples"
        ) from None

    codes = torch.zeros(out_f, in_f, dtype=torch.int64)
    scales = torch.zeros(n_groups, out_f)
    zeros = torch.zeros(n_groups, out_f, dtype=torch.int64)
    g_idx = torch.zeros(in_f, dtype=torch.int64)
    # blocks hold whole groups, so a group's grid is computed from up-to-date weights
    block = max(g, (block_size // g) * g) if group_size != -1 else block_size
    scale = zero = None
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i  # position in the (possibly permuted) order
            orig = int(perm[col])
            if static is not None:
                j = orig // g
                scale, zero = static[j]
            elif col % g == 0:
                j = col // g  # groups formed in processing order (act-order: by importance)
                scale, zero = group_params(w1[:, i : i + g], bits, sym)
                scales[j], zeros[j] = scale, zero
            g_idx[orig] = j
            x = w1[:, i]
            q = quantize_codes(x.unsqueeze(1), scale, zero, bits).squeeze(1)
            codes[:, orig] = q
            deq = (q - zero).float() * scale
            e = (x - deq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if static is not None:
        for j, (s, z) in enumerate(static):
            scales[j], zeros[j] = s, z
    return codes, scales, zeros, g_idx


# --------------------------------------------------------------------------- backend


def _placeholder_tokenizer():
    """gptqmodel loads a tokenizer from the model directory even when the calibration comes
    as token ids (as quantlab passes it), so the directory gets this one: never used to encode."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


class GPTQConfig(WeightQuantConfig):
    version = 1
    bits: int | Literal["auto"] = Field(
        4,
        description="Bits per weight: 2, 3, 4 or 8 (the GPTQ format's "
        "widths), or 'auto' (a width per layer under bits_budget).",
    )
    act_order: bool = Field(
        False,
        description="Quantize columns in order of decreasing Hessian "
        "diagonal (desc_act); the checkpoint's g_idx then maps columns to groups.",
    )
    static_groups: bool = Field(
        False, description="Fix every group's grid from the unquantized weights first."
    )
    damp_percent: float = Field(
        0.01, gt=0, le=1, description="Dampening: this fraction of mean(diag H) is added to diag H."
    )
    true_sequential: bool = Field(
        True,
        description="Within a layer, quantize q/k/v, o, gate/up, down in "
        "turn, each with inputs from the already-quantized part.",
    )
    block_size: int = Field(128, ge=1, description="Columns per lazy-update block.")
    batch_size: int = Field(8, ge=1, description="Calibration windows per forward pass.")
    engine: Literal["quantlab", "gptqmodel"] = Field(
        "quantlab",
        description="Who runs GPTQ: 'quantlab' (this module) or 'gptqmodel', the same "
        "options through the gptqmodel library as a cross-check (the [gptq] extra; its layers are "
        "re-exported in the same GPTQ v1 layout; block_size is quantlab's alone).",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v != "auto" and v not in GPTQ_BITS:
            raise ValueError(
                f"GPTQ bits must be one of {', '.join(map(str, GPTQ_BITS))} or 'auto' (got {v})"
            )
        return v

    @model_validator(mode="after")
    def _widths(self) -> GPTQConfig:
        odd = [b for b in self.widths() if b not in GPTQ_BITS]
        if odd:
            raise ValueError(
                f"GPTQ packs {', '.join(map(str, GPTQ_BITS))} bits; bits_choices/module_bits ask "
                f"for {', '.join(map(str, odd))}"
            )
        if self.engine == "gptqmodel" and (self.bits == "auto" or self.module_bits):
            raise ValueError("several widths (bits: auto, module_bits) run with engine: quantlab")
        return self


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same memory read the same way (two linears fed one input)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class GPTQ(LayoutBackend):
    name = "gptq"
    description = (
        "GPTQ (Frantar et al. 2022), quantlab's PyTorch implementation; GPTQ v1 checkpoints."
    )
    Config = GPTQConfig
    needs_calibration = True
    extra = "gptq"

    def grid(self) -> GridSpec:
        c = self.config
        # act_order quantizes columns out of order: without static groups a layer's groups
        # follow that order (g_idx), which block formats cannot hold
        return replace(super().grid(), permuted_groups=c.act_order and not c.static_groups)

    def check_dependencies(self) -> None:
        if self.config.engine == "gptqmodel":
            import importlib.util

            if importlib.util.find_spec("gptqmodel") is None:
                raise MissingDependencyError("gptqmodel", "gptq", "gptq with engine: gptqmodel")

    def check(self, model: nn.Module) -> None:
        targets = target_linears(model, self.config.skip_list())
        check_not_tied(model, targets)
        for bits in self.config.widths():
            check_layers(targets, bits, self.config.group_size, self.layout())
        check_allocation(self.config, model, targets)
        decoder_layers(model, arch_spec(model))

    @torch.no_grad()
    def _quantize(
        self,
        model: nn.Module,
        calibration: torch.Tensor | None,
        out: Quantized,
        context: QuantizeContext,
    ) -> nn.Module:
        if calibration is None:
            raise QuantlabError("gptq needs calibration data")
        if self.config.engine == "gptqmodel":
            return self._quantize_gptqmodel(model, calibration, out)
        c = self.config
        spec = arch_spec(model)
        layers = decoder_layers(model, spec)
        targets = dict(target_linears(model, c.skip_list()))
        with out.stage("capture inputs"):
            hidden, kwargs = first_layer_inputs(model, layers, calibration, c.batch_size)
        stages = dict(zip(("attn_in", "o_in", "mlp_in", "down_in"), spec.sequential))
        for li, layer in enumerate(
            tqdm(layers, desc="gptq: layers", unit="layer", leave=False, disable=None)
        ):
            prefix = f"{spec.layers}.{li}."
            # taken out of `targets`, so each float layer is freed once its quantized copy is in
            mine = {
                n[len(prefix) :]: targets.pop(n)
                for n in [n for n in targets if n.startswith(prefix)]
            }
            staged = (
                c.true_sequential
                and spec.prenorm is not None
                and set(mine) <= {n for g in spec.sequential for n in g}
            )
            if staged:
                # each stage of the layer runs once; a group is quantized before the next stage
                def on_inputs(stage, xs, layer=layer, mine=mine, prefix=prefix):
                    names = [n for n in stages[stage] if n in mine]
                    if names:
                        h, count = None, 0
                        for x in xs:  # one batch at a time: the stage's inputs are never all held
                            x = x.reshape(-1, x.shape[-1]).float()
                            if h is None:
                                h = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
                            with out.stage("hessian"):
                                h.addmm_(x.t(), x)
                            count += x.shape[0]
                        self._quantize_group(layer, mine, names, h * (2 / count), prefix, out)

                hidden = staged_prenorm_layer(layer, spec.prenorm, hidden, kwargs, on_inputs)
                drop_dense_weights(layer)
                continue
            groups = (
                [tuple(n for n in grp if n in mine) for grp in spec.sequential]
                if c.true_sequential
                else []
            )
            groups = [grp for grp in groups if grp]
            covered = {n for grp in groups for n in grp}
            if set(mine) - covered:  # generic architecture or true_sequential off: one group
                groups = (
                    [tuple(n for n in mine if n not in covered)] + groups
                    if covered
                    else [tuple(mine)]
                )
            for grp in groups:
                hess: dict[str, torch.Tensor] = {}
                count = {n: 0 for n in grp}
                shares: dict[str, str] = {}  # q/k/v (and gate/up) read one tensor: one Hessian
                # [input, name] of the last hook: the input itself is held, so a freed input's
                # address cannot come back as another's (o_proj's freed input reused by the
                # MLP's once gave gate/up o_proj's Hessian)
                last: list = []

                def accumulate(name, x, hess=hess, count=count, shares=shares, last=last):
                    if last and same_tensor(last[0], x) and last[1] != name:
                        shares[name] = last[1]
                        return
                    last[:] = [x, name]
                    x = x.reshape(-1, x.shape[-1]).float()
                    if name not in hess:
                        hess[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                    with out.stage("hessian"):
                        hess[name].addmm_(x.t(), x)
                    count[name] += x.shape[0]

                with input_hooks({n: mine[n] for n in grp}, accumulate, stop_after=grp) as seen:
                    feed(layer, hidden, kwargs, seen)
                for n in grp:
                    src = shares.get(n, n)
                    self._quantize_group(
                        layer, mine, [n], hess[src] * (2 / max(count[src], 1)), prefix, out
                    )
                del hess
            hidden = run_layer(layer, hidden, kwargs)
            drop_dense_weights(layer)
        return model

    def _quantize_group(
        self,
        layer: nn.Module,
        mine: dict[str, nn.Module],
        names: list[str],
        h: torch.Tensor,
        prefix: str,
        out: Quantized,
    ) -> None:
        """GPTQ the named linears of ``layer``, which share the Hessian ``h``; swap them in.

        GPTQ treats the rows of W independently given H, so linears that read the same input
        (q/k/v, gate/up) are solved as one stacked matrix: one factorization, one column loop."""
        c = self.config
        lins = [mine[n] for n in names]
        bits = c.bits_for(
            prefix + names[0]
        )  # one solve, one width (allocation gives fused layers one)
        with out.stage("gptq solve"):
            codes, scales, zeros, g_idx = gptq_quantize(
                torch.cat([lin.weight.data for lin in lins]),
                h,
                bits,
                c.group_size,
                c.sym,
                damp_percent=c.damp_percent,
                act_order=c.act_order,
                static_groups=c.static_groups,
                block_size=c.block_size,
            )
        r0 = 0
        for n, lin in zip(names, lins):
            r1 = r0 + lin.out_features
            q = self.pack(
                QuantizedWeight(
                    codes[r0:r1].to(lin.weight.device),
                    scales[:, r0:r1],
                    zeros[:, r0:r1],
                    g_idx,
                    bits,
                    c.group_size,
                ),
                lin.bias,
                lin.weight.dtype,
            )
            r0 = r1
            w = lin.weight.data.float()
            dw = q.weight.float() - w
            # output error on the calibration inputs: trace(dW H dW^T) / trace(W H W^T)
            rel = float(((dw @ h) * dw).sum() / ((w @ h) * w).sum().clamp(min=1e-20))
            out.layer_stats[prefix + n] = {
                "weight_rel_error": float(dw.norm() / w.norm().clamp(min=1e-12)),
                "output_rel_error": rel,
            }
            set_module(layer, n, q)

    def _quantize_gptqmodel(
        self, model: nn.Module, calibration: torch.Tensor, out: Quantized
    ) -> nn.Module:
        """The same GPTQ through gptqmodel: the float model is saved to a temporary directory,
        quantized there by gptqmodel with this config's options (its extras that quantlab's
        GPTQ does not have, act-group-aware ordering, MSE grids and the RTN fallback, off),
        and its packed tensors (GPTQ v1) are put into this model's layers as PackedLinear."""
        from gptqmodel import GPTQModel, QuantizeConfig
        from safetensors import safe_open

        c = self.config
        targets = dict(target_linears(model, c.skip_list()))
        qc = QuantizeConfig(
            bits=c.bits,
            group_size=c.group_size,
            sym=c.sym,
            desc_act=c.act_order,
            act_group_aware=False,
            static_groups=c.static_groups,
            damp_percent=c.damp_percent,
            true_sequential=c.true_sequential,
            mse=0.0,
            fallback=None,
        )
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calibration.cpu()]
        with tempfile.TemporaryDirectory(prefix="quantlab-gptqmodel-") as tmp:
            src, dst = Path(tmp) / "float", Path(tmp) / "quantized"
            with out.stage("gptqmodel: save float model"):
                model.save_pretrained(src, safe_serialization=True)
                _placeholder_tokenizer().save_pretrained(src)
            with out.stage("gptqmodel: quantize"):
                gm = GPTQModel.load(str(src), qc, device=str(next(model.parameters()).device))
                gm.quantize(rows, batch_size=c.batch_size)
                gm.save(str(dst))
                del gm
            tensors: dict[str, torch.Tensor] = {}
            for f in sorted(dst.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                            tensors[k] = sf.get_tensor(k)
        for name, lin in targets.items():
            if f"{name}.qweight" not in tensors:
                raise QuantlabError(
                    f"gptqmodel left layer '{name}' unquantized; its checkpoint has "
                    "no qweight for it"
                )
            q = PackedLinear(
                lin.in_features,
                lin.out_features,
                c.bits,
                c.group_size,
                lin.bias is not None,
                lin.weight.dtype,
                device=lin.weight.device,
            )
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                getattr(q, k).copy_(tensors[f"{name}.{k}"])
            if lin.bias is not None:
                q.bias.data.copy_(lin.bias.data)
            q.weight = None  # packed only, as the quantlab engine leaves its layers
            w = lin.weight.data.float()
            out.layer_stats[name] = {
                "weight_rel_error": float((q.dequantize() - w).norm() / w.norm().clamp(min=1e-12))
            }
            set_module(model, name, q)
        return model

    def quantization_extra(self, model: nn.Module) -> dict:
        return {"desc_act": self.config.act_order}
