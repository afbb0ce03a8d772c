"""ggml ``type: auto`` (quantlab.quantizers.ggml_alloc): a GGUF type per tensor under a size
target. On the tiny model: the mixed file's every tensor holds, in its chosen type, the blocks
llama.cpp's quantizer writes (quantlab's byte-identical port, ggml_quants) and stock
``llama-perplexity`` runs it; the size target is met; bad targets and types are one error
before any work. The llama.cpp tools come from scripts/llamacpp.sh; without them the test that
runs them skips (QUANTLAB_REQUIRE_LLAMACPP=1 makes that a failure)."""

from __future__ import annotations

import json
import os
import re

import gguf
import numpy as np
import pytest
import torch

from quantlab.allocation import solve
from quantlab.errors import QuantlabError
from quantlab.formats import ggml_quants as gq

CPU = torch.device("cpu")


def _tools():
    from quantlab.engines.llamacpp import find_llamacpp

    try:
        return find_llamacpp()
    except QuantlabError as e:
        if os.environ.get("QUANTLAB_REQUIRE_LLAMACPP") == "1":
            raise
        pytest.skip(str(e))


def _calibration(tokenizer, n: int = 4, seq_len: int = 64):
    from quantlab.data import pydoc_text, sample_calibration, tokenize

    text = pydoc_text("calibration")
    return sample_calibration(tokenize(text, tokenizer), text, n, seq_len, 0).ids


def _quantize(model_dir, tiny_gguf, tmp_path, **options):
    """(backend, checkpoint dir, float model) of ggml type: auto on the tiny model."""
    from quantlab.checkpoint import export_checkpoint
    from quantlab.models import load_model
    from quantlab.quantizers.base import QuantizeContext
    from quantlab.quantizers.ggml import Ggml

    lm = load_model(str(model_dir), dtype=torch.float32, device=CPU)
    float_model = load_model(str(model_dir), dtype=torch.float32, device=CPU).model
    backend = Ggml(Ggml.Config(type="auto", **options))
    source = {"gguf": str(tiny_gguf)}
    cal = _calibration(lm.tokenizer)
    done = backend.quantize(lm.model, cal, QuantizeContext(lm.tokenizer, source, tmp_path))
    ckpt = export_checkpoint(
        done, lm.tokenizer, backend, tmp_path / "ckpt", source=source, label="auto"
    )
    return backend, ckpt, float_model, done


def _block_bytes(reader) -> dict[str, int]:
    return {t.name: int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2}


def test_the_mixed_file_holds_llamas_blocks_and_llama_perplexity_runs_it(
    tiny_model_dir, tiny_gguf, tmp_path
):
    """type: auto with an importance matrix at 6 bits per weight: several types in one file,
    each tensor's data equal to ggml_quants' blocks of the float weight in its chosen type
    (importance on the blocks' tensors, none on the embedding, as llama.cpp); the record beside
    the file names the same types and meets the target; llama-perplexity runs the file."""
    from quantlab.data import pydoc_text
    from quantlab.engines.llamacpp import perplexity
    from quantlab.formats.gguf import export_gguf, ggml_source_tensors
    from quantlab.imatrix import read_imatrix

    tools = _tools()
    _, ckpt, float_model, done = _quantize(
        tiny_model_dir, tiny_gguf, tmp_path, size_target=6.0, imatrix=True
    )
    rec = json.loads((ckpt / "allocation.json").read_text())
    assert done.layer_stats["gguf_allocation"]["gguf_tensor_types"] == rec["gguf_tensor_types"]
    im = read_imatrix(ckpt / "imatrix" / "imatrix.gguf")
    reader = gguf.GGUFReader(str(ckpt / "model.gguf"))
    ours = {t.name: t for t in reader.tensors}
    source = ggml_source_tensors(float_model, tiny_gguf)
    types = rec["gguf_tensor_types"]
    assert set(types) == {n for n, t in source.items() if t.dim() == 2}
    assert len(set(types.values())) >= 2, types  # a mix, not one type
    for name, qtype in types.items():
        assert ours[name].tensor_type.name == qtype, name
        w = source[name].float().numpy()
        if qtype == "F16":
            want = w.astype(np.float16)
        else:
            imp = im.importance(name) if name.startswith("blk.") else None
            want = gq.quantize(w, qtype, imp)
        got = np.asarray(ours[name].data)
        assert np.array_equal(got.reshape(want.shape).view(want.dtype), want), name
    n_bytes = sum(_block_bytes(reader).values())
    assert n_bytes == rec["bytes"] <= rec["target_bytes"]
    assert rec["bits_per_weight"] == pytest.approx(8 * n_bytes / rec["weights"])
    assert rec["predicted_kl"] > 0 and rec["measured_kl"] > 0
    text = "\n\n".join(pydoc_text("calibration").documents[:40])
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    export_gguf(float_model, tmp_path / "f32.gguf", tiny_gguf)
    kw = dict(ctx=64, chunks=4, threads=2)
    base = perplexity(tools, tmp_path / "f32.gguf", tmp_path / "eval.txt", **kw)
    quant = perplexity(tools, ckpt / "model.gguf", tmp_path / "eval.txt", **kw)
    assert np.isfinite(quant["ppl"]) and quant["ppl"] == pytest.approx(base["ppl"], rel=0.2)


