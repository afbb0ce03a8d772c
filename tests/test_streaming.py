"""Streaming (quantlab.streaming): models read lazily from safetensors shards, quantized and
scored one decoder layer at a time. The key property: the streamed RTN, GPTQ and AWQ exports of a
model are the in-memory backends' exports byte for byte, and the streamed perplexity is the
whole model's."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlab.bench.divergence import ReferenceLogprobs
from quantlab.bench.perplexity import make_plan, perplexity
from quantlab.checkpoint import export_checkpoint, load_checkpoint
from quantlab.errors import QuantlabError
from quantlab.models import load_model
from quantlab.progress import Progress
from quantlab.quantizers.awq import AWQ, AWQConfig
from quantlab.quantizers.gptq import GPTQ, GPTQConfig
from quantlab.quantizers.rtn import RTN, RTNConfig
from quantlab.scoring import compute_reference, evaluate
from quantlab.streaming.layerwise import quantize_streaming
from quantlab.streaming.methods import layer_method
from quantlab.streaming.score import (
    streaming_evaluate,
    streaming_perplexity,
    streaming_reference,
)
from quantlab.streaming.shards import INDEX, ShardedSource
from quantlab.streaming.writer import ShardWriter

CPU = torch.device("cpu")
QUIET = {"log": lambda _m: None}
SOURCE = {"source": "tiny"}
CAL = torch.randint(3, 380, (6, 64), generator=torch.Generator().manual_seed(0))


def _in_memory(model_dir: Path, backend, out: Path) -> dict:
    """The in-memory backend's export of the model; its per-layer statistics."""
    lm = load_model(str(model_dir), dtype=torch.float32, device=CPU)
    done = backend.quantize(lm.model, CAL if backend.needs_calibration else None)
    export_checkpoint(done, lm.tokenizer, backend, out, source=SOURCE, label="m")
    return getattr(done, "layer_stats", None) or getattr(backend, "layer_stats", {})


