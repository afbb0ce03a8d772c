"""The in-memory API (quantlab.config / quantize / save / load): the checkpoint it writes is a
run's (it reloads with the same logits, loads with kernels), and wrong input is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

import quantlab
from quantlab.errors import QuantlabError, RecipeError

IDS = torch.tensor([[1, 17, 42, 99, 7, 230]])


def test_quantize_save_load_gives_back_the_model_quantize_made(tiny, tmp_path):
    model, tok = tiny
    q = quantlab.quantize(copy.deepcopy(model), quantlab.config("rtn", bits=4, group_size=32))
    path = quantlab.save(q, tmp_path / "rtn-w4", tokenizer=tok, source="tiny")
    loaded = quantlab.load(path, dtype="float32", device="cpu")
    with torch.no_grad():
        want = q(IDS).logits
        assert torch.equal(loaded.model(IDS).logits, want)
        fast = quantlab.load(path, dtype="float32", device="cpu", kernel="int4pack")
        assert float((fast.model(IDS).logits - want).norm() / want.norm()) < 2e-2
    assert loaded.info["backend"] == "rtn" and loaded.info["options"]["bits"] == 4


def test_a_calibrated_method_takes_texts_and_the_tokenizer(tiny, tmp_path):
    from quantlab.data import pydoc_text

    model, tok = tiny
    texts = pydoc_text("calibration").documents[:20]
    cfg = quantlab.config("gptq", bits=4, group_size=32)
    q = quantlab.quantize(
        copy.deepcopy(model), cfg, tokenizer=tok, calibration=texts, samples=4, seq_len=64
    )
    path = quantlab.save(q, tmp_path / "gptq", tokenizer=tok)
    with torch.no_grad():
        assert torch.equal(quantlab.load(path).model(IDS).logits, q(IDS).logits)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, t: quantlab.config("rtn", bits=17), RecipeError, "bits"),
        (lambda m, t: quantlab.config("rtnn"), QuantlabError, "did you mean 'rtn'"),
        (
            lambda m, t: quantlab.quantize(
                m, quantlab.config("gptq", group_size=32), calibration=["some text"]
            ),
            QuantlabError,
            "needs the tokenizer",
        ),
        (
            lambda m, t: quantlab.quantize(
                m, quantlab.config("gptq", group_size=32), calibration=torch.zeros(2, 8)
            ),
            QuantlabError,
            "token ids",
        ),
        (lambda m, t: quantlab.quantize(m, {"bits": 4}), QuantlabError, "quantlab.config"),
        (
            lambda m, t: quantlab.save(m, "/tmp/never", tokenizer=t),
            QuantlabError,
            "not quantized by quantlab.quantize",
        ),
    ],
)
def test_wrong_input_is_a_clear_error(tiny, call, error, message):
    model, tok = tiny
    with pytest.raises(error, match=message):
        call(copy.deepcopy(model), tok)
