"""The format registry: every layout gives back exactly the grid a method packed into it; the
same grid stored in different layouts writes the same GGUF bytes (formats are independent of
methods); checkpoints record their layout and a layout this quantlab does not read is a clear
error."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from quantlab.checkpoint import SIDECAR, export_checkpoint, load_checkpoint, sidecar_digest
from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, QuantizedWeight, get_layout, layout_of, unpack_layer
from quantlab.formats.gguf import export_gguf
from quantlab.grid import quantize_matrix
from quantlab.quantizers.rtn import RTN
from quantlab.quantizers.weightonly import WeightQuantConfig

CPU = torch.device("cpu")


def _grid(
    out_f: int, in_f: int, bits: int, group_size: int, sym: bool, seed: int = 0
) -> QuantizedWeight:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    codes, scales, zeros = quantize_matrix(w, bits, group_size, sym)
    g = in_f if group_size == -1 else group_size
    return QuantizedWeight(codes, scales, zeros, torch.arange(in_f) // g, bits, group_size)


CASES = [("gptq-v1", b, g, s) for b in (2, 3, 4, 5, 6, 7, 8) for g, s in ((32, True), (64, False))]
CASES += [("awq-gemm", 4, 32, False), ("awq-gemm", 4, -1, True)]


@pytest.mark.parametrize(
    ("layout", "bits", "group", "sym"),
    CASES,
    ids=[f"{c[0]}-w{c[1]}-g{c[2]}-{'sym' if c[3] else 'asym'}" for c in CASES],
)
def test_a_layout_gives_back_the_grid_it_was_given(layout, bits, group, sym):
    fmt = LAYOUTS[layout]
    q = _grid(64, 128, bits, group, sym)
    bias = torch.randn(64)
    module = fmt.pack(q, bias, torch.float32)
    assert layout_of(module) is fmt and isinstance(module, fmt.module_type)
    back = unpack_layer(module)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.g_idx.long(), q.g_idx) and torch.equal(
        back.scales.float(), q.scales.float()
    )
    assert (back.bits, back.group_size) == (bits, group)
    # what the layer computes is what the grid encodes, before and after a state-dict round trip
    assert torch.equal(module.weight, q.dequantize())
    fresh = fmt.empty(
        torch.nn.Linear(128, 64), fmt.quantization_config(bits, group, sym), torch.float32
    )
    fresh.load_state_dict(module.state_dict())
    fresh.refresh()
    assert torch.equal(fresh.weight, q.dequantize()) and torch.equal(fresh.bias, bias)


def test_the_awq_layout_refuses_permuted_groups():
    q = _grid(16, 64, 4, 32, False)
    permuted = QuantizedWeight(q.codes, q.scales, q.zeros, q.g_idx.flip(0), 4, 32)
    with pytest.raises(QuantlabError, match="static groups only"):
        LAYOUTS["awq-gemm"].pack(permuted, None, torch.float32)


def test_layout_limits_are_stated_by_the_layout():
    assert (
        LAYOUTS["awq-gemm"]
        .check(3, False)
        .startswith("the AWQ gemm format stores 4-bit weights only")
    )
    assert LAYOUTS["gptq-v1"].check(3, True) is None
    assert "multiple of 8" in LAYOUTS["awq-gemm"].check_layer("x", 64, 12, 4)
    assert "whole 32-bit words" in LAYOUTS["gptq-v1"].check_layer("x", 64, 12, 3)
    with pytest.raises(
        QuantlabError, match="unknown checkpoint layout 'exl2'; quantlab reads awq-gemm, gptq-v1"
    ):
        get_layout("exl2")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_grid_in_either_layout_writes_the_same_gguf(tiny_model_dir, tiny_gguf, tmp_path):
    """GGUF export reads the grid through the registry: the layout a method stored its layers
    in does not change a byte of the file."""
    from quantlab.models import load_model
    from quantlab.quantizers.base import set_module

    gptq = (
        RTN(WeightQuantConfig(bits=4, group_size=32, sym=True))
        .quantize(load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU).model, None)
        .model
    )
    awq = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU).model
    for name, m in gptq.named_modules():
        q = unpack_layer(m)
        if q is not None:
            set_module(awq, name, LAYOUTS["awq-gemm"].pack(q, None, torch.float32))
    assert sum(layout_of(m) is LAYOUTS["awq-gemm"] for m in awq.modules()) == 14
    export_gguf(gptq, tmp_path / "from-gptq.gguf", tiny_gguf)
    export_gguf(awq, tmp_path / "from-awq.gguf", tiny_gguf)
    assert _sha(tmp_path / "from-gptq.gguf") == _sha(tmp_path / "from-awq.gguf")


@pytest.fixture()
def rtn_checkpoint(tiny, tmp_path):
    model, tok = tiny
    backend = RTN(WeightQuantConfig(bits=4, group_size=32))
    q = backend.quantize(
        copy.deepcopy(model), None
    ).model  # the fixture's model is shared: quantize a copy
    return export_checkpoint(
        q, tok, backend, tmp_path / "rtn", source={"model": "tiny"}, label="rtn"
    )


def _rewrite_sidecar(ckpt, **changes) -> None:
    meta = json.loads((ckpt / SIDECAR).read_text())
    meta.update(changes)
    meta["sidecar_sha256"] = sidecar_digest(meta)
    (ckpt / SIDECAR).write_text(json.dumps(meta))


def test_checkpoints_record_their_layout(rtn_checkpoint):
    meta = json.loads((rtn_checkpoint / SIDECAR).read_text())
    assert meta["layout"] == {"name": "gptq-v1", "version": LAYOUTS["gptq-v1"].version}
    load_checkpoint(rtn_checkpoint, dtype=torch.float32, device=CPU)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (
            {"name": "gptq-v1", "version": 99},
            r"written in layout gptq-v1 version 99; this quantlab reads version 1",
        ),
        ({"name": "marlin", "version": 1}, r"unknown checkpoint layout 'marlin'"),
        ("gptq-v1", r"the sidecar's 'layout' is not \{name, version\}"),
    ],
)
def test_a_layout_this_quantlab_does_not_read_is_a_clear_error(rtn_checkpoint, layout, message):
    _rewrite_sidecar(rtn_checkpoint, layout=layout)
    with pytest.raises(QuantlabError, match=message):
        load_checkpoint(rtn_checkpoint, dtype=torch.float32, device=CPU)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend_config_version": 0}, r"written by rtn config version 0; this quantlab's is 1"),
        ({"format": 2}, r"sidecar format 2; this quantlab reads format 1"),
    ],
)
def test_a_checkpoint_of_another_config_or_sidecar_version_is_not_read(
    rtn_checkpoint, change, message
):
    _rewrite_sidecar(rtn_checkpoint, **change)
    with pytest.raises(QuantlabError, match=message):
        load_checkpoint(rtn_checkpoint, dtype=torch.float32, device=CPU)