def test_the_size_target_is_met_and_more_bytes_never_cost_kl(tiny):
    """At every target (bits per weight or bytes) the chosen mix stores at most the target;
    no unit could move to a type of lower KL within the bytes left (up to the solver's
    rounding: it is the optimum, not merely a fit); the summed KL never rises with the
    target."""
    from quantlab.quantizers import ggml_alloc as ga
    from quantlab.quantizers.ggml import Ggml, _block_linears

    model, tok = tiny
    ids = _calibration(tok, 2, 64)
    linears = _block_linears(model)
    imp = dict.fromkeys(ga.allocated_weights(model, linears))
    predicted, kl = [], {}
    for target in (4.6, 5.0, 6.0, 7.5, "60KB"):
        cfg = Ggml.Config(type="auto", size_target=target, units="fused")
        layout = ga.plan(model, linears, cfg)
        if not kl:  # the per-unit KLs do not depend on the target: measured once
            kl = ga.choose_types(model, ids, layout, cfg, imp, lambda m: None)["kl"]
        budget = ga.target_bytes(target, layout["weights"])
        cost = layout["cost"]
        chosen = ga._solve(kl, cost, budget, solve)
        used = sum(cost[u][t] for u, t in chosen.items())
        assert used <= budget, (target, used, budget)
        slack = (len(cost) + 1) * budget / ga.STEPS
        for u, t in chosen.items():
            better = [x for x in cost[u] if kl[u][x] < kl[u][t]]
            assert all(cost[u][x] - cost[u][t] > budget - used - slack for x in better), u
        if isinstance(target, float):
            predicted.append(sum(kl[u][t] for u, t in chosen.items()))
    assert all(b <= a + 1e-12 for a, b in zip(predicted, predicted[1:])), predicted


def test_targets_no_mix_reaches_and_types_a_tensor_cannot_take_are_refused(tiny):
    """Below the smallest mix, above the largest: one error naming the feasible range; a
    candidate type whose blocks do not divide a tensor's rows: one error naming the types it
    can take; type: auto without a target, or its knobs without type: auto: config errors."""
    from pydantic import ValidationError
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantlab.quantizers.ggml import Ggml

    model, _ = tiny
    for target, near in ((2.0, "4.500"), (20, None), ("1KB", "4.500")):
        with pytest.raises(QuantlabError) as e:
            Ggml(Ggml.Config(type="auto", size_target=target)).check(model)
        msg = str(e.value)
        assert re.search(r"cannot be met: the candidate types store these \d+ weights", msg), msg
        assert "choose a target in that range" in msg and (near is None or near in msg), msg
    odd = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    cfg = Ggml.Config(type="auto", size_target=8, candidates=["q4_0", "f16"])
    with pytest.raises(
        QuantlabError,
        match=r"tensor 'model.layers.0.self_attn.q_proj' of shape \(48, 48\) "
        r"cannot take Q4_0 .*; types it can take: F16, F32",
    ):
        Ggml(cfg).check(odd)
    # by default a tensor whose rows are no whole block stays F16
    Ggml(Ggml.Config(type="auto", size_target=16)).check(odd)
    with pytest.raises(ValidationError, match="type: auto needs size_target"):
        Ggml.Config(type="auto")
    with pytest.raises(ValidationError, match="size_target only apply with type: auto"):
        Ggml.Config(type="q4_0", size_target=4.5)
    with pytest.raises(ValidationError, match="type: auto chooses the embedding's type"):
        Ggml.Config(type="auto", size_target=4.5, embedding_type="f16")
    with pytest.raises(ValidationError, match="with type: auto use search: none"):
        Ggml.Config(type="auto", size_target=4.5, search="awq")
    with pytest.raises(ValidationError, match="Q4_K unknown"):
        Ggml.Config(type="auto", size_target=4.5, candidates=["Q4_K"])
    with pytest.raises(ValidationError, match="bits per weight .* or bytes with a unit"):
        Ggml.Config(type="auto", size_target="85 parsecs")


def test_a_run_with_an_unreachable_target_stops_before_any_quantization(
    tiny_model_dir, tmp_path, capsys
):
    """The whole run: one error line naming the range, and no method quantized."""
    from quantlab.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{source: "{tiny_model_dir}"}}
methods:
  - {{label: ok, backend: ggml, options: {{type: q8_0}}}}
  - {{label: small, backend: ggml, options: {{type: auto, size_target: 3.0}}}}
calibration: {{samples: 4, seq_len: 64}}
eval: {{seq_len: 64, max_windows: 2, speed: {{enabled: false}}}}
output: {{dir: "{tmp_path / "run"}"}}
""")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err, err
    assert "size_target 3.0" in err and "nearest feasible: 4.500 bits per weight" in err, err
    assert not (tmp_path / "run" / "ok" / "checkpoint").exists()


def test_the_scaled_probe_measures_one_type_per_unit_and_scales_the_others(tiny):
    """probe: scaled: each unit's KL at its smallest type is the full probe's (the same
    forward), the other types' are that KL times their weighted-error ratio, so a type with
    more bytes of the same family never predicts more KL."""
    from quantlab.quantizers import ggml_alloc as ga
    from quantlab.quantizers.ggml import Ggml, _block_linears

    model, tok = tiny
    ids = _calibration(tok, 2, 64)
    linears = _block_linears(model)
    imp = dict.fromkeys(ga.allocated_weights(model, linears))
    full, scaled = (
        ga.choose_types(
            model,
            ids,
            ga.plan(model, linears, cfg),
            cfg,
            imp,
            lambda m: None,
        )
        for cfg in (
            Ggml.Config(type="auto", size_target=5.5, probe=p, units="fused")
            for p in ("full", "scaled")
        )
    )
    assert scaled["probe"] == "scaled" and "prediction" in scaled["probe_means"]
    for u, kls in scaled["kl"].items():
        assert kls["Q4_0"] == pytest.approx(full["kl"][u]["Q4_0"], rel=1e-6), u
        assert kls["Q8_0"] <= kls["Q5_0"] <= kls["Q4_0"], (u, kls)
