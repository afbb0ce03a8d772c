"""The command line, end to end on the tiny model."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from quantlab.cli import main

REQUIRED = [
    "method",
    "backend",
    "bits",
    "group_size",
    "ppl",
    "ppl_convention",
    "eval_tokens",
    "size_bytes",
    "bits_per_weight",
    "decode_tokens_per_s",
    "quantize_s",
    "checkpoint",
]


def test_run_writes_a_complete_run_directory(tiny_recipe, tmp_path, capsys):
    assert main(["run", str(tiny_recipe)]) == 0
    run = tmp_path / "run"
    table = pd.read_csv(run / "results.csv")
    assert list(table["method"]) == ["baseline", "rtn-w4-g32"]
    assert set(REQUIRED) <= set(table.columns)
    assert (table["ppl_convention"] == "gptq").all() and (table["eval_tokens"] == 6 * 63).all()
    base, rtn = table.iloc[0], table.iloc[1]
    assert (
        rtn["size_bytes"] < base["size_bytes"]
        and rtn["bits_per_weight"] < 6
        and base["bits_per_weight"] == 32
    )
    for row in table.itertuples():
        assert (run / row.checkpoint / "quantlab.json").is_file()
        metrics = json.loads((run / row.method / "metrics.json").read_text())
        assert metrics["ppl"] == pytest.approx(row.ppl)
        b1 = metrics["speed"]["by_batch"]["b1"]
        # every sample kept: 2 repeats per measurement, pooled over the speed phase's measurements
        n = 2 * len(metrics["speed"]["measurements"])
        assert (
            len(b1["decode_tokens_per_s_samples"]) == len(b1["prefill_tokens_per_s_samples"]) == n
        )
        assert metrics["speed"]["by_batch"]["b4"]["batch_size"] == 4 == row.decode_batch_size
        assert row.latency_p50_ms <= row.latency_p95_ms and row.ttft_ms > 0
        assert 0 < row.decode_fraction_of_bound and row.decode_bound_tokens_per_s > 0
        assert row.peak_rss_eval_bytes > 0 and row.checkpoint_bytes > row.size_bytes
        assert metrics["eval_labels"]["text_sha256"] == row.eval_sha256
    # divergence from the base model: the float round trip is exact, RTN is not
    assert base["kld_mean"] < 1e-6 and base["top1_agreement"] == 1.0
    assert rtn["kld_mean"] > 1e-6 and base["kld_tokens"] == rtn["kld_tokens"] == 6 * 63
    assert (run / "reference" / "meta.json").is_file()
    assert (run / "recipe.yaml").is_file() and (run / "environment.json").is_file()
    out = capsys.readouterr().out
    assert "rtn-w4-g32" in out and "convention gptq" in out and "pydoc:evaluation" in out

    # the table's perplexity is the reloaded checkpoint's, recomputed independently here
    from quantlab.bench.perplexity import perplexity_gptq
    from quantlab.checkpoint import load_checkpoint
    from quantlab.data import pydoc_text, tokenize

    lm = load_checkpoint(run / rtn["checkpoint"], dtype=torch.float32, device=torch.device("cpu"))
    ids = tokenize(pydoc_text("evaluation"), lm.tokenizer)
    assert perplexity_gptq(lm.model, ids, 64, max_windows=6).ppl == pytest.approx(
        rtn["ppl"], rel=1e-6
    )


def test_rerun_reuses_finished_methods_and_force_redoes_them(tiny_recipe, tmp_path, capsys):
    assert main(["run", str(tiny_recipe)]) == 0
    # the checkpoint's sidecar is written only by an export (metrics.json is rewritten by every
    # run's speed phase, which measures all rows together)
    marker = tmp_path / "run" / "rtn-w4-g32" / "checkpoint" / "quantlab.json"
    measured = json.loads((tmp_path / "run" / "rtn-w4-g32" / "metrics.json").read_text())[
        "measured_at"
    ]
    first = marker.stat().st_mtime_ns
    assert main(["run", str(tiny_recipe)]) == 0
    assert marker.stat().st_mtime_ns == first
    assert (
        json.loads((tmp_path / "run" / "rtn-w4-g32" / "metrics.json").read_text())["measured_at"]
        == measured
    )
    assert "reusing" in capsys.readouterr().err
    # a changed option is a different method, named after it: computed in its own directory
    assert main(["run", str(tiny_recipe), "--set", "methods.0.options.sym=false"]) == 0
    other = tmp_path / "run" / "rtn-w4-g32-sym-false" / "checkpoint" / "quantlab.json"
    second = other.stat().st_mtime_ns
    assert marker.stat().st_mtime_ns == first
    assert main(["run", str(tiny_recipe), "--set", "methods.0.options.sym=false", "--force"]) == 0
    assert other.stat().st_mtime_ns != second


@pytest.mark.parametrize(
    "override,needle",
    [
        ("methods.0.backend=rnt", "unknown backend 'rnt' (did you mean 'rtn'?)"),
        ("methods.0.options.bits=9", "methods[0].options.bits"),
        (
            "methods.0.options.group_size=48",
            "group_size 48 does not divide the input width 64 of layer "
            "'model.layers.0.self_attn.q_proj'",
        ),
        ("model.source=/no/such/model", "model path '/no/such/model' does not exist"),
        ("eval.source=EMPTY", "is empty"),
        ("eval.seq_len=4096", "longer than the model's context"),
        ("modle.source=x", "did you mean 'model'"),
    ],
)
def test_bad_input_exit_2_and_earlier_results_survive(
    tiny_recipe, tmp_path, capsys, override, needle
):
    assert main(["run", str(tiny_recipe)]) == 0
    results = (tmp_path / "run" / "results.csv").read_bytes()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    capsys.readouterr()
    assert main(["run", str(tiny_recipe), "--set", override.replace("EMPTY", str(empty))]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err
    assert (tmp_path / "run" / "results.csv").read_bytes() == results


def test_validate_and_listing_commands(tiny_recipe, capsys):
    assert main(["validate", str(tiny_recipe)]) == 0
    assert "valid recipe" in capsys.readouterr().out
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "rtn:" in out and "group_size" in out and "none:" in out
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_user_errors_have_no_traceback_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [{label: a, backend: rtn, options: {bits: 12}}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "quantlab", "run", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "bits" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(
        [sys.executable, "-m", "quantlab", "validate", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_another_recipe_does_not_take_over_a_run_directory(tiny_recipe, tmp_path, capsys):
    assert main(["run", str(tiny_recipe)]) == 0
    results = (tmp_path / "run" / "results.csv").read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text(tiny_recipe.read_text())
    capsys.readouterr()
    assert main(["run", str(other)]) == 2
    assert "holds the results of recipe 'tiny'" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.csv").read_bytes() == results


def test_every_backend_runs_through_the_pipeline(tiny_model_dir, tmp_path):
    """quantize -> export -> reload -> score for each backend, on the tiny model."""
    recipe = tmp_path / "all.yaml"
    recipe.write_text(f"""
