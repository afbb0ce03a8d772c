"""Serving benchmarks (quantlab/engines/serving.py, serving_phase.py): the real llama-server
(built by scripts/llamacpp.sh) on the tiny model's GGUF, loaded by vLLM's real load generator
(.venv-vllm), in a serving table and in a run (``eval.serving``); no server left behind on
Ctrl-C or when quantlab is killed.

llama-server starts in about a second on the tiny model; each load costs the generator's
start (it imports vLLM, 10-30 s here), so the tests run few loads. Without llama.cpp's tools
the tests that need them skip and say why (QUANTLAB_REQUIRE_LLAMACPP=1 makes that a failure);
without .venv-vllm the loads skip too (QUANTLAB_REQUIRE_VLLM=1 makes that a failure)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantlab.errors import QuantlabError

REPO = Path(__file__).resolve().parents[1]


def _tools():
    from quantlab.engines.llamacpp import find_llamacpp

    try:
        return find_llamacpp()
    except QuantlabError as e:
        if os.environ.get("QUANTLAB_REQUIRE_LLAMACPP") == "1":
            raise
        pytest.skip(str(e))


def _vllm():
    from quantlab.engines.vllm import find_vllm

    try:
        return find_vllm()
    except QuantlabError as e:
        if os.environ.get("QUANTLAB_REQUIRE_VLLM") == "1":
            raise
        pytest.skip(f"no vLLM environment for the load generator: {e}")


def processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is ``directory`` (servers and load
    generators start there)."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)) == directory.resolve():
                found.append(int(cwd.parent.name))
        except OSError:
            continue
    return found


def _gone(directory: Path, within_s: float = 10.0) -> bool:
    """No process left in ``directory`` within ``within_s`` (a SIGKILLed process takes a moment
    to go under load)."""
    t0 = time.monotonic()
    while processes_in(directory):
        if time.monotonic() - t0 > within_s:
            return False
        time.sleep(0.2)
    return True


def _recipe(source: Path, eval_yaml: str, export: str = "[native]"):
    import yaml

    from quantlab.recipe import parse_recipe

    doc = f"""
