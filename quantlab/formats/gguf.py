"""GGUF export of quantlab's quantized models, exact: the codes and scales a method chose are
written as llama.cpp blocks, not re-quantized from dequantized floats (llama.cpp's own
converter dequantizes GPTQ/AWQ checkpoints and quantizes again, a second, lossy rounding).

Grids GGUF can hold (blocks of 32 input columns, one float16 scale per block):

==========================  ========  =============================================
quantlab grid               GGUF      value of code q
==========================  ========  =============================================
4-bit symmetric (zero 8)    Q4_0      (q - 8) * d
4-bit with zero points      Q4_1      q * d + m,  m = float16(-zero * scale)
5-bit symmetric (zero 16)   Q5_0      (q - 16) * d
5-bit with zero points      Q5_1      q * d + m
8-bit symmetric (zero 128)  Q8_0      (q - 128) * d  (stored as a signed byte)
==========================  ========  =============================================

A group of 64 (or 128, or per channel) is 2 (4, in/32) blocks with the same scale. Act-order
is writable only with static groups: a permuted ``g_idx`` mixes groups inside a block. Q4_0,
Q5_0 and Q8_0 are exact; for Q4_1/Q5_1 the minimum ``m`` is rounded to float16, so a value
differs from quantlab's by at most half a float16 ulp of ``zero * scale``.

Everything that is not a quantized linear layer (embeddings, norms, an untied output head) is
written as ``float_type`` (2-D tensors; F32, F16 or Q8_0 as llama.cpp's presets do) or F32
(1-D norms). Metadata (hyper-parameters, tokenizer) comes from a template GGUF of the same
model: the source file for a GGUF source, else the one llama.cpp's converter writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantlab.errors import QuantlabError
from quantlab.formats.base import GridSpec, tied_parameter_names
from quantlab.formats.ggml_quants import quantize as ggml_quantize
from quantlab.grid import dequantize_matrix

BLOCK = 32
#: (bits, symmetric) -> GGUF type name
GRID_TYPES = {
    (4, True): "Q4_0",
    (4, False): "Q4_1",
    (5, True): "Q5_0",
    (5, False): "Q5_1",
    (8, True): "Q8_0",
}
FLOAT_TYPES = ("F32", "F16", "Q8_0")
#: architectures whose q/k projections llama.cpp's converter permutes (rotary layout)
_PERMUTE_QK = {"llama"}


def grid_problem(bits: int, sym: bool) -> str | None:
    """Why GGUF has no block type for a ``bits``-bit grid (None: it has one)."""
    if (bits, sym) in GRID_TYPES:
        return None
    fits = ", ".join(f"bits {b} with sym {str(s).lower()}" for b, s in GRID_TYPES)
    return (
        f"a {bits}-bit grid with sym {str(sym).lower()} has no GGUF block type; GGUF holds {fits}"
    )


def check_gguf_grid(label: str, grid: GridSpec) -> None:
    """Before any work: a method's grids (its backend's :meth:`grid`) can be written as GGUF
    blocks, or an error naming the option that would fit."""
    # several widths (bits: auto, module_bits): each tensor gets the type of its own width
    bad = sorted(b for b in grid.widths if grid_problem(b, grid.sym))
    sym = str(grid.sym).lower()
    if bad and len(grid.widths) > 1:
        fits = sorted(b for b, s in GRID_TYPES if s == grid.sym)
        raise QuantlabError(
            f"method '{label}': GGUF has no block type for "
            f"{'/'.join(map(str, bad))}-bit grids with sym {sym}; with several "
            f"widths, GGUF export takes bits_choices and module_bits from {fits}"
        )
    if bad:
        raise QuantlabError(f"method '{label}': {grid_problem(bad[0], grid.sym)}")
    if grid.group_size != -1 and grid.group_size % BLOCK:
        raise QuantlabError(
            f"method '{label}': group_size {grid.group_size} is not a multiple of "
            f"{BLOCK}; GGUF export needs group_size 32, 64, 128... or -1"
        )
    if grid.permuted_groups:
        raise QuantlabError(
            f"method '{label}': act_order needs static_groups: true for GGUF export"
        )


def quantized_parts(
    module: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(codes [out, in], scales [n_groups, out] float16, zeros [n_groups, out], g_idx [in], bits)
    of a layer in any registered layout (:data:`quantlab.formats.LAYOUTS`), or None for any
    other module."""
    from quantlab.formats import unpack_layer

    q = unpack_layer(module)
    return None if q is None else (q.codes, q.scales, q.zeros, q.g_idx, q.bits)


