"""Where to deploy (quantlab.hardware): KV arithmetic, fit, the published anchors, the
`quantlab hardware` command on a finished tiny run, its bad input, and the report's section."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from quantlab.cli import main
from quantlab.errors import QuantlabError
from quantlab.hardware.anchors import (
    GPU_DECODE,
    GPU_PREFILL,
    LLAMA2_7B,
    LLAMA31_8B,
    SMOLLM2_135M,
    weight_bytes,
)
from quantlab.hardware.cards import CARDS, GIB, Card, find_card, load_cards
from quantlab.hardware.efficiency import (
    anchor_errors,
    fit_compute,
    fit_decode,
    gpu_efficiency,
    project_anchor,
)
from quantlab.hardware.projection import (
    ENGINE_MEMORY_FRACTION,
    ENGINE_RESERVE_BYTES,
    Efficiency,
    decode_rate,
    max_batch,
    max_context,
    usable_bytes,
)
from quantlab.hardware.shape import shape_from_config

LLAMA31_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


# ---------------------------------------------------------------- shapes and KV arithmetic


def test_kv_bytes_per_token_is_layers_x_kv_heads_x_head_dim_x_dtype_x_2():
    shape = shape_from_config(LLAMA31_CONFIG)
    assert shape == LLAMA31_8B
    assert shape.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert shape.kv_bytes_per_token(1) == 65536  # an fp8 cache
    # the demo model: 30 layers x 3 KV heads x 64 = 23,040 bytes/token in 16 bits, so vLLM's CPU
    # cache of 1 GiB (VLLM_CPU_KVCACHE_SPACE=1) holds 2912 blocks of 16 tokens (docs/hardware.md)
    assert SMOLLM2_135M.kv_bytes_per_token(2) == 23040
    assert (1 << 30) // (16 * SMOLLM2_135M.kv_bytes_per_token(2)) == 2912


def test_shape_reads_other_families_and_refuses_what_it_cannot_describe():
    gpt2 = shape_from_config(
        {
            "model_type": "gpt2",
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "vocab_size": 50257,
            "n_positions": 1024,
        }
    )
    assert (gpt2.kv_heads, gpt2.head_dim, gpt2.intermediate, gpt2.mlp_matrices) == (12, 64, 3072, 2)
    assert gpt2.layer_params == 4 * 768 * 768 + 2 * 768 * 3072  # GPT-2 small's 7.08M per block
    with pytest.raises(QuantlabError, match="mixture of experts"):
        shape_from_config({**LLAMA31_CONFIG, "num_local_experts": 8})
    with pytest.raises(QuantlabError, match="num_hidden_layers"):
        shape_from_config({"hidden_size": 64, "num_attention_heads": 4})


def test_anchor_bytes_reproduce_the_sources_own_model_sizes():
    token_embd = LLAMA2_7B.head_params * 4.5 / 8  # held in the file, one row read per step
    q4_0 = weight_bytes(LLAMA2_7B, 4.5, 6.5625) + token_embd
    assert q4_0 / GIB == pytest.approx(3.56, abs=0.01)  # llama-bench's "3.56 GiB"
    assert weight_bytes(LLAMA2_7B, 16, 16) / 1e9 == pytest.approx(13.21, abs=0.01)  # torchao
    assert weight_bytes(LLAMA2_7B, 4.5, 4.5) / 1e9 == pytest.approx(3.74, abs=0.03)  # int4wo-64
    assert weight_bytes(LLAMA31_8B, 16, 16) / 1e9 == pytest.approx(15.01, abs=0.01)


# ---------------------------------------------------------------- fit

CARD = Card("test card", 10 * GIB, 1e12, 100e12)


def test_usable_memory_max_batch_and_max_context():
    usable = usable_bytes(CARD)
    assert usable == int(10 * GIB * ENGINE_MEMORY_FRACTION - ENGINE_RESERVE_BYTES)
    weights, kv, ctx = 4 * GIB, 100_000, 2048
    b = max_batch(usable, weights, kv, ctx)
    assert weights + b * ctx * kv <= usable < weights + (b + 1) * ctx * kv
    c = max_context(usable, weights, kv, 3, 10**9)
    assert weights + 3 * c * kv <= usable < weights + 3 * (c + 1) * kv
    assert max_context(usable, weights, kv, 3, 4096) == 4096  # the model's own context caps it
    too_big = usable + 1
    assert max_batch(usable, too_big, kv, ctx) == 0 == max_context(usable, too_big, kv, 1, 4096)


def test_decode_is_memory_bound_until_the_flops_catch_up():
    eff = Efficiency(1.0, 1.0, 0.0, "test")
    kv = LLAMA31_8B.kv_bytes_per_token(2)  # short contexts: the weights, not the KV cache, dominate
    rates = [decode_rate(LLAMA31_8B, 15e9, kv, 16, b, CARD, eff) for b in (1, 8, 64, 512, 4096)]
    assert rates[0][1] == "memory" and rates[-1][1] == "compute"
    tok = [r[0] for r in rates]
    assert tok == sorted(tok)  # more sequences, more tokens/s ...
    compute_roof = CARD.dense_flops / LLAMA31_8B.decode_flops(16)
    assert tok[-1] <= compute_roof * 1.0001  # ... never past the compute roof
    overhead = Efficiency(1.0, 1.0, 1e-3, "test")  # 1 ms per layer: 30 layers, < 1/30 ms steps/s
    assert decode_rate(SMOLLM2_135M, 1e6, 1, 1, 1, CARD, overhead)[0] < 1 / (30 * 1e-3)


# ---------------------------------------------------------------- published anchors


def test_every_published_anchor_is_reproduced_within_tolerance():
    errors = anchor_errors(GPU_DECODE + GPU_PREFILL, gpu_efficiency())
    cards = {a.card.name for a in GPU_DECODE}
    assert len(GPU_DECODE) >= 3 and cards >= {"RTX 4090", "A100 80GB SXM", "H100 SXM"}
    for e in errors:
        limit = 0.25 if e["card"] == "RTX 4090" else 0.30
        assert abs(e["error"]) <= limit, e
    rtx = next(e for e in errors if e["card"] == "RTX 4090")
    assert rtx["measured_tokens_per_s"] == 146.8 and "6766" in rtx["source"]


def test_each_decode_anchor_is_predicted_by_a_fit_that_never_saw_it():
    for i, held_out in enumerate(GPU_DECODE):
        memory, overhead = fit_decode(GPU_DECODE[:i] + GPU_DECODE[i + 1 :])
        eff = Efficiency(memory, fit_compute(GPU_PREFILL, overhead), overhead, "leave one out")
        ratio = project_anchor(held_out, eff) / held_out.measured_tokens_per_s
        assert ratio == pytest.approx(1, abs=0.30), held_out.name


def test_the_fit_recovers_known_efficiency_and_overhead():
    from dataclasses import replace

    eff = Efficiency(0.7, 0.5, 50e-6, "truth")
    synthetic = [replace(a, measured_tokens_per_s=project_anchor(a, eff)) for a in GPU_DECODE]
    memory, overhead = fit_decode(synthetic)
    assert memory == pytest.approx(0.7, rel=1e-3) and overhead == pytest.approx(50e-6, rel=1e-2)
    with pytest.raises(ValueError):
        fit_decode(synthetic[:1])


# ---------------------------------------------------------------- the command on a tiny run

RECIPE = """
model: {{source: "{model}"}}
methods:
  - {{label: rtn-w4, backend: rtn, options: {{bits: 4, group_size: 32}}}}
