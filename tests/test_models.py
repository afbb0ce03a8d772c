"""Model sources: classification, clear errors, local loading, device and dtype choice."""

import copy

import pytest
import torch

from quantlab.errors import QuantlabError
from quantlab.models import classify, load_model, resolve_device, resolve_dtype


def test_classify_sources(tmp_path, tiny_model_dir):
    assert classify("smollm2-135m") == ("demo", "smollm2-135m")
    assert classify("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    assert classify(str(tiny_model_dir))[0] == "local"
    for missing in ["./nope", "/no/such/dir", "a/b/c"]:
        with pytest.raises(QuantlabError, match="does not exist"):
            classify(missing)
    with pytest.raises(QuantlabError, match="GGUF file .* does not exist"):
        classify(str(tmp_path / "m.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantlabError, match="no config.json"):
        classify(str(tmp_path / "empty"))


def test_truncated_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(QuantlabError, match="cannot read GGUF file"):
        load_model(str(bad), dtype=torch.float32, device=torch.device("cpu"))


def test_local_directory_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    assert lm.info["kind"] == "local" and lm.model.config.hidden_size == 64


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(QuantlabError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") == cpu


# ------------------------------------------------------------------ sharded models in


@pytest.fixture
def three_shards(tiny_model_dir, tmp_path):
    """The tiny float model as three shards with their index (config and tokenizer beside)."""
    import shutil

    from safetensors.torch import load_file

    from quantlab.streaming.writer import ShardWriter

    out = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    w = ShardWriter(out, max_shard_bytes=150_000)  # of 394 KB
    for k, v in load_file(tiny_model_dir / "model.safetensors").items():
        w.add(k, v)
    assert len(w.close()["files"]) == 3
    return out


def test_a_sharded_local_model_loads_as_the_single_file_does(tiny_model_dir, three_shards):
    cpu = torch.device("cpu")
    one = load_model(str(tiny_model_dir), dtype=torch.float32, device=cpu).model
    many = load_model(str(three_shards), dtype=torch.float32, device=cpu).model
    ids = torch.arange(3, 40).view(1, -1)
    with torch.inference_mode():
        assert torch.equal(one(ids).logits, many(ids).logits)


def test_a_broken_sharded_model_is_the_streaming_sources_error(three_shards):
    """One set of messages: the streaming source's (quantlab.streaming.shards)."""
    (three_shards / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(QuantlabError, match=r"shard '.*model-00002-of-00003.* is missing; re-"):
        load_model(str(three_shards), dtype=torch.float32, device=torch.device("cpu"))


def test_a_checkpoint_saved_in_shards_reloads_its_tensors(tiny, tmp_path):
    """save_weights past its budget writes shards and the index (the streamed export's
    writer); load_weights reads them back, tied tensors stored once."""
    from quantlab.quantizers.base import WEIGHTS_NAME, load_weights, save_weights
    from quantlab.streaming.shards import INDEX

    model, _ = tiny
    save_weights(model, tmp_path / WEIGHTS_NAME, max_shard_bytes=60_000)
    assert not (tmp_path / WEIGHTS_NAME).exists() and (tmp_path / INDEX).is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 3
    other = copy.deepcopy(model)
    for p in other.parameters():
        p.data.zero_()
    load_weights(other, tmp_path / WEIGHTS_NAME)
    want, got = model.state_dict(), other.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    (tmp_path / "one").mkdir()
    save_weights(model, tmp_path / "one" / WEIGHTS_NAME)
    assert (tmp_path / "one" / WEIGHTS_NAME).is_file()  # under the budget: one file, as before
    with pytest.raises(QuantlabError, match="are missing .nor is there a model.safetensors.index"):
        load_weights(other, tmp_path / "nowhere" / WEIGHTS_NAME)
