"""compressed-tensors ``pack-quantized`` (W4A16 and other 2-8 bit weight-only grids): the format
vLLM and llm-compressor load natively, written from the grid a quantlab model holds.

Per quantized linear ``NAME`` (compressed-tensors 0.17's names and layout):
  NAME.weight_packed      int32 [out, ceil(in * bits / 32)]  unsigned codes (the signed value
                          + 2**(bits-1)) packed LSB-first along the input dim, 32/bits a word
  NAME.weight_scale       [out, n_groups]  the grid's scales (float16 as quantlab stores them)
  NAME.weight_zero_point  int32 [ceil(out * bits / 32), n_groups]  asymmetric grids only: the
                          zero points, packed the same way along the output dim
  NAME.weight_shape       int64 [2]  (out, in)
and a ``quantization_config`` with ``quant_method: compressed-tensors``, ``format:
pack-quantized``, one config group (``strategy: group`` or ``channel``), ``lm_head`` ignored.

The codes are quantlab's as they are: a code c with zero point z encodes (c - z) * scale in
both formats, and compressed-tensors' signed value is c - 2**(bits-1) with zero point
z - 2**(bits-1), so unpacking gives back exactly the method's grid (:func:`read_grids`
checks it; tests compare with compressed-tensors' own unpacking). A grid whose groups follow
a permuted column order (GPTQ act_order without static groups) is refused, by name.

``int-quantized`` (W8A8 INT8, :func:`int8_quantization_config`) is written by the ``w8a8``
backend itself (its checkpoint is this format, plus quantlab's sidecar). Per linear ``NAME``:
  NAME.weight        int8 [out, in]  symmetric codes (no zero point)
  NAME.weight_scale  float32 [out, 1]  one scale per output channel: weight = code * scale
and one config group: weights ``{num_bits: 8, strategy: channel, symmetric: true}``, input
activations ``{num_bits: 8, strategy: token, dynamic: true, symmetric: true}`` (quantized
per token at run time; no scale stored), the float linears listed in ``ignore``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from quantlab.atomicdir import atomic_directory
from quantlab.errors import QuantlabError
from quantlab.formats import QuantizedWeight, unpack_layer
from quantlab.formats.base import tied_parameter_names

FORMAT = "pack-quantized"
INT_FORMAT = "int-quantized"
WEIGHTS = "model.safetensors"


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers [rows, cols] < 2**bits -> int32 [rows, ceil(cols * bits / 32)], LSB
    first along the last dim (compressed-tensors' ``pack_to_int32`` after its offset)."""
    per = 32 // bits
    rows, cols = values.shape
    pad = (-cols) % per
    v = torch.nn.functional.pad(values.to(torch.int64), (0, pad)).view(rows, -1, per)
    words = (v << (torch.arange(per) * bits)).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 [rows, n] -> unsigned integers [rows, cols]."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    v = (w.unsqueeze(2) >> (torch.arange(per) * bits)) & ((1 << bits) - 1)
    return v.reshape(words.shape[0], -1)[:, :cols]


def _check_grid(name: str, q: QuantizedWeight) -> int:
    """The grid's group size in compressed-tensors' terms (refusing what it cannot hold)."""
    out_f, in_f = q.codes.shape
    if q.zeros.is_floating_point() and not torch.equal(q.zeros, q.zeros.round()):
        raise QuantlabError(
            f"layer '{name}': its zero points are real numbers (HQQ's grid); "
            "compressed-tensors pack-quantized holds integer zero points only"
        )
    g = in_f if q.group_size == -1 else q.group_size
    if not torch.equal(q.g_idx.long().cpu(), torch.arange(in_f) // g):
        raise QuantlabError(
            f"layer '{name}': its groups follow a permuted column order (GPTQ "
            "act_order without static_groups); export it with static_groups: true"
        )
    return g


def _symmetric(grids: dict[str, QuantizedWeight]) -> bool:
    """Every zero point at the middle code: compressed-tensors' symmetric grid."""
    return all(bool((q.zeros == 2 ** (q.bits - 1)).all()) for q in grids.values())


def quantization_config(bits: int, group_size: int, in_features: int, sym: bool) -> dict:
    strategy = "channel" if group_size in (-1, in_features) else "group"
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": strategy,
        "group_size": None if strategy == "channel" else group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
    }


