"""The gptq perplexity convention against a straightforward float64 implementation."""

import math

import numpy as np
import pytest
import torch

from quantlab.bench.perplexity import perplexity_gptq
from quantlab.bench.size import checkpoint_bits_per_weight, checkpoint_tensor_bytes
from quantlab.bench.speed import measure_speed
from quantlab.data import pydoc_text, tokenize
from quantlab.errors import QuantlabError


def reference_ppl(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Window by window, log-softmax in float64 NumPy, one token at a time."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = ids[start : start + seq_len]
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].double().numpy()
        for t in range(seq_len - 1):
            row = logits[t]
            logz = row.max() + math.log(np.exp(row - row.max()).sum())
            nll += logz - row[window[t + 1]]
            count += 1
    return math.exp(nll / count), count


def test_gptq_convention_matches_reference(tiny):
    model, tok = tiny
    ids = tokenize(pydoc_text("evaluation"), tok)[:1000]  # 1000 // 96 = 10 windows, 40 dropped
    got = perplexity_gptq(model, ids, 96, batch_size=3)
    want, count = reference_ppl(model, ids.tolist(), 96)
    assert got.scored_tokens == count == 10 * 95
    assert got.windows == 10 and got.text_tokens == 1000 and got.convention == "gptq"
    assert got.ppl == pytest.approx(want, rel=1e-5)
    # max_windows scores a prefix
    part = perplexity_gptq(model, ids, 96, max_windows=2)
    assert part.scored_tokens == 2 * 95
    assert part.ppl == pytest.approx(reference_ppl(model, ids[:192].tolist(), 96)[0], rel=1e-5)


def test_tokenize_joins_documents_with_blank_lines(tiny):
    _, tok = tiny
    from quantlab.data import Text

    t = Text("x", ["first doc", "second doc"])
    assert tokenize(t, tok).tolist() == tok("first doc\n\nsecond doc").input_ids


def test_errors_for_short_text_and_long_windows(tiny):
    model, _ = tiny
    with pytest.raises(QuantlabError, match="fewer than one window"):
        perplexity_gptq(model, torch.arange(50), 64)
    with pytest.raises(QuantlabError, match="longer than the model's context"):
        perplexity_gptq(model, torch.arange(5000), 512)


def test_speed_reports_medians_samples_and_latency(tiny):
    model, _ = tiny
    s = measure_speed(
        model,
        torch.tensor([1, 2, 3, 4, 5, 6]),
        new_tokens=4,
        batch_sizes=(1, 3),
        warmup=1,
        repeats=3,
    )
    b1, b3 = s["by_batch"]["b1"], s["by_batch"]["b3"]
    assert len(b1["decode_tokens_per_s_samples"]) == len(b1["prefill_tokens_per_s_samples"]) == 3
    assert (
        b1["decode_tokens_per_s_min"] <= b1["decode_tokens_per_s"] <= b1["decode_tokens_per_s_max"]
    )
    assert b1["latency_p50_ms"] <= b1["latency_p95_ms"] and b1["ttft_ms"] > 0
    assert b3["batch_size"] == 3 and b3["prompt_tokens"] == 6
    # batch-1 figures are repeated at the top level; the prefill rate is the TTFT's inverse
    assert s["decode_tokens_per_s"] == b1["decode_tokens_per_s"]
    assert b1["prefill_tokens_per_s"] == pytest.approx(6 / (b1["ttft_ms"] / 1e3), rel=1e-6)


def test_bytes_per_token_counts_what_decode_reads(tiny):
    import copy

    from transformers import LlamaForCausalLM

    from quantlab.bench.speed import bytes_per_token, decode_bound
    from quantlab.quantizers.rtn import RTN

    model, _ = tiny
    everything = sum(
        t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
    )
    assert bytes_per_token(model) == everything  # tied head: the table is read whole, once
    q = RTN(RTN.Config(bits=4, group_size=32)).quantize(copy.deepcopy(model), None).model
    assert bytes_per_token(q) == everything  # dense-dequant layers read float weights
    cfg = copy.deepcopy(model.config)
    cfg.tie_word_embeddings = False
    untied = LlamaForCausalLM(cfg)
    table = untied.model.embed_tokens.weight
    total = sum(
        t.numel() * t.element_size() for t in list(untied.parameters()) + list(untied.buffers())
    )
    assert bytes_per_token(untied) == total - table.numel() * 4 + table.shape[1] * 4  # one row
    assert decode_bound(model, 1e9)["decode_bound_tokens_per_s"] == pytest.approx(1e9 / everything)


def test_bits_per_weight_of_float_and_packed(tiny, tmp_path):
    """As the results table computes it: from the exported checkpoint's tensors."""
    import copy

    from quantlab.checkpoint import export_checkpoint
    from quantlab.quantizers.none import NoQuant
    from quantlab.quantizers.rtn import RTN

    def stored_bpw(model, backend, name):
        ckpt = export_checkpoint(model, tok, backend, tmp_path / name, source={}, label=name)
        return checkpoint_bits_per_weight(model, checkpoint_tensor_bytes(ckpt, model))

    model, tok = tiny
    assert stored_bpw(copy.deepcopy(model), NoQuant(), "float") == 32.0
    backend = RTN(RTN.Config(bits=4, group_size=32))
    q = backend.quantize(copy.deepcopy(model), None).model
    # per weight: 4 code bits + 16/32 scale + 4/32 zero + g_idx 32 bits per input column / out
    n_out = {
        "q_proj": 64,
        "k_proj": 32,
        "v_proj": 32,
        "o_proj": 64,
        "gate_proj": 128,
        "up_proj": 128,
        "down_proj": 64,
    }
    n_in = {
        "q_proj": 64,
        "k_proj": 64,
        "v_proj": 64,
        "o_proj": 64,
        "gate_proj": 64,
        "up_proj": 64,
        "down_proj": 128,
    }
    bits = sum(n_in[k] * n_out[k] * (4 + 16 / 32 + 4 / 32) + 32 * n_in[k] for k in n_in)
    weights = sum(n_in[k] * n_out[k] for k in n_in)
    assert stored_bpw(q, backend, "rtn") == pytest.approx(bits / weights)