def grid_type(name: str, parts) -> str:
    """The GGUF type that holds a layer's grid exactly, or a clear error naming what would fit."""
    codes, scales, zeros, g_idx, bits = parts
    in_f = codes.shape[1]
    symmetric = bool((zeros == 2 ** (bits - 1)).all())
    qtype = GRID_TYPES.get((bits, symmetric))
    if qtype is None:
        fits = ", ".join(
            f"{b}-bit {'symmetric' if s else 'with zero points'}" for b, s in GRID_TYPES
        )
        raise QuantlabError(
            f"layer '{name}': a {bits}-bit {'symmetric' if symmetric else 'zero-point'} grid has "
            f"no GGUF block type; GGUF export holds: {fits}"
        )
    if in_f % BLOCK:
        raise QuantlabError(
            f"layer '{name}': input width {in_f} is not a multiple of {BLOCK}, the GGUF block size"
        )
    group = int((g_idx == g_idx[0]).sum()) if scales.shape[0] > 1 else in_f
    static = torch.equal(g_idx.cpu(), torch.arange(in_f) // group)
    if not static:
        raise QuantlabError(
            f"layer '{name}': its groups are permuted (act_order without static groups), which "
            "GGUF blocks cannot hold; act_order needs static_groups: true for GGUF export"
        )
    if group % BLOCK:
        raise QuantlabError(
            f"layer '{name}': group_size {group} is not a multiple of {BLOCK}; GGUF export needs "
            "group_size 32, 64, 128... (or -1, per channel)"
        )
    return qtype


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of codes [n_blocks, 32] packed two per byte as ggml does: byte j holds
    element j (low nibble) and element j + 16 (high nibble)."""
    lo = q & 0x0F
    return (lo[:, :16] | (lo[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of codes [n_blocks, 32] as 4 bytes, element j at bit j (little-endian uint32)."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def pack_blocks(parts, qtype: str) -> np.ndarray:
    """The raw GGUF blocks of a quantized layer: uint8 [out, in / 32 * block_bytes]."""
    codes, scales, zeros, g_idx, bits = parts
    out_f, in_f = codes.shape
    nb = in_f // BLOCK
    block_group = g_idx[::BLOCK].long()  # static groups: one group per block
    d = scales.float().t()[:, block_group].to(torch.float16)  # [out, nb]
    q = codes.reshape(out_f * nb, BLOCK).cpu().numpy().astype(np.int64)
    d_bytes = d.reshape(-1).cpu().numpy().view(np.uint8).reshape(-1, 2)
    if qtype == "Q8_0":
        body = [(q - 128).astype(np.int8).view(np.uint8)]
    elif qtype == "Q4_0":
        body = [_nibbles(q)]
    elif qtype == "Q5_0":
        body = [_high_bits(q), _nibbles(q)]
    else:  # Q4_1, Q5_1: q * d + m with m = -zero * scale
        z = zeros.t()[:, block_group].float()
        m = (-z * scales.float().t()[:, block_group]).to(torch.float16)
        m_bytes = m.reshape(-1).cpu().numpy().view(np.uint8).reshape(-1, 2)
        body = [m_bytes] + ([_nibbles(q)] if qtype == "Q4_1" else [_high_bits(q), _nibbles(q)])
    return np.concatenate([d_bytes, *body], axis=1).reshape(out_f, -1)


def _qk_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q/k projections (the GGUF rotary layout): within
    each head, rows of the first and second halves interleaved."""
    half = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, 2, half).transpose(1, 2).reshape(-1)


def _permute_rows(parts, perm: torch.Tensor):
    codes, scales, zeros, g_idx, bits = parts
    return codes[perm], scales[:, perm], zeros[:, perm], g_idx, bits