def layer_tensors(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One layer's compressed-tensors tensors (names without the layer's prefix)."""
    out_f, in_f = q.codes.shape
    tensors = {
        "weight_packed": pack_int32(q.codes, q.bits),
        "weight_scale": q.scales.t().contiguous(),  # [out, n_groups]
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not bool((q.zeros == 2 ** (q.bits - 1)).all()):
        zeros = q.zeros.round().to(torch.int64).t().contiguous()  # [out, n_groups]
        tensors["weight_zero_point"] = pack_int32(zeros.t(), q.bits).t().contiguous()
    return tensors


def grids_of(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every packed layer's grid, by module name."""
    return {n: q for n, m in model.named_modules() if (q := unpack_layer(m)) is not None}


def state_dict(model: nn.Module, grids: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The model's tensors with every packed layer in compressed-tensors' form; tied tensors
    once (as the source checkpoint stores them)."""
    tied = tied_parameter_names(model)
    out = {}
    for key, t in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if key in tied or (layer in grids and leaf != "bias"):
            continue  # a packed layer's own buffers: replaced below
        out[key] = t.detach().contiguous()
    for name, q in grids.items():
        _check_grid(name, q)
        out.update({f"{name}.{k}": v for k, v in layer_tensors(q).items()})
    return out


def export_compressed_tensors(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write quantlab's ``checkpoint`` (GPTQ v1 or AWQ gemm layout) as a compressed-tensors
    pack-quantized checkpoint in ``out_dir`` (config, tokenizer and generation files copied;
    quantlab's sidecar is not: the result is vLLM's format, not one quantlab reloads as its
    own). Written beside ``out_dir`` and renamed into place."""
    from safetensors.torch import save_file

    from quantlab.checkpoint import SIDECAR, load_checkpoint

    src, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists():
        raise QuantlabError(f"'{out_dir}' exists; compressed-tensors export writes a new directory")
    model = load_checkpoint(src, dtype=torch.float32, device=torch.device("cpu")).model
    grids = grids_of(model)
    if not grids:
        raise QuantlabError(
            f"'{src}' holds no packed layers (a float checkpoint?); nothing to "
            "write in compressed-tensors' pack-quantized format"
        )
    shapes = {(q.bits, q.group_size) for q in grids.values()}
    if len(shapes) != 1:
        raise QuantlabError(
            f"'{src}' mixes bit widths or group sizes {sorted(shapes)}; "
            "one compressed-tensors config group holds one grid"
        )
    ((bits, group),) = shapes
    in_features = next(iter(grids.values())).codes.shape[1]
    tensors = state_dict(model, grids)
    with atomic_directory(out_dir) as tmp:
        for f in src.iterdir():
            # the source's weights (one file or shards and their index) are not copied:
            # vLLM would load every *.safetensors beside the new model.safetensors
            weights = f.name.endswith((".safetensors", ".safetensors.index.json"))
            if f.is_file() and f.name != SIDECAR and not weights:
                shutil.copy2(f, tmp / f.name)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = quantization_config(
            bits, group, in_features, _symmetric(grids)
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return out_dir


def read_grids(ckpt_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The grids a pack-quantized checkpoint holds, unpacked: per layer ``codes`` [out, in]
    (unsigned), ``zeros`` [out, n_groups] and ``scales`` [out, n_groups]."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    qcfg = json.loads((ckpt_dir / "config.json").read_text())["quantization_config"]
    bits = qcfg["config_groups"]["group_0"]["weights"]["num_bits"]
    tensors = load_file(str(ckpt_dir / WEIGHTS))
    grids = {}
    for key, shape in tensors.items():
        if not key.endswith(".weight_shape"):
            continue
        name = key[: -len(".weight_shape")]
        out_f, in_f = (int(x) for x in shape)
        scales = tensors[f"{name}.weight_scale"]
        zp = tensors.get(f"{name}.weight_zero_point")
        zeros = (
            torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int64)
            if zp is None
            else unpack_int32(zp.t(), bits, out_f).t()
        )
        grids[name] = {
            "codes": unpack_int32(tensors[f"{name}.weight_packed"], bits, in_f),
            "zeros": zeros,
            "scales": scales,
        }
    return grids


def int8_quantization_config(ignore: list[str]) -> dict:
    """compressed-tensors' ``int-quantized`` W8A8 config: int8 weights per output channel,
    int8 activations per token, dynamic, both symmetric; ``ignore``: the linears kept float."""
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None}
    return {
        "quant_method": "compressed-tensors",
        "format": INT_FORMAT,
        "quantization_status": "compressed",
        "ignore": sorted(ignore),
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**int8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
                "output_activations": None,
                "format": INT_FORMAT,
            }
        },
    }