eval:
  seq_len: 64
  max_windows: 2
  batch_size: 2
  divergence: {{max_windows: 2}}
  speed: {{enabled: false}}
output: {{dir: "{out}"}}
"""


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardware")
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, out=root / "run"))
    assert main(["run", str(recipe)]) == 0
    return root / "run"


def _json(capsys, *argv) -> list[dict]:
    assert main(["hardware", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_hardware_json_one_object_per_row_and_card(run, capsys):
    records = _json(
        capsys, run, "--card", "H100 SXM", "--card", "rtx-4090", "--context", 128, "--batch", 2
    )
    assert [(r["card"], r["method"]) for r in records] == [
        ("H100 SXM", "baseline"),
        ("H100 SXM", "rtn-w4"),
        ("RTX 4090", "baseline"),
        ("RTX 4090", "rtn-w4"),
    ]
    required = {
        "method",
        "card",
        "fits",
        "weight_bytes",
        "kv_bytes_per_token",
        "max_batch",
        "decode_tokens_per_s_projected",
        "prefill_tokens_per_s_projected",
        "efficiency_source",
    }
    base, rtn = records[0], records[1]
    for r in records:
        assert required <= set(r) and r["projected"] is True and r["fits"]
        assert r["efficiency_source"]
        # tiny: 2 layers x 2 KV heads x head dim 16 x 16 bits, K and V
        assert r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
        assert (r["context"], r["batch"]) == (128, 2)
        most = r["max_batch"] * 128 * r["kv_bytes_per_token"]
        assert r["weight_bytes"] + most <= r["usable_bytes"]
    # the float32 baseline is served in 16 bits: 2 bytes per parameter of the tied model
    params = 384 * 64 + 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert base["weight_bytes"] == 2 * params
    assert rtn["weight_bytes"] < base["weight_bytes"] and rtn["kld_mean"] > 0
    # 2 layers of fixed overhead bound a tiny model's decode: no absurd speeds
    assert base["decode_tokens_per_s_projected"] <= 2 / (2 * gpu_efficiency().layer_overhead_s)


def test_hardware_text_names_every_card_and_says_projected(run, capsys):
    assert main(["hardware", str(run), "--bandwidth", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PROJECTED, not measured")
    for card in [c.name for c in CARDS] + ["this machine"]:
        assert f"\n{card}: " in out
    assert "torch eager" in out and "decode_tok/s PROJECTED" in out


def test_this_machine_uses_the_bandwidth_given_and_the_runs_dtype(run, capsys):
    (fast,) = _json(capsys, run, "--card", "this machine", "--bandwidth", 100, "--context", 64)[:1]
    (slow,) = _json(capsys, run, "--card", "this machine", "--bandwidth", 1, "--context", 64)[:1]
    assert fast["card_kind"] == "cpu" and fast["engine"] == "torch eager"
    assert fast["kv_cache_bytes_per_element"] == 4  # the run's float32 cache
    assert fast["decode_tokens_per_s_projected"] > slow["decode_tokens_per_s_projected"]


def test_a_users_card_file(run, tmp_path, capsys):
    f = tmp_path / "cards.yaml"
    f.write_text(
        "cards:\n  - {name: My GPU, memory_gib: 48, bandwidth_gb_s: 960, "
        "dense_tflops: 181, source: 'vendor datasheet'}\n"
    )
    records = _json(capsys, run, "--cards", f, "--card", "my gpu")
    assert {r["card"] for r in records} == {"My GPU"} and all(r["fits"] for r in records)
    (card,) = load_cards(f)
    assert card.memory_bytes == 48 * GIB and "vendor datasheet" in card.source_line()


def _error(capsys, *argv) -> str:
    assert main(["hardware", *map(str, argv)]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "PROJECTED" not in out, err
    return lines[0]


def test_bad_input_is_one_error_line(run, tmp_path, capsys):
    assert re.search(
        r"unknown card 'H10'.*did you mean 'H100 SXM' or 'H100 PCIe'.*known cards: .*'RTX 4090'",
        _error(capsys, run, "--card", "H10"),
    )
    assert "did you mean 'RTX 4090'" in _error(capsys, run, "--card", "rtx4900")
    assert re.search(
        r"--context 1000 is longer than the model's context: 256 tokens",
        _error(capsys, run, "--context", 1000),
    )
    assert "not a quantlab run directory" in _error(capsys, tmp_path)
    assert "at least 1" in _error(capsys, run, "--batch", 0)
    small = tmp_path / "small.json"
    small.write_text(
        json.dumps(
            [
                {
                    "name": "Tiny",
                    "memory_gib": 1.1,
                    "bandwidth_gb_s": 50,
                    "dense_tflops": 1,
                    "source": "made up",
                }
            ]
        )
    )
    msg = _error(capsys, run, "--cards", small, "--card", "Tiny")
    assert re.search(r"Tiny fits none of the rows .*the card leaves", msg)


def test_a_bad_cards_file_names_every_problem(run, tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "cards:\n  - {name: X, memory_gib: -1, bandwith_gb_s: 9, dense_tflops: 1}\n  - {name: h100 "
        "sxm, memory_gib: 80, bandwidth_gb_s: 1, dense_tflops: 1, source: s}\n"
    )
    msg = _error(capsys, run, "--cards", f)
    for needle in (
        "cards[0].memory_gib",
        "cards[0].bandwith_gb_s: unknown key (did you mean 'bandwidth_gb_s'?)",
        "cards[0].source: Field required",
        "'h100 sxm' is a built-in card",
    ):
        assert needle in msg, msg
    with pytest.raises(QuantlabError, match="holds no cards"):
        load_cards(_write(tmp_path / "empty.yaml", "cards: []\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_find_card_ignores_case_spaces_and_dashes():
    assert find_card("h100-pcie", CARDS).name == "H100 PCIe"
    assert find_card("A100_80GB_SXM", CARDS).bandwidth_bytes_per_s == 2039e9
    for card in CARDS:  # every built-in figure cites its document
        assert {"memory", "bandwidth", "dense_flops"} <= set(card.sources)
        assert "nvidia" in card.source_line().lower()


def test_gguf_checkpoint_bytes_are_the_files(tiny_gguf):
    from quantlab.hardware.rows import gguf_footprint

    fp = gguf_footprint(tiny_gguf, "llama.cpp")
    assert fp.read_bytes == fp.weight_bytes  # tied: the token embedding is the output head
    assert fp.weight_bytes <= tiny_gguf.stat().st_size < fp.weight_bytes + 64 * 1024


# ---------------------------------------------------------------- the report


def test_the_report_has_a_where_to_deploy_section_labelled_projected(run):
    html = (run / "report.html").read_text()
    start, end = html.index('<section id="deploy">'), html.index('<section id="methods">')
    section, results = html[start:end], html[html.index('<section id="results">') : start]
    assert "projected, not measured" in section
    assert section.count("PROJECTED</th>") == 2 * len(CARDS)
    for card in CARDS:
        assert f"<h3>{card.name}: " in section
    assert 'id="plot-deploy"' in section and (run / "plots" / "deploy.png").stat().st_size > 2000
    assert "projected" not in results.lower()  # never mixed with the measured columns
    assert math.isfinite(gpu_efficiency().memory)