def _float_tensor(t: torch.Tensor, ftype: str):
    """(array, raw_dtype) of a float tensor in GGUF: 1-D tensors stay F32 (norms), 2-D ones
    take ``ftype``."""
    from gguf import GGMLQuantizationType, quants

    a = t.detach().float().cpu().numpy()
    if a.ndim == 1 or ftype == "F32":
        return a.astype(np.float32), None
    if ftype == "F16":
        return a.astype(np.float16), None
    return quants.quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def gguf_type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type a file holds."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def gguf_tensor_bytes(path: Path, model: nn.Module) -> dict[str, int]:
    """Bytes of every tensor of a GGUF file, keyed by ``model``'s own parameter names."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n_blocks = int(
        reader.fields[f"{reader.fields['general.architecture'].contents()}.block_count"].contents()
    )
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    ours = {}
    for hf_name, _ in model.named_parameters(remove_duplicate=False):
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            ours.setdefault(gname, hf_name)
    return {ours[t.name]: int(t.n_bytes) for t in reader.tensors if t.name in ours}


def _copy_metadata(reader, writer, skip: set[str]) -> None:
    """Every key-value pair of the template (but the writer's own and ``skip``)."""
    from gguf import GGUFValueType

    for field in reader.fields.values():
        if (
            field.name.startswith("GGUF.")
            or field.name in skip
            or field.name == "general.architecture"
        ):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(field.name, field.contents(), vtype, sub)


@dataclass(frozen=True)
class _Layout:
    """What a template GGUF says about the model: architecture, heads, tensor names."""

    arch: str
    n_head: int
    n_head_kv: int
    names: Any  # gguf.TensorNameMap
    wanted: frozenset[str]

    @classmethod
    def read(cls, reader) -> _Layout:
        import gguf

        f = reader.fields
        arch = str(f["general.architecture"].contents())
        if arch not in _PERMUTE_QK:
            raise QuantlabError(
                f"GGUF export knows the 'llama' architecture; this model is '{arch}'"
            )
        n_head = int(f[f"{arch}.attention.head_count"].contents())
        kv = f.get(f"{arch}.attention.head_count_kv")
        names = gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.LLAMA, int(f[f"{arch}.block_count"].contents())
        )
        return cls(
            arch,
            n_head,
            int(kv.contents()) if kv is not None else n_head,
            names,
            frozenset(t.name for t in reader.tensors),
        )

    def heads(self, hf_name: str) -> int | None:
        """Heads whose rotary row order a q/k projection takes in GGUF (None: not q/k)."""
        if hf_name.endswith(("q_proj", "q_proj.weight")):
            return self.n_head
        if hf_name.endswith(("k_proj", "k_proj.weight")):
            return self.n_head_kv
        return None


def _quantized_tensors(
    model: nn.Module, layout: _Layout, dequantized: bool
) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, raw type) of every packed layer: its blocks, or F32 of its dequantized
    weight."""
    import gguf

    out = []
    for hf_name, mod in model.named_modules():
        parts = quantized_parts(mod)
        if parts is None:
            continue
        gname = layout.names.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
        if gname is None or gname not in layout.wanted:
            raise QuantlabError(f"layer '{hf_name}' has no tensor in the GGUF template")
        if getattr(mod, "bias", None) is not None:
            raise QuantlabError(
                f"layer '{hf_name}' has a bias, which the llama GGUF layout has no tensor for"
            )
        qtype = grid_type(hf_name, parts)
        heads = layout.heads(hf_name)
        if heads:
            parts = _permute_rows(parts, _qk_permutation(parts[0].shape[0], heads))
        if dequantized:
            codes, scales, zeros, g_idx, _ = parts
            out.append(
                (
                    gname,
                    dequantize_matrix(codes, scales, zeros, g_idx).numpy().astype(np.float32),
                    None,
                )
            )
        else:
            out.append(
                (gname, pack_blocks(parts, qtype), getattr(gguf.GGMLQuantizationType, qtype))
            )
    return out


def _float_tensors(
    model: nn.Module, layout: _Layout, float_type: str
) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, raw type) of every float tensor with a GGUF name (tied copies once)."""
    tied = tied_parameter_names(model)
    modules = dict(model.named_modules())
    out = []
    for hf_name, t in model.state_dict().items():
        owner = hf_name.rsplit(".", 1)[0]
        if (
            hf_name in tied
            or quantized_parts(modules.get(owner)) is not None
            or not t.is_floating_point()
        ):
            continue
        gname = layout.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            continue  # buffers llama.cpp computes itself (rotary frequencies)
        heads = layout.heads(hf_name)
        if heads:
            t = t[_qk_permutation(t.shape[0], heads)]
        out.append((gname, *_float_tensor(t, float_type)))
    return out