model: {{source: "{source}"}}
methods: [{{label: rtn, backend: rtn, options: {{bits: 4, group_size: 32}}, export: {export}}}]
eval: {eval_yaml}
"""
    return parse_recipe(yaml.safe_load(doc))


def test_the_serving_block_is_checked(tiny_model_dir):
    """Off by default; its engines default to those of eval.engines that serve; a repeated
    or zero concurrency, llama-server without a GGUF export, an unknown engine: errors."""
    from quantlab.errors import RecipeError

    gguf = "[native, gguf]"
    assert _recipe(tiny_model_dir, "{}").eval.serving_engines() == []
    both = _recipe(tiny_model_dir, "{engines: [torch, llamacpp, vllm], serving: {}}", gguf)
    assert both.eval.serving_engines() == ["llamacpp", "vllm"]
    assert _recipe(tiny_model_dir, "{serving: {}}").eval.serving_engines() == ["vllm"]
    with pytest.raises(RecipeError, match=r"each number of concurrent clients once"):
        _recipe(tiny_model_dir, "{serving: {concurrency: [1, 8, 8]}}")
    with pytest.raises(RecipeError, match=r"each at least 1"):
        _recipe(tiny_model_dir, "{serving: {concurrency: [0]}}")
    with pytest.raises(RecipeError, match=r"no method exports GGUF; add export: \[native, gguf\]"):
        _recipe(tiny_model_dir, "{serving: {engines: [llamacpp]}}")
    with pytest.raises(RecipeError, match=r"sglang"):
        _recipe(tiny_model_dir, "{serving: {engines: [sglang]}}")
    with pytest.raises(RecipeError, match=r"float_dtypes .*: name each once"):
        _recipe(tiny_model_dir, "{serving: {float_dtypes: [float32, float32]}}")
    with pytest.raises(RecipeError, match=r"engines .*: name each once"):
        _recipe(tiny_model_dir, "{serving: {engines: [vllm, vllm]}}")


def test_llama_server_serves_a_gguf_under_load_and_stops(tiny_model_dir, tiny_gguf, tmp_path):
    """llama-server of the tiny F32 GGUF under vLLM's load generator: every request completes
    with exactly the asked output length, the figures are there, and leaving the block stops
    the server (no process of it left)."""
    from quantlab.engines.serving import Load, llama_server, run_load

    tools, vllm = _tools(), _vllm()
    load = Load(concurrency=2, requests=4, input_tokens=16, output_tokens=8, warmups=1)
    with llama_server(
        tools, tiny_gguf, log_dir=tmp_path, name="f32", threads=2, parallel=2, ctx_per_slot=96
    ) as server:
        assert processes_in(tmp_path)
        fig = run_load(vllm, server, tiny_model_dir, load, log_dir=tmp_path)
    assert fig["total_output_tokens"] == 4 * 8 and len(fig["samples"]["latencies_s"]) == 4
    assert fig["output_tokens_per_s"] > 0 and fig["requests_per_s"] > 0
    assert 0 < fig["ttft_ms_p50"] <= fig["ttft_ms_p99"] and 0 < fig["tpot_ms_p50"]
    assert _gone(tmp_path)
    assert "llama" in (tmp_path / "f32.server.log").read_text()  # the server's log is kept


def test_a_gguf_llama_server_refuses_is_one_error_naming_its_log(tiny_gguf, tmp_path):
    from quantlab.engines.serving import llama_server
    from quantlab.procs import ToolError

    tools = _tools()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:4096])  # a header and no tensors
    logs = tmp_path / "logs"
    with pytest.raises(ToolError, match="llama-server exited .* before it was ready") as e:
        with llama_server(
            tools, bad, log_dir=logs, name="bad", threads=1, parallel=1, ctx_per_slot=64
        ):
            pass
    assert str(logs / "bad.server.log") in str(e.value)
    assert _gone(logs)


def test_the_serving_table_goes_on_past_a_server_that_does_not_start(
    tiny_model_dir, tiny_gguf, tmp_path
):
    """Two llama-server entries of the same file (the float one is the reference) and one
    broken file: the broken one is its own error, the others are measured in the same rounds
    and their ratio is about 1; nothing is left running."""
    from quantlab.engines.serving import serving_table

    tools, vllm = _tools(), _vllm()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:4096])
    entry = {"engine": "llamacpp", "dtype": "F32", "tokenizer": str(tiny_model_dir)}
    entries = [
        {**entry, "method": "float", "dir": str(tiny_gguf), "float": True, "name": "a"},
        {**entry, "method": "same", "dir": str(tiny_gguf), "float": False, "name": "b"},
        {**entry, "method": "broken", "dir": str(bad), "float": False, "name": "c"},
    ]
    logs = tmp_path / "logs"
    records = serving_table(
        vllm,
        entries,
        concurrency=[2],
        requests=4,
        input_tokens=16,
        output_tokens=8,
        rounds=1,
        log_dir=logs,
        llamacpp=tools,
        threads=1,
    )
    by = {r["method"]: r for r in records}
    assert (
        "before it was ready" in by["broken"]["error"] and "c.server.log" in by["broken"]["error"]
    )
    for m in ("float", "same"):
        assert by[m]["engine"] == "llamacpp" and by[m]["concurrency"] == 2
        assert by[m]["threads"] == 1 and by[m]["output_tokens_per_s"] > 0
        assert by[m]["float_reference"] == "a"
    assert by["float"]["x_float"] == 1.0
    assert 0.2 < by["same"]["x_float"] < 5  # the same file, measured next to it
    assert _gone(logs)


_SLEEPER = """
import sys, time
from pathlib import Path
from quantlab.engines.llamacpp import find_llamacpp
from quantlab.engines.serving import llama_server
with llama_server(find_llamacpp(), sys.argv[1], log_dir=Path(sys.argv[2]), name="s", threads=1,
                  parallel=1, ctx_per_slot=64):
    print("up", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_server_outlives_quantlab_interrupted_or_killed(tiny_gguf, tmp_path, sig):
    """A real quantlab process holding a llama-server: Ctrl-C unwinds through the server's
    stop; SIGKILL (no cleanup runs) takes the server with it (it dies with its parent)."""
    tools = _tools()
    logs = tmp_path / "logs"
    env = dict(os.environ, QUANTLAB_LLAMACPP=str(tools.bin_dir))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLEEPER, str(tiny_gguf), str(logs)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout.readline().strip() == "up"
        assert processes_in(logs)  # the server, in its own process group
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert _gone(logs), f"left running after {sig.name}: {processes_in(logs)}"
    finally:
        proc.kill()
        for pid in processes_in(logs):
            os.kill(pid, signal.SIGKILL)


def test_the_serving_plot_draws_every_served_series_and_skips_errors():
    """One line per (method, engine, dtype) in both panels; error records and rows without
    serving are left out; a run nobody served has no plot."""
    from quantlab.report.serving import serving_plot, serving_records

    def rec(engine, dtype, c, tok, **kw):
        return {
            "engine": engine,
            "dtype": dtype,
            "concurrency": c,
            "threads": 2,
            "output_tokens_per_s": tok,
            "tpot_ms_p99": 1000 * c / tok,
            "build": "b",
            "input_tokens": 16,
            "output_tokens": 8,
            **kw,
        }

    metrics = {
        "baseline": {
            "backend": "none",
            "serving": [rec("vllm", "float32", c, 10.0 * c) for c in (1, 8)]
            + [rec("llamacpp", "F32", c, 30.0 * c) for c in (1, 8)],
        },
        "q4": {
            "backend": "rtn",
            "serving": [rec("llamacpp", "Q4_0", c, 50.0 * c) for c in (1, 8)]
            + [{"engine": "vllm", "dtype": "-", "concurrency": 1, "error": "refused"}],
        },
        "no-serving": {"backend": "rtn"},
    }
    assert len(serving_records(metrics)) == 6
    fig = serving_plot(metrics)
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]
    assert serving_plot({"a": {"backend": "none"}}) is None


