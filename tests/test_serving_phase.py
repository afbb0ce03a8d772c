"""``eval.serving`` in a run (quantlab/engines/serving_phase.py): the tiny GGUF model's rows
served by the real llama-server under vLLM's real load generator after scoring; each row's
metrics.json holds its serving records and columns, a row without a GGUF file holds the
engine's reason, and the report's serving plot is drawn from those files.

Needs llama.cpp's tools (scripts/llamacpp.sh) and .venv-vllm (scripts/vllm.sh, for the load
generator); without them the test skips and says why (QUANTLAB_REQUIRE_LLAMACPP=1 /
QUANTLAB_REQUIRE_VLLM=1 make that a failure)."""

from __future__ import annotations

import json

import pytest
from test_serving import _gone, _tools, _vllm


def test_a_run_serves_every_gguf_row_with_llama_server(tiny_gguf, tmp_path, monkeypatch):
    from quantlab.cli import main
    from quantlab.report.serving import serving_plot

    monkeypatch.setenv("QUANTLAB_LLAMACPP", str(_tools().bin_dir))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    _vllm()
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{source: "{tiny_gguf}"}}
methods:
  - {{label: rtn-q4_0, backend: rtn, options: {{bits: 4, group_size: 32}}, export: [native, gguf]}}
  - {{label: rtn-w3, backend: rtn, options: {{bits: 3, group_size: 32}}}}
eval:
  seq_len: 64
  max_windows: 2
  speed: {{enabled: false}}
  serving: {{engines: [llamacpp], concurrency: [1, 2], requests: 2, input_tokens: 16,
             output_tokens: 8, rounds: 1, threads: 1}}
output: {{dir: "{out}", report: false}}
""")
    assert main(["run", str(recipe)]) == 0
    rows = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("baseline", "rtn-q4_0")}
    for row in rows.values():
        recs = row["serving"]
        assert [(r["engine"], r["concurrency"]) for r in recs] == [("llamacpp", 1), ("llamacpp", 2)]
        for r in recs:
            assert r["threads"] == 1 and r["output_tokens"] == 8 and "llama.cpp" in r["build"]
            assert r["output_tokens_per_s"] > 0 and r["tpot_ms_p99"] > 0
            assert r["float_reference"] == "baseline-llamacpp-F32"
        assert row["serving_llamacpp_c2_tok_s"] == recs[1]["output_tokens_per_s"]
        assert "serving_error" not in row
    assert rows["baseline"]["serving_llamacpp_c1_x_float"] == 1.0
    assert rows["rtn-q4_0"]["serving"][0]["dtype"] == "Q4_0"
    assert rows["rtn-q4_0"]["serving_llamacpp_c1_x_float"] > 0
    w3 = json.loads((out / "rtn-w3" / "metrics.json").read_text())
    assert "no GGUF file" in w3["serving_error"] and "serving_llamacpp_c1_tok_s" not in w3
    assert list((out / ".serving").glob("*.server.log"))  # the servers' logs are kept
    assert _gone(out / ".serving")
    fig = serving_plot({**rows, "rtn-w3": w3})
    assert fig is not None and len(fig.axes[0].lines) == 2


@pytest.mark.slow
def test_the_demo_model_is_served_by_vllm_and_llama_server_in_one_run(tmp_path, monkeypatch):
    """The demo model's float and RTN W4 g32 rows served by vLLM (eager: the fast start) and
    llama-server in one run, one serving table: every row holds both engines' records (or
    vLLM's own refusal), ratios to the float model of the same engine, and no server is
    left running. The file's one vLLM-starting test (two servers)."""
    from quantlab.cli import main

    monkeypatch.setenv("QUANTLAB_LLAMACPP", str(_tools().bin_dir))
    _vllm()
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{source: smollm2-135m}}
methods:
  - {{label: rtn-w4-g32, backend: rtn, options: {{bits: 4, group_size: 32, sym: true}},
     export: [native, gguf]}}
eval:
  seq_len: 128
  max_windows: 2
  speed: {{enabled: false}}
  serving: {{engines: [vllm, llamacpp], concurrency: [1, 4], requests: 4, input_tokens: 32,
             output_tokens: 16, rounds: 1, float_dtypes: [float32], eager: true}}
output: {{dir: "{out}", report: false}}
""")
    assert main(["run", str(recipe)]) == 0
    rows = {
        m: json.loads((out / m / "metrics.json").read_text()) for m in ("baseline", "rtn-w4-g32")
    }
    base = rows["baseline"]
    assert {(r["engine"], r["dtype"], r["concurrency"]) for r in base["serving"]} == {
        ("vllm", "float32", 1),
        ("vllm", "float32", 4),
        ("llamacpp", "F32", 1),
        ("llamacpp", "F32", 4),
    }
    assert base["serving_vllm_c4_x_float"] == base["serving_llamacpp_c4_x_float"] == 1.0
    q = rows["rtn-w4-g32"]
    assert q["serving_llamacpp_c1_tok_s"] > 0 and q["serving_llamacpp_c4_x_float"] > 0
    if "serving_vllm_c1_tok_s" not in q:  # this CPU's vLLM build has no W4A16 kernel
        assert q["serving_error"].startswith("vllm: ") and "log" in q["serving_error"]
    else:
        assert {r["dtype"] for r in q["serving"] if r["engine"] == "vllm"} == {"bfloat16"}
    assert _gone(out / ".serving")