def export_ggml(
    model: nn.Module,
    path: Path,
    template: Path,
    qtype: str | Mapping[str, str],
    *,
    embedding_type: str = "Q8_0",
    importance: dict[str, np.ndarray] | None = None,
) -> dict[str, str]:
    """Write ``model``'s float weights as a GGUF file quantized by llama.cpp's own quantizers
    (:mod:`quantlab.formats.ggml_quants`, byte for byte what ``llama-quantize --pure`` writes).
    ``qtype``: one type for every 2-D tensor of the blocks, the token embedding and an untied
    output head as ``embedding_type`` (one of ggml_quants' types, or F16/F32); or a type per
    tensor, {GGUF name: type} (2-D tensors it does not name: F32; the file type in the
    metadata is the one that holds the most weights). ``importance[GGUF name]`` (float32
    [columns]) applies to the blocks' tensors only, as llama.cpp's imatrix has no entry for
    the embedding or head; norms are F32. Metadata from ``template``. Returns {tensor name:
    GGUF type}."""
    import gguf

    reader = gguf.GGUFReader(str(template))
    layout = _Layout.read(reader)
    tensors, weights = [], {}
    for gname, t in ggml_source_tensors(model, layout).items():
        ttype = _tensor_type(gname, t, qtype, embedding_type)
        weights[ttype] = weights.get(ttype, 0) + t.numel()
        if ttype in ("F32", "F16"):
            tensors.append((gname, *_float_tensor(t, ttype)))
            continue
        imp = (importance or {}).get(gname) if gname.startswith("blk.") else None
        data = ggml_quantize(t.detach().float().cpu().numpy(), ttype, imp)
        tensors.append((gname, data, getattr(gguf.GGMLQuantizationType, ttype)))
    if isinstance(qtype, str):
        main = qtype
    else:
        main = max((t for t in weights if t != "F32"), key=weights.get, default=None)
    return _write_file(path, reader, layout, tensors, file_type=main)


def _tensor_type(
    gname: str, t: torch.Tensor, qtype: str | Mapping[str, str], embedding_type: str
) -> str:
    if t.dim() == 1:
        return "F32"
    if isinstance(qtype, str):
        return qtype if gname.startswith("blk.") else embedding_type
    return qtype.get(gname, "F32")


def gguf_weight_names(modules: list[str], template: Path) -> dict[str, str | None]:
    """{module name: the GGUF name of its weight in ``template``'s layout, or None}."""
    import gguf

    layout = _Layout.read(gguf.GGUFReader(str(template)))
    return {m: layout.names.get_name(f"{m}.weight", try_suffixes=(".weight",)) for m in modules}


def ggml_source_tensors(model: nn.Module, layout: _Layout | Path) -> dict[str, torch.Tensor]:
    """{GGUF name: float tensor in GGUF row order} of every tensor of ``model`` the llama GGUF
    layout holds (tied copies once; q/k rows in the rotary order; ``layout``: a template file
    or its :class:`_Layout`)."""
    if isinstance(layout, (str, Path)):
        import gguf

        layout = _Layout.read(gguf.GGUFReader(str(layout)))
    tied = tied_parameter_names(model)
    out = {}
    for hf_name, t in model.state_dict().items():
        if hf_name in tied or not t.is_floating_point():
            continue
        gname = layout.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            continue  # buffers llama.cpp computes itself (rotary frequencies)
        heads = layout.heads(hf_name)
        out[gname] = t[_qk_permutation(t.shape[0], heads)] if heads else t
    return out


def _type_name(data: np.ndarray, raw) -> str:
    return raw.name if raw is not None else ("F32" if data.dtype == np.float32 else "F16")


def export_gguf(
    model: nn.Module,
    path: Path,
    template: Path,
    *,
    float_type: str = "F32",
    dequantized: bool = False,
) -> dict[str, str]:
    """Write ``model`` (float parts and quantlab's packed layers) as a GGUF file at ``path``,
    metadata from ``template``. ``dequantized``: write every quantized layer as F32 of its
    dequantized weight (the engine cross-check's file). Returns {tensor name: GGUF type}."""
    import gguf

    if float_type not in FLOAT_TYPES:
        raise QuantlabError(
            f"GGUF float_type must be one of {', '.join(FLOAT_TYPES)}, not {float_type!r}"
        )
    reader = gguf.GGUFReader(str(template))
    layout = _Layout.read(reader)
    tensors = _quantized_tensors(model, layout, dequantized) + _float_tensors(
        model, layout, float_type
    )
    return _write_file(path, reader, layout, tensors)