def _sidecar(ckpt: Path) -> dict:
    meta = json.loads((ckpt / "quantlab.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("mtime_ns", "sidecar_sha256")}


@pytest.mark.parametrize(
    "backend,options",
    [
        ("rtn", dict(bits=4, group_size=32)),
        ("rtn", dict(bits=4, group_size=16, scale_search="importance", search_grid=10)),
        (
            "rtn",
            dict(
                bits=3, group_size=16, sym=False, scale_search="mse", module_bits={"*.down_proj": 8}
            ),
        ),
        ("gptq", dict(bits=4, group_size=32, batch_size=4)),
        ("gptq", dict(bits=4, group_size=16, act_order=True, sym=False, batch_size=4)),
        # the grouped path: q/k/v and gate/up share Hessians by the input tensor they read
        ("gptq", dict(bits=8, group_size=-1, true_sequential=False, batch_size=4)),
        # AWQ: scales folded into the norms, the AutoAWQ gemm layout; and the GPTQ layout,
        # calibrated on quantized outputs, candidates scored by forward passes
        ("awq", dict(bits=4, group_size=32, search_tokens=256, batch_size=4)),
        (
            "awq",
            dict(
                bits=3,
                group_size=16,
                format="gptq",
                next_inputs="quantized",
                score_on="forward",
                search_tokens=128,
                module_bits={"*.down_proj": 8},
            ),
        ),
    ],
)
def test_streamed_export_is_the_in_memory_export_byte_for_byte(
    tiny_model_dir, tmp_path, backend, options
):
    cls, cfg = {"rtn": (RTN, RTNConfig), "gptq": (GPTQ, GPTQConfig), "awq": (AWQ, AWQConfig)}[
        backend
    ]
    stats = _in_memory(tiny_model_dir, cls(cfg(**options)), tmp_path / "whole")
    got = quantize_streaming(
        tiny_model_dir,
        tmp_path / "streamed",
        layer_method(backend, options),
        calibration=CAL,
        source=SOURCE,
        label="m",
        **QUIET,
    )
    whole, streamed = _sidecar(tmp_path / "whole"), _sidecar(tmp_path / "streamed")
    # the manifest holds every file's sha256: weights, config.json, tokenizer, generation config
    assert streamed == whole
    assert got.layer_stats == stats and got.modules == whole["modules"]
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary directory left beside it
    parts = {"read weights", "quantize", "write shards", "finish export"}
    assert set(got.stage_seconds) == parts and sum(got.stage_seconds.values()) <= got.quantize_s


def test_grouped_gptq_shares_a_hessian_only_between_linears_that_read_one_tensor(tiny_model_dir):
    """GPTQ's grouped path (true_sequential off) gives q/k/v one Hessian and gate/up one; by
    the input's address alone, gate/up were sometimes given o_proj's (the address of o_proj's
    freed input reused for the MLP's): the streamed path holds the tensor. Repeated, since
    the old flaw showed in about one run of five."""
    from quantlab.quantizers.sequential import first_layer_inputs
    from quantlab.streaming.methods import _group_hessians

    model = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU).model
    layer = model.model.layers[0]
    hidden, kwargs = first_layer_inputs(model, model.model.layers, CAL, 4)
    mine = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    want = {
        "self_attn.k_proj": "self_attn.q_proj",
        "self_attn.v_proj": "self_attn.q_proj",
        "mlp.up_proj": "mlp.gate_proj",
    }
    for _ in range(12):
        hess, count, shares = _group_hessians(layer, mine, tuple(mine), hidden, kwargs)
        assert shares == want
        assert set(hess) == set(mine) - set(want) and count["self_attn.o_proj"] == CAL.numel()


def test_sharded_export_holds_the_same_tensors_and_scores_the_same(tiny_model_dir, tmp_path):
    opts = dict(bits=4, group_size=32)
    quantize_streaming(tiny_model_dir, tmp_path / "one", layer_method("rtn", opts), **QUIET)
    res = quantize_streaming(
        tiny_model_dir,
        tmp_path / "many",
        layer_method("rtn", opts),
        max_shard_bytes=40_000,
        **QUIET,
    )
    assert len(res.files) > 2 and all(f.startswith("model-0") for f in res.files)
    index = json.loads((tmp_path / "many" / INDEX).read_text())
    shards = {tmp_path / "many" / f for f in res.files}
    per_shard = {f: load_file(f) for f in shards}
    tensors = {k: v for held in per_shard.values() for k, v in held.items()}
    # within the budget (+ its header), or one tensor larger than the budget on its own
    assert all(
        sum(t.numel() * t.element_size() for t in held.values()) <= 40_000 or len(held) == 1
        for held in per_shard.values()
    )
    assert any(len(held) == 1 for held in per_shard.values())  # the 98 kB embedding
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert set(index["weight_map"].values()) == set(res.files)
    one = load_file(tmp_path / "one" / "model.safetensors")
    assert one.keys() == tensors.keys() and all(torch.equal(one[k], tensors[k]) for k in one)
    ids = torch.randint(0, 380, (64 * 4,), generator=torch.Generator().manual_seed(2))
    plan = make_plan("gptq", ids=ids, seq_len=64)
    a = streaming_perplexity(tmp_path / "one", plan, 3, **QUIET)
    b = streaming_perplexity(tmp_path / "many", plan, 3, **QUIET)
    assert a.ppl == b.ppl
    # and the sharded checkpoint loads whole (load_checkpoint reads the index and its shards)
    whole = [
        load_checkpoint(tmp_path / d, dtype=torch.float32, device=CPU).model
        for d in ("one", "many")
    ]
    with torch.inference_mode():
        assert torch.equal(whole[0](ids[None, :64]).logits, whole[1](ids[None, :64]).logits)


@pytest.mark.parametrize("convention", ["gptq", "strided"])
def test_streamed_perplexity_and_kl_equal_the_whole_models(tiny_model_dir, tmp_path, convention):
    ids = torch.randint(0, 380, (64 * 5 + 7,), generator=torch.Generator().manual_seed(1))
    plan = make_plan(convention, ids=ids, seq_len=64, stride=24)
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU).model
    whole = perplexity(base, plan, 3)
    assert streaming_perplexity(tiny_model_dir, plan, 3, **QUIET).nll_mean == whole.nll_mean
    ref = compute_reference(base, plan, tmp_path / "ref", 3, key="k")
    quantize_streaming(
        tiny_model_dir,
        tmp_path / "q",
        layer_method("gptq", dict(bits=3, group_size=32)),
        calibration=CAL,
        **QUIET,
    )
    q = load_checkpoint(tmp_path / "q", dtype=torch.float32, device=CPU).model
    ppl, div = evaluate(q, plan, 3, ReferenceLogprobs.open(tmp_path / "ref"))
    s_ppl, s_div = streaming_evaluate(
        tmp_path / "q", plan, 3, ReferenceLogprobs.open(tmp_path / "ref"), **QUIET
    )
    assert s_ppl.nll_mean == ppl.nll_mean and s_ppl.ppl != whole.ppl
    assert s_div["kld_mean"] == div["kld_mean"] > 0 and s_div == div
    # the base's distributions computed streamed are the same bytes
    streamed = streaming_reference(tiny_model_dir, plan, tmp_path / "sref", 3, key="k", **QUIET)
    for name in ("logprobs.u16", "rows.npy"):
        assert (tmp_path / "sref" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert streamed.meta["ppl"] == ref.meta["ppl"]


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def sharded(tiny_model_dir, tmp_path) -> Path:
    """The tiny float model as three shards with their index (config and tokenizer beside)."""
    out = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    w = ShardWriter(out, max_shard_bytes=60_000)
    for k, v in load_file(tiny_model_dir / "model.safetensors").items():
        w.add(k, v)
    assert len(w.close()["files"]) >= 3
    return out


def _index(d: Path) -> dict:
    return json.loads((d / INDEX).read_text())


def test_a_sharded_source_reads_what_the_single_file_holds(tiny_model_dir, sharded):
    whole = load_file(tiny_model_dir / "model.safetensors")
    got = ShardedSource(sharded).read(list(whole))
    assert all(torch.equal(got[k], whole[k]) for k in whole)
    assert ShardedSource(sharded).total_bytes == _index(sharded)["metadata"]["total_size"]


def _rewrite_index(d: Path, change) -> None:
    doc = _index(d)
    change(doc["weight_map"])
    (d / INDEX).write_text(json.dumps(doc))


def test_a_shard_missing_from_the_directory(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(
        QuantlabError, match=f"shard '.*{victim.name}' named by index .* is missing"
    ):
        ShardedSource(sharded)


def test_a_truncated_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 100)
    with pytest.raises(QuantlabError, match=f"'.*{victim.name}' is truncated: tensor"):
        ShardedSource(sharded)


def test_an_index_pointing_outside_the_model_directory(sharded, tmp_path):
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    shutil.copy(first, tmp_path / "elsewhere.safetensors")
    _rewrite_index(
        sharded,
        lambda m: m.update(
            {k: "../elsewhere.safetensors" for k, v in m.items() if v == first.name}
        ),
    )
    with pytest.raises(
        QuantlabError, match="names shard '../elsewhere.safetensors', which is outside"
    ):
        ShardedSource(sharded)


def test_shards_that_are_links_elsewhere_are_read_as_the_hub_cache_keeps_them(sharded, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in sorted(sharded.glob("model-*.safetensors")):
        f.rename(blobs / f.name)
        f.symlink_to(blobs / f.name)
    assert ShardedSource(sharded).total_bytes == _index(sharded)["metadata"]["total_size"]


def test_a_tensor_listed_twice(sharded, tiny_model_dir):
    # in the index's JSON (json would silently keep the last), and stored in two shards
    text = (sharded / INDEX).read_text()
    name, shard = next(iter(_index(sharded)["weight_map"].items()))
    dup = text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{shard}", ', 1)
    (sharded / INDEX).write_text(dup)
    with pytest.raises(QuantlabError, match=f"lists '{name}' twice"):
        ShardedSource(sharded)
    _rewrite_index(sharded, lambda m: None)  # a clean index again
    extra = ShardWriter(sharded / "x")
    extra.add(name, load_file(tiny_model_dir / "model.safetensors")[name])
    extra.close()
    (sharded / "x" / "model.safetensors").rename(sharded / "model-extra.safetensors")
    _rewrite_index(sharded, lambda m: m.update({"extra.weight": "model-extra.safetensors"}))
    with pytest.raises(QuantlabError, match=f"tensor '{name}' is stored twice"):
        ShardedSource(sharded)


def test_a_directory_without_weights_or_index(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(QuantlabError, match="without model.safetensors.index.json: add the index"):
        ShardedSource(tmp_path)


_FILL = """
import resource, signal, sys, torch
from pathlib import Path
from quantlab.errors import QuantlabError
from quantlab.streaming.writer import ShardWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
w = ShardWriter(Path(sys.argv[1]))
try:
    for i in range(10):
        w.add(f"t{i}", torch.ones(20_000))
    w.close()
except QuantlabError as e:
    w.abort()
    print(e)
"""


def test_no_room_to_write_is_one_error_and_nothing_is_left(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _FILL, str(out)], capture_output=True, text=True, timeout=120
    )
    assert "cannot write" in proc.stdout and "ulimit -f" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


def test_a_full_disk_removes_the_partial_export(tiny_model_dir, tmp_path):
    """A real ENOSPC from a 150 kB tmpfs (root only: elsewhere this test says why it skips)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with pytest.raises(
            QuantlabError, match="the disk is full .* the partial export was removed"
        ):
            quantize_streaming(
                tiny_model_dir, disk / "ckpt", layer_method("rtn", dict(group_size=32)), **QUIET
            )
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --------------------------------------------------------------------------- progress


def test_progress_lines_every_tenth_or_minute_with_the_time_left():
    now = [0.0]
    lines: list[str] = []
    p = Progress(40, "gptq: quantize", log=lines.append, clock=lambda: now[0])
    for _ in range(39):
        now[0] += 2.0
        p.step()
    assert len(lines) == 9  # 10%, 20%, ... 90%
    assert lines[0] == "gptq: quantize: 4/40 layers (10%), 8s, about 1m12s left"
    now[0] += 2.0
    p.step()
    p.done()
    assert lines[-1] == "gptq: quantize: 40/40 layers done in 1m20s"
    slow, lines[:] = Progress(1000, "score", log=lines.append, clock=lambda: now[0]), []
    now[0] += 61
    slow.step()  # 0.1% done, but a minute passed
    assert lines == ["score: 1/1000 layers (0%), 1m01s, about 16h55m left"]


def test_a_layer_that_cannot_fit_is_said_before_any_work(tiny_model_dir):
    from quantlab.streaming.layerwise import check_layer_fits, largest_layer_bytes, open_walk

    walk = open_walk(tiny_model_dir, torch.float32, CPU, ["lm_head"])
    layer = largest_layer_bytes(walk.model, walk.layers, torch.float32)
    # q, o: 64x64; k, v: 32x64; gate, up, down: 128x64; two norms of 64, in float32
    assert layer == (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) * 4
    check_layer_fits(layer, 10 * layer, CPU)
    with pytest.raises(QuantlabError, match=r"one decoder layer .* needs about .* GiB on cpu"):
        check_layer_fits(layer, layer, CPU)


def test_every_backend_says_what_it_needs_in_memory():
    from quantlab.registry import backend_names
    from quantlab.streaming.methods import METHODS, memory_needs

    for name in backend_names():
        streams = memory_needs(name).startswith("streams")
        assert streams == (name in METHODS), name
    assert memory_needs("awq") == AWQ.memory  # the backend's own class attribute, where set


def test_a_long_unit_still_gets_its_minute_line():
    """Inside ``with``, a line comes every ``every_s`` even while one unit runs (real time,
    scaled down: every 0.2 s, a unit of 0.7 s)."""
    import time

    lines: list[str] = []
    with Progress(2, "gptq: quantize", log=lines.append, every_s=0.2) as p:
        time.sleep(0.7)
        p.step()
    assert any(line.endswith("; layer 1 under way") for line in lines[:-1]), lines
    assert lines[-1].startswith("gptq: quantize: 1/2 layers done in")


def test_a_sharded_source_quantizes_to_the_same_checkpoint(tiny_model_dir, sharded, tmp_path):
    opts = dict(bits=4, group_size=32, batch_size=4)
    for name, src in (("from-single", tiny_model_dir), ("from-shards", sharded)):
        quantize_streaming(
            src,
            tmp_path / name,
            layer_method("gptq", opts),
            calibration=CAL,
            source=SOURCE,
            label="m",
            **QUIET,
        )
    assert _sidecar(tmp_path / "from-single") == _sidecar(tmp_path / "from-shards")


def test_why_a_method_does_not_stream():
    from quantlab.streaming.methods import why_not_streamed

    assert why_not_streamed("rtn", {"bits": 4, "scale_search": "importance"}) is None
    assert why_not_streamed("gptq", {"bits": 3, "act_order": True}) is None
    assert why_not_streamed("awq", {"bits": 4, "score_on": "forward"}) is None
    assert "hqq" in why_not_streamed("hqq", {})
    assert "engine: quantlab" in why_not_streamed("gptq", {"engine": "gptqmodel"})
    assert "bits: auto" in why_not_streamed("rtn", {"bits": "auto", "bits_budget": 4.5})
    assert "skip: auto" in why_not_streamed("gptq", {"skip": "auto"})
    with pytest.raises(Exception, match="group_size"):  # options are the backend's own Config's
        why_not_streamed("rtn", {"group_size": 0})


def test_float8_tensors_are_sharded_and_read_back(tmp_path):
    """quanto's float8 weights go through the shard writer (checkpoints past 5 GB)."""
    from quantlab.quantizers.base import read_weights
    from quantlab.streaming.writer import ShardWriter

    t = {
        "a": torch.randn(8, 16).to(torch.float8_e4m3fn),
        "b": torch.randn(4, 4).to(torch.float8_e5m2),
        "c": torch.randn(32, 32),
    }
    writer = ShardWriter(tmp_path, 600)
    for name, x in t.items():
        writer.add(name, x)
    writer.close()
    back = read_weights(tmp_path / "model.safetensors")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert all(
        back[k].dtype == x.dtype and torch.equal(back[k].view(torch.uint8), x.view(torch.uint8))
        for k, x in t.items()
    )
