"""A model's shape as the projection needs it, read from its ``config.json``: layers, widths,
KV heads, vocabulary, context. Nothing is loaded but the JSON file.

KV cache bytes per token = 2 (K and V) x layers x KV heads x head dim x cache dtype bytes, as
vLLM sizes its cache blocks (``CacheEngine.get_cache_block_size``) and llama.cpp its KV buffers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError

#: config keys by meaning: the transformers name first, then older or other families' names
_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
    "max_context": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
}
#: families whose MLP has two matrices (up, down) instead of the gated three (gate, up, down)
UNGATED = frozenset(
    {"gpt2", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "starcoder2", "gpt_bigcode"}
)
#: configs that route tokens to experts: their bytes per token are not the weights' bytes
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a decoder's bytes and FLOPs per token."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_context: int
    tied: bool = False
    mlp_matrices: int = 3

    def kv_bytes_per_token(self, cache_bytes: float = 2) -> int:
        """KV cache bytes one token holds: K and V in every layer."""
        return int(2 * self.layers * self.kv_heads * self.head_dim * cache_bytes)

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matmuls (q, k, v, o and the MLP)."""
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = 2 * self.hidden * q_dim + 2 * self.hidden * kv_dim
        return attention + self.mlp_matrices * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies through: the layers' matmuls and the output head
        (the input embedding is a lookup, not a matmul)."""
        return self.layers * self.layer_params + self.head_params

    def decode_flops(self, context: int) -> float:
        """FLOPs of one new token at ``context`` earlier tokens: 2 per matmul weight, plus
        attention's QK^T and AV over the context (2 x 2 x context x q_dim per layer)."""
        return 2.0 * self.matmul_params + 4.0 * self.layers * context * self.heads * self.head_dim

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs of a causal prompt of ``tokens``: every token through the layers, the head
        for the last token only (what engines compute), attention over the causal triangle."""
        linear = 2.0 * self.layers * self.layer_params * tokens + 2.0 * self.head_params
        return linear + 2.0 * self.layers * tokens * tokens * self.heads * self.head_dim


def _get(cfg: dict, what: str, where: str) -> int:
    for key in _KEYS[what]:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise QuantlabError(
        f"{where} has no {' / '.join(_KEYS[what])}: its architecture cannot be "
        "projected (decoder-only transformer configs are)"
    )


def shape_from_config(cfg: dict, where: str = "config.json") -> ModelShape:
    """The shape of a transformers ``config.json`` (as a dict); a clear error for what it
    cannot describe (mixtures of experts, configs without the usual keys)."""
    cfg = {**cfg, **(cfg.get("text_config") or {})}  # multimodal wrappers keep the LM's keys there
    moe = [k for k in MOE_KEYS if cfg.get(k)]
    if moe:
        raise QuantlabError(
            f"{where} describes a mixture of experts ({moe[0]}={cfg[moe[0]]}): only the routed "
            "experts' bytes are read per token, which this projection does not model"
        )
    hidden, heads = _get(cfg, "hidden", where), _get(cfg, "heads", where)
    head_dim = cfg.get("head_dim") or hidden // heads
    gated = cfg.get("model_type") not in UNGATED
    return ModelShape(
        layers=_get(cfg, "layers", where),
        hidden=hidden,
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or cfg.get("multi_query_group_num") or heads,
        head_dim=head_dim,
        intermediate=cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden,
        vocab=_get(cfg, "vocab", where),
        max_context=_get(cfg, "max_context", where),
        tied=bool(cfg.get("tie_word_embeddings", True)),
        mlp_matrices=3 if gated else 2,
    )


def read_shape(path: Path) -> ModelShape:
    """The shape in ``path`` (a config.json), or a clear error."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantlabError(
            f"'{path}' cannot be read as a model config ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(cfg, dict):
        raise QuantlabError(f"'{path}' is not a model config (expected a JSON object)")
    return shape_from_config(cfg, f"'{path}'")