def _write_file(
    path: Path,
    reader,
    layout: _Layout,
    tensors: list[tuple[str, np.ndarray, Any]],
    file_type: str | None = None,
) -> dict[str, str]:
    """Write ``tensors`` (GGUF name, data, raw type) in the template's order, with its
    metadata; every tensor the template has must be there. ``file_type``: the type named in
    ``general.file_type`` (llama.cpp's "ftype", shown by its tools), e.g. Q4_0; None: none.
    Returns {tensor name: GGUF type}."""
    import gguf

    types = {name: _type_name(data, raw) for name, data, raw in tensors}
    missing = layout.wanted - set(types)
    if missing:
        raise QuantlabError(f"the model has no tensor for GGUF {', '.join(sorted(missing)[:5])}")
    writer = gguf.GGUFWriter(str(path), layout.arch)
    _copy_metadata(reader, writer, skip={"general.file_type", "general.quantization_version"})
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if file_type is not None:
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}"))
    order = {t.name: i for i, t in enumerate(reader.tensors)}
    for name, data, raw in sorted(tensors, key=lambda x: order[x[0]]):
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


#: the converter's output inside a template's cache entry
TEMPLATE_FILE = "template.gguf"


def template_for(source_info: dict, model_dir: Path | None, tools=None) -> Path:
    """A GGUF file of the source model to take metadata (hyper-parameters, tokenizer) and
    tensor names from: the source file itself for a GGUF source (the demo model's too), else
    the file llama.cpp's converter writes from the model directory: a cache entry keyed by the
    model's content (quantlab.cache: verified when read back, written under a lock, whole or
    not at all, so a foreign or half-written file there is rebuilt, never exported from)."""
    from quantlab.cache import cache_subdir, cached
    from quantlab.models import DEMO_MODELS, _demo_gguf

    alias = source_info.get("alias")
    if alias in DEMO_MODELS:
        return _demo_gguf(alias)
    if source_info.get("gguf") and Path(source_info["gguf"]).is_file():
        return Path(source_info["gguf"])
    if model_dir is None:
        raise QuantlabError("GGUF export needs the source model's directory or GGUF file")
    digest = source_info.get("content_sha256") or source_info.get("commit")
    if not digest:
        raise QuantlabError(
            "GGUF export needs a source model identified by content (a local directory, GGUF "
            "file or Hub commit)"
        )

    def build(tmp: Path) -> dict:
        _convert(model_dir, tmp / TEMPLATE_FILE, tools)
        return {"model": digest, "source": str(model_dir)}

    # a key that is a file name whatever the digest's form; the digest itself is checked in the meta
    key = hashlib.sha256(str(digest).encode()).hexdigest()[:32]
    entry, _, _ = cached(
        cache_subdir("gguf-templates"), key, build, what="GGUF template", expect={"model": digest}
    )
    return entry / TEMPLATE_FILE


def _convert(model_dir: Path, out: Path, tools=None) -> None:
    """llama.cpp's convert_hf_to_gguf.py of ``model_dir`` (float16) into ``out``."""
    import sys

    from quantlab.engines.llamacpp import REWRITE_S_PER_GB, TOOL_BASE_S
    from quantlab.procs import run_tool

    if tools is None or tools.converter is None:
        from quantlab.engines.llamacpp import find_llamacpp

        tools = find_llamacpp()
    if tools.converter is None:
        raise QuantlabError(
            f"llama.cpp's converter (convert_hf_to_gguf.py) is not next to '{tools.bin_dir}'; "
            "rebuild with `bash scripts/llamacpp.sh`"
        )
    size = sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.is_file())
    run_tool(
        [sys.executable, tools.converter, model_dir, "--outtype", "f16", "--outfile", out],
        what=f"llama.cpp's converter of '{model_dir}' (for GGUF metadata)",
        outputs=[out],
        timeout_s=TOOL_BASE_S + REWRITE_S_PER_GB * size / 1e9,
    )