_TABLE = """
import sys
from pathlib import Path
from quantlab.engines.llamacpp import find_llamacpp
from quantlab.engines.serving import serving_table
from quantlab.engines.vllm import find_vllm
e = {"engine": "llamacpp", "method": "f", "dtype": "F32", "dir": sys.argv[1], "float": True,
     "name": "f", "tokenizer": sys.argv[3]}
try:
    serving_table(find_vllm(), [e], concurrency=[1], requests=500, input_tokens=16,
                  output_tokens=64, rounds=1, log_dir=Path(sys.argv[2]), llamacpp=find_llamacpp(),
                  threads=1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_during_a_load_stops_the_generator_and_the_server(
    tiny_model_dir, tiny_gguf, tmp_path
):
    """Ctrl-C while vLLM's load generator is loading llama-server: the generator's group and
    the server are stopped, nothing is left in the log directory's processes."""
    tools, _ = _tools(), _vllm()
    logs = tmp_path / "logs"
    env = dict(os.environ, QUANTLAB_LLAMACPP=str(tools.bin_dir))
    proc = subprocess.Popen(
        [sys.executable, "-c", _TABLE, str(tiny_gguf), str(logs), str(tiny_model_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        t0 = time.monotonic()
        while not list(logs.glob("f.c1.*.log")) and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        time.sleep(3)  # the generator is importing vLLM or sending requests
        assert proc.poll() is None and len(processes_in(logs)) >= 2  # server and generator
        proc.send_signal(signal.SIGINT)
        assert proc.communicate(timeout=60)[0].strip() == "interrupted"
        assert _gone(logs), f"left running after Ctrl-C: {processes_in(logs)}"
    finally:
        proc.kill()
        for pid in processes_in(logs):
            os.kill(pid, signal.SIGKILL)


def test_a_build_without_llama_server_serves_nothing_but_runs_the_rest(tmp_path, monkeypatch):
    """llama-server is needed by serving only: its absence is one error there, and a build
    from before it (the old directory) is still found for everything else."""
    from quantlab.engines import llamacpp
    from quantlab.errors import QuantlabError

    tools = llamacpp.LlamaCpp(tmp_path, "llama.cpp (test)")
    with pytest.raises(QuantlabError, match="llama-server is not in .*scripts/llamacpp.sh"):
        tools.server()
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    old = tmp_path / "cache" / "llamacpp" / llamacpp.OLD_BUILD_NAME / "bin"
    old.mkdir(parents=True)
    assert llamacpp.default_bin_dir() == old
    new = tmp_path / "cache" / "llamacpp" / llamacpp.BUILD_NAME / "bin"
    new.mkdir(parents=True)
    assert llamacpp.default_bin_dir() == new
