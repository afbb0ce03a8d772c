"""Shared fixtures: a tiny Llama model with a tokenizer trained in the test session.

Everything here is built locally in seconds; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2"

# keep test processes from oversubscribing the 2 cores
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _train_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantlab.data import pydoc_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pydoc_text("calibration").documents[:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local HF directory: 2-layer Llama (hidden 64, MLP 128, tied embeddings), random
    weights from a fixed seed, and a 384-token byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = _train_tokenizer(out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded from the tiny model directory (float32, CPU)."""
    from quantlab.models import load_model

    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    return lm.model, lm.tokenizer


@pytest.fixture()
def tiny_recipe(tiny_model_dir, tmp_path) -> Path:
    """A small recipe file on the tiny model: baseline + RTN W4 g32."""
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
model: {{source: "{tiny_model_dir}"}}
methods:
  - label: rtn-w4-g32
    backend: rtn
    options: {{bits: 4, group_size: 32}}
eval:
  seq_len: 64
  max_windows: 6
  batch_size: 3
  speed: {{prompt_tokens: 8, new_tokens: 4, warmup: 0, repeats: 2}}
output: {{dir: "{tmp_path / 'run'}"}}
""")
    return path
