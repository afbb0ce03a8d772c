"""Model sources: classification, clear errors, local loading, device and dtype choice."""

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
