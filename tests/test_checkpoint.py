"""Export -> reload round trips: the reloaded model is the model that was quantized."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from quantlab.checkpoint import export_checkpoint, load_checkpoint, weight_bytes
from quantlab.errors import QuantlabError
from quantlab.quantizers.none import NoQuant
from quantlab.quantizers.rtn import RTN

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 2]])


def _export(tiny, tmp_path, backend):
    model, tok = tiny
    q = backend.quantize(copy.deepcopy(model), None).model
    ckpt = export_checkpoint(
        q, tok, backend, tmp_path / "ckpt", source={"source": "tiny"}, label="m"
    )
    return q, ckpt


@pytest.mark.parametrize(
    "opts",
    [
        dict(bits=4, group_size=32, sym=True),
        dict(bits=4, group_size=32, sym=False),
        dict(bits=3, group_size=64, sym=True),
        dict(bits=2, group_size=16, sym=False),
        dict(bits=8, group_size=-1, sym=True),
        dict(bits=5, group_size=32, sym=False),
    ],
)
def test_rtn_round_trip_logits_equal(tiny, tmp_path, opts):
    q, ckpt = _export(tiny, tmp_path, RTN(RTN.Config(**opts)))
    loaded = load_checkpoint(ckpt, dtype=torch.float32, device=CPU)
    with torch.inference_mode():
        a, b = q(IDS).logits, loaded.model(IDS).logits
    assert torch.equal(a, b), float((a - b).abs().max())
    # and the quantization changed the model (the check could fail)
    with torch.inference_mode():
        assert not torch.allclose(tiny[0](IDS).logits, a)


def test_gptq_layout_and_config(tiny, tmp_path):
    _, ckpt = _export(tiny, tmp_path, RTN(RTN.Config(bits=4, group_size=32, sym=True)))
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["sym"] is True and qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    meta = json.loads((ckpt / "quantlab.json").read_text())
    assert meta["backend"] == "rtn" and meta["options"]["bits"] == 4 and len(meta["modules"]) == 14
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        p = "model.layers.0.mlp.down_proj."  # in 128 -> out 64
        assert f.get_tensor(p + "qweight").shape == (128 * 4 // 32, 64)
        assert f.get_tensor(p + "qweight").dtype == torch.int32
        assert f.get_tensor(p + "qzeros").shape == (4, 64 * 4 // 32)
        assert f.get_tensor(p + "scales").dtype == torch.float16 and f.get_tensor(
            p + "scales"
        ).shape == (4, 64)
        assert torch.equal(f.get_tensor(p + "g_idx"), torch.arange(128, dtype=torch.int32) // 32)
        # symmetric 4-bit: every stored zero is 8 - 1 = 7 (GPTQ v1 convention)
        assert (f.get_tensor(p + "qzeros") == 0x77777777).all()
    assert p + "weight" not in keys and "lm_head.weight" not in keys  # tied: stored once
    assert (ckpt / "tokenizer.json").is_file()


def test_rtn_5bit_is_not_labelled_gptq(tiny, tmp_path):
    _, ckpt = _export(tiny, tmp_path, RTN(RTN.Config(bits=5, group_size=32)))
    assert (
        json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"]
        == "quantlab"
    )


def test_round_trip_in_a_fresh_process(tiny, tmp_path):
    q, ckpt = _export(tiny, tmp_path, RTN(RTN.Config(bits=4, group_size=32, sym=False)))
    with torch.inference_mode():
        torch.save(q(IDS).logits, tmp_path / "expected.pt")
    code = f"""
import torch
from quantlab.checkpoint import load_checkpoint
m = load_checkpoint({str(ckpt)!r}, dtype=torch.float32, device=torch.device('cpu')).model
with torch.inference_mode():
    got = m(torch.tensor({IDS.tolist()})).logits
want = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
print('MAXDIFF', float((got - want).abs().max()))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "MAXDIFF 0.0" in out


def test_baseline_export_is_the_float_model(tiny, tmp_path):
    model, _ = tiny
    _, ckpt = _export(tiny, tmp_path, NoQuant())
    loaded = load_checkpoint(ckpt, dtype=torch.float32, device=CPU)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, loaded.model(IDS).logits)
    n = sum(p.numel() for p in model.parameters())  # tied parameters counted once
    assert abs(weight_bytes(ckpt) - 4 * n) < 4096  # float32 + safetensors header
    assert "quantization_config" not in json.loads((ckpt / "config.json").read_text())


def test_corrupt_or_incomplete_checkpoints_give_clear_errors(tiny, tmp_path):
    _, ckpt = _export(tiny, tmp_path, RTN(RTN.Config(bits=4, group_size=32)))
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantlabError, match="does not match its manifest.*--no-verify"):
        load_checkpoint(ckpt, dtype=torch.float32, device=CPU)
    # without the manifest check, the truncated file itself is still a clear error
    with pytest.raises(QuantlabError, match="cannot be read"):
        load_checkpoint(ckpt, dtype=torch.float32, device=CPU, verify=False)
    # one flipped byte, same size: only the sha256 sees it
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(QuantlabError, match="does not match its manifest"):
        load_checkpoint(ckpt, dtype=torch.float32, device=CPU)
    (ckpt / "model.safetensors").write_bytes(data)
    (ckpt / "extra.bin").write_bytes(b"pickle")
    with pytest.raises(QuantlabError, match="does not list: extra.bin"):
        load_checkpoint(ckpt, dtype=torch.float32, device=CPU)
    (ckpt / "extra.bin").unlink()
    load_checkpoint(ckpt, dtype=torch.float32, device=CPU)  # intact again
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(QuantlabError, match="missing 'model.safetensors'"):
        load_checkpoint(ckpt, dtype=torch.float32, device=CPU)
    with pytest.raises(QuantlabError, match="missing"):
        load_checkpoint(ckpt, dtype=torch.float32, device=CPU, verify=False)
    (ckpt / "quantlab.json").unlink()
    with pytest.raises(QuantlabError, match="not a quantlab checkpoint"):
        load_checkpoint(ckpt, dtype=torch.float32, device=CPU)


def test_the_baseline_shares_no_storage_with_the_source(tiny, tmp_path, monkeypatch):
    """Issue 26: a hard link let an in-place edit of the source change a finished run. The
    baseline's weights are a clone (copy-on-write file systems) or a copy, never the same inode."""
    import quantlab.checkpoint as ck

    monkeypatch.setattr(ck, "CLONE_MIN_BYTES", 0)  # the tiny model's files are small
    model, tok = tiny
    source = export_checkpoint(model, tok, NoQuant(), tmp_path / "source", source={}, label="float")
    ckpt = export_checkpoint(
        model,
        tok,
        NoQuant(),
        tmp_path / "run" / "ckpt",
        source={"path": str(source)},
        label="baseline",
    )
    weights, src = ckpt / "model.safetensors", source / "model.safetensors"
    assert weights.stat().st_ino != src.stat().st_ino and weights.stat().st_nlink == 1
    assert not weights.is_symlink() and weights.read_bytes() == src.read_bytes()
    with open(src, "r+b") as f:  # the source edited in place: the checkpoint keeps its bytes
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    assert weights.read_bytes() != src.read_bytes()
    loaded = load_checkpoint(
        ckpt, dtype=torch.float32, device=torch.device("cpu")
    )  # manifest verified
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