model: {{source: "{tiny_model_dir}"}}
calibration: {{samples: 8, seq_len: 64}}
methods:
  - {{label: rtn, backend: rtn, options: {{bits: 4, group_size: 32}}}}
  - {{label: gptq, backend: gptq, options: {{bits: 4, group_size: 32, act_order: true}}}}
  - {{label: awq, backend: awq, options: {{bits: 4, group_size: 32, search_tokens: 128}}}}
  - {{label: awq-gptq-layout, backend: awq,
     options: {{bits: 3, group_size: 32, format: gptq, clip: false}}}}
eval: {{seq_len: 64, max_windows: 4, speed: {{new_tokens: 2, warmup: 0, repeats: 1}}}}
""")
    # the whole-model path of every backend (streamed rows name other stages: docs/streaming.md)
    assert (
        main(["run", str(recipe), "--out", str(tmp_path / "run"), "--set", "model.streaming=off"])
        == 0
    )
    table = pd.read_csv(tmp_path / "run" / "results.csv").set_index("method")
    assert list(table.index) == ["baseline", "rtn", "gptq", "awq", "awq-gptq-layout"]
    assert table["ppl"].notna().all() and (table["ppl"] > 1).all()
    assert (table.loc[["rtn", "gptq", "awq"], "bits_per_weight"] < 6).all()
    assert table.loc["awq-gptq-layout", "bits_per_weight"] < table.loc["awq", "bits_per_weight"]
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["samples"] == 8
    stages = {
        m: json.loads((tmp_path / "run" / m / "metrics.json").read_text())["quantize_stages"]
        for m in ("gptq", "awq")
    }
    assert stages["gptq"]["gptq solve"] > 0 and stages["gptq"]["capture inputs"] > 0
    assert stages["awq"]["scale search"] > 0 and stages["awq"]["clip search"] > 0
    assert table["compression_ratio"].loc["baseline"] == 1
    assert table["compression_ratio"].loc["rtn"] == pytest.approx(
        table["size_bytes"].loc["baseline"] / table["size_bytes"].loc["rtn"]
    )


def test_output_directory_that_is_a_file(tiny_recipe, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    assert main(["run", str(tiny_recipe), "--out", str(target)]) == 2
    assert "exists and is a file" in capsys.readouterr().err
    assert target.read_text() == "not a directory"


def test_bad_model_path_creates_nothing(tiny_recipe, tmp_path):
    assert (
        main(
            [
                "run",
                str(tiny_recipe),
                "--out",
                str(tmp_path / "new"),
                "--set",
                "model.source=/nope/x",
            ]
        )
        == 2
    )
    assert not (tmp_path / "new").exists()


def test_quick_preset_is_named_labelled_and_overridable(tmp_path, monkeypatch, tiny_model_dir):
    """--quick: its own run directory (NAME-quick), the preset's settings unless --set says
    otherwise, and a report that says its figures are indicative."""
    import pandas as pd
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "model": {"source": str(tiny_model_dir)},
                "methods": [{"backend": "rtn", "options": {"bits": 4, "group_size": 32}}],
                "eval": {"seq_len": 32, "speed": {"new_tokens": 2, "prompt_tokens": 8}},
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe), "--quick", "--set", "eval.max_windows=3"]) == 0
    run = tmp_path / "runs" / "r-quick"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["eval"]["max_windows"] == 3 and saved["eval"]["speed"]["rounds"] == 1
    assert (
        saved["quick"] is True and saved["description"] == ""
    )  # a field, not a description prefix
    assert "made with `quantlab run --quick`" in (run / "report.html").read_text()
    assert pd.read_csv(run / "results.csv")["method"].tolist() == ["baseline", "rtn-w4-g32"]
