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
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(pydoc_text("calibration").documents[:20], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out: Path, max_position_embeddings: int = 256) -> Path:
    """A local HF directory: 2-layer Llama (hidden 64, MLP 128, tied embeddings), random
    weights from a fixed seed, and a 384-token byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama of :func:`build_tiny_llama` (context 256)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


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
output: {{dir: "{tmp_path / "run"}"}}
""")
    return path


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """The tiny model as a float32 GGUF file (llama layout: q/k rows in the rotary order
    llama.cpp uses, a gpt2-style BPE vocabulary), written with the gguf package: a GGUF source
    and an export template for the tests, runnable by llama.cpp."""
    import json

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from quantlab.formats.gguf import _qk_permutation

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(
        cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    )
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(
        "gpt-2"
    )  # the GPT-2 split regex, as the tiny tokenizer's ByteLevel pre-tokenizer
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in load_file(model_dir / "model.safetensors").items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            t = t[_qk_permutation(t.shape[0], heads)]
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a float32 GGUF file (see :func:`write_tiny_gguf`)."""
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny-f32.gguf")
