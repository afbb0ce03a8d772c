"""Reliability pass of issue 26 for runs, checkpoints and the Python API:

2. a finished run's checkpoint never changes through its source (no hard links), and a
   checkpoint changed in place is named by the report, compare and resume;
3. ``quantlab.save`` writes nowhere inside a run, report or checkpoint, and removes only the
   temporary directories quantlab can prove it wrote;
4. the Python API's wrong arguments are quantlab's own errors, not tracebacks;
and the minor items: a sidecar's options are validated on load, a damaged results.parquet and
runs made with other library versions are said in the report's warnings."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantlab
from quantlab.atomicdir import TMP_MARKER
from quantlab.checkpoint import (
    CLONE_MIN_BYTES,
    changes_since_export,
    export_checkpoint,
    share_source_files,
    sidecar_digest,
    verify_checkpoint,
)
from quantlab.cli import main
from quantlab.errors import QuantlabError

RECIPE = """
name: rel26
model: {{source: "{model}"}}
methods:
  - {{label: rtn-w4, backend: rtn, options: {{bits: 4, group_size: 32}}}}
eval: {{seq_len: 64, max_windows: 2, batch_size: 2, speed: {{enabled: false}}}}
output: {{dir: "{out}"}}
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _flip_in_place(path: Path) -> None:
    """What a tool that edits weights in place does: same file, same size, other bytes."""
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
        f.seek(-8, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in tail))


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's tokenizer with weights above CLONE_MIN_BYTES, stored as the float
    baseline's export stores them (byte-identical: the case where quantlab shares files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantlab.quantizers.base import save_weights

    out = tmp_path_factory.mktemp("wide") / "model"
    shutil.copytree(tiny_model_dir, out)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 128, 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    save_weights(model, out / "model.safetensors")
    assert (out / "model.safetensors").stat().st_size > CLONE_MIN_BYTES
    return out


@pytest.fixture(scope="module")
def finished_run(wide_model_dir, tmp_path_factory) -> Path:
    """A finished run (baseline + rtn-w4) on the wide model; tests work on copies of it."""
    root = tmp_path_factory.mktemp("finished")
    recipe = root / "r.yaml"
    recipe.write_text(RECIPE.format(model=wide_model_dir, out=root / "run"))
    assert main(["run", str(recipe)]) == 0
    return root / "run"


def _copy_run(run: Path, dest: Path, **kw) -> tuple[Path, Path]:
    """A copy of ``run`` (times kept unless told otherwise) and a recipe that writes into it."""
    shutil.copytree(run, dest, **kw)
    recipe = dest.parent / f"{dest.name}.yaml"
    model = quantlab.load_metrics(run)["baseline"]["model"]
    recipe.write_text(RECIPE.format(model=model, out=dest))
    return dest, recipe


# --------------------------------------------------------------------------- 2. no hard links


REFLINK_DIR = os.environ.get("QUANTLAB_TEST_REFLINK_DIR")


ON_REFLINK_FS = pytest.mark.skipif(
    not REFLINK_DIR,
    reason="set QUANTLAB_TEST_REFLINK_DIR to a "
    "directory on btrfs or XFS (reflink=1) to test clones too",
)


@pytest.mark.parametrize("where", ["tmp", pytest.param("reflink", marks=ON_REFLINK_FS)])
def test_a_checkpoint_keeps_its_bytes_when_its_source_is_edited_in_place(
    where, wide_model_dir, tmp_path
):
    """The rule of share_source_files: never one inode with the source; a copy-on-write clone
    where the file system makes one, else a copy. Before issue 26: a hard link, so an edit of
    the source in place changed the finished run's baseline."""
    from quantlab.models import load_model
    from quantlab.quantizers.none import NoQuant

    root = Path(REFLINK_DIR) / f"ql-{os.getpid()}" if where == "reflink" else tmp_path
    src_dir = shutil.copytree(wide_model_dir, root / "model")
    try:
        lm = load_model(str(src_dir), dtype=torch.float32, device=torch.device("cpu"))
        ckpt = export_checkpoint(
            lm.model,
            lm.tokenizer,
            NoQuant(),
            root / "run" / "ckpt",
            source={"path": str(src_dir)},
            label="baseline",
        )
        weights, src = ckpt / "model.safetensors", src_dir / "model.safetensors"
        assert _sha(weights) == _sha(src)  # the case where quantlab may share storage
        assert weights.stat().st_ino != src.stat().st_ino and weights.stat().st_nlink == 1
        if where == "reflink":  # the clone itself: what this file system makes instead of a copy
            assert share_source_files(ckpt, src_dir) == ["model.safetensors"]
        before = _sha(weights)
        _flip_in_place(src)
        assert _sha(weights) == before
        verify_checkpoint(ckpt)
        assert changes_since_export(ckpt) == []
    finally:
        if where == "reflink":
            shutil.rmtree(root, ignore_errors=True)


def test_a_runs_baseline_is_not_linked_to_its_source(finished_run, wide_model_dir):
    weights = finished_run / "baseline" / "checkpoint" / "model.safetensors"
    assert _sha(weights) == _sha(wide_model_dir / "model.safetensors")
    assert weights.stat().st_nlink == 1
    assert weights.stat().st_ino != (wide_model_dir / "model.safetensors").stat().st_ino


def test_a_checkpoint_changed_in_place_is_named_by_report_and_compare(
    finished_run, tmp_path, capsys
):
    run, _ = _copy_run(finished_run, tmp_path / "edited")
    _flip_in_place(run / "rtn-w4" / "checkpoint" / "model.safetensors")
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "the checkpoint of rtn-w4 changed since it was scored" in html
    capsys.readouterr()
    assert main(["compare", str(run), str(finished_run), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "run edited: the checkpoint of rtn-w4 changed since it was scored" in out, out
    assert "baseline changed" not in out and f"run {finished_run.name}: the checkpoint" not in out


def test_resume_does_not_reuse_a_method_whose_checkpoint_changed(finished_run, tmp_path, capsys):
    run, recipe = _copy_run(finished_run, tmp_path / "run")
    _flip_in_place(run / "rtn-w4" / "checkpoint" / "model.safetensors")
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "baseline: finished earlier with the same settings; reusing it" in err
    assert "rtn-w4: finished earlier" not in err
    assert "rtn-w4: the checkpoint exported earlier cannot be reused" in err
    assert "rtn-w4: quantize" in err
    verify_checkpoint(run / "rtn-w4" / "checkpoint")
    assert quantlab.caveats(run) == quantlab.caveats(finished_run)


def test_copies_and_older_checkpoints_are_checked_by_their_sha256(finished_run, tmp_path):
    """A run copied without its times is not reported as changed (the sha256 decides where
    size or time differ); a manifest of an earlier quantlab (no times) still loads and is
    checked in full; an edit that restores the time escapes the quick check, not the load."""
    run, _ = _copy_run(finished_run, tmp_path / "run", copy_function=shutil.copy)
    ckpt = run / "rtn-w4" / "checkpoint"
    assert not any("changed since" in w for w in quantlab.caveats(run))
    meta = json.loads((ckpt / "quantlab.json").read_text())
    del meta["mtime_ns"]
    meta["sidecar_sha256"] = sidecar_digest(meta)
    (ckpt / "quantlab.json").write_text(json.dumps(meta))
    quantlab.load(ckpt)
    assert changes_since_export(ckpt) == []
    weights = ckpt / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    _flip_in_place(weights)
    os.utime(weights, ns=(stamp, stamp))
    changes = changes_since_export(ckpt)
    assert changes and "does not match its manifest" in changes[0]
    with pytest.raises(QuantlabError, match="does not match its manifest"):
        quantlab.load(ckpt)


# --------------------------------------------------------------------------- 3. save's place


@pytest.fixture()
def quantized(tiny):
    model, tok = tiny
    cfg = quantlab.config("rtn", bits=8, group_size=32)
    return quantlab.quantize(copy.deepcopy(model), cfg), tok


@pytest.mark.parametrize(
    "target",
    [
        "rtn-w4/checkpoint",
        "mine",
        "rtn-w4/mine",
        "baseline/checkpoint/sub",
        "alias/mine",
        "report/mine",
        "ckpt/inner",
    ],
)
def test_save_writes_nothing_inside_a_run_report_or_checkpoint(
    target, finished_run, quantized, tmp_path
):
    from quantlab.rundir import prepare_run_dir

    run, _ = _copy_run(finished_run, tmp_path / "run")
    prepare_run_dir(tmp_path / "report", kind="report")  # what a report writes first
    quantlab.save(*quantized[:1], tmp_path / "ckpt", tokenizer=quantized[1])
    (tmp_path / "alias").symlink_to(run, target_is_directory=True)
    base = run if target.split("/")[0] not in ("report", "ckpt", "alias") else tmp_path
    before = {d: _tree(tmp_path / d) for d in ("run", "report", "ckpt")}
    inside = r"is inside the quantlab (run|report|checkpoint) directory"
    with pytest.raises(QuantlabError, match=inside):
        quantlab.save(quantized[0], base / target, tokenizer=quantized[1])
    assert {d: _tree(tmp_path / d) for d in ("run", "report", "ckpt")} == before


def test_save_still_replaces_a_checkpoint_of_its_own(quantized, tmp_path):
    model, tok = quantized
    first = quantlab.save(model, tmp_path / "ckpt", tokenizer=tok, source="tiny")
    again = quantlab.save(model, tmp_path / "ckpt", tokenizer=tok, source="tiny again")
    assert first == again
    assert json.loads((again / "quantlab.json").read_text())["source"]["source"] == "tiny again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left
    assert not (again / TMP_MARKER).exists()


def _ended_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_save_removes_only_temporary_exports_it_can_prove_are_its_own(quantized, tmp_path):
    """Before issue 26 every ``NAME.tmp-*`` beside the target was deleted, whoever owned it."""
    import socket

    model, tok = quantized

    def leftover(name: str, marker: dict | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "thesis.txt").write_text("precious")
        if marker is not None:
            (d / TMP_MARKER).write_text(json.dumps(marker))
        return d

    host = socket.gethostname()
    kept = [
        leftover("keep.tmp-notmine", None),
        leftover("keep.tmp-123", None),
        leftover("keep.tmp-live", {"pid": os.getpid(), "host": host}),
        leftover("keep.tmp-elsewhere", {"pid": _ended_pid(), "host": host + "-other"}),
        leftover("keep.tmp-odd", {"pid": "1", "host": host}),
    ]
    stale = leftover("keep.tmp-killed", {"pid": _ended_pid(), "host": host})
    quantlab.save(model, tmp_path / "keep", tokenizer=tok)
    assert all((d / "thesis.txt").read_text() == "precious" for d in kept)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep", *(d.name for d in kept)])


# --------------------------------------------------------------------------- 4. API arguments


def _gptq():
    return quantlab.config("gptq", bits=4, group_size=32)


def _rtn():
    return quantlab.config("rtn", bits=4, group_size=32)


def _ids(rows: int, cols: int, value: int) -> torch.Tensor:
    return torch.full((rows, cols), value, dtype=torch.long)


def _save(m, path, **kw):
    return quantlab.save(quantlab.quantize(m, _rtn()), path, **kw)


# (call(model, tokenizer, path), the message); before issue 26 each raised a traceback of
# torch, Python or pandas (IndexError, ZeroDivisionError, RuntimeError, AttributeError,
# TypeError) or, for stride without strided and a misspelt option, was silently accepted
API_MISTAKES = {
    "ids above the vocabulary": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), calibration=_ids(2, 32, 10**6)),
        "token id 1000000, outside this model's vocabulary",
    ),
    "negative ids": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), calibration=_ids(2, 32, -3)),
        "token id -3, outside",
    ),
    "ids of another tokenizer": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), calibration=_ids(1, 8, 384)),
        r"token id 384, outside this model's vocabulary \(0 to 383\)",
    ),
    "empty calibration": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), calibration=_ids(0, 32, 1)),
        "calibration holds no tokens",
    ),
    "samples=0": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), tokenizer=t, samples=0),
        "samples must be >= 1, not 0",
    ),
    "samples as text": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), tokenizer=t, samples="4"),
        "samples must be an integer",
    ),
    "seq_len=0": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), tokenizer=t, seq_len=0),
        "seq_len must be >= 1",
    ),
    "seed as text": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), tokenizer=t, seed="x"),
        "seed must be an integer",
    ),
    "a tokenizer that is not one": (
        lambda m, t, p: quantlab.quantize(m, _gptq(), tokenizer="tok"),
        "tokenizer must be the model's transformers tokenizer",
    ),
    "a model that is not one": (
        lambda m, t, p: quantlab.quantize("model", _rtn()),
        "model must be a transformers",
    ),
    "save without tokenizer": (
        lambda m, t, p: _save(m, p, tokenizer=None),
        "save needs the model's tokenizer",
    ),
    "save to no path": (lambda m, t, p: _save(m, None, tokenizer=t), "path must be a path"),
    "save with a numeric source": (
        lambda m, t, p: _save(m, p, tokenizer=t, source=5),
        "source must be a non-empty string",
    ),
    "evaluate max_windows=-1": (
        lambda m, t, p: quantlab.evaluate(p, max_windows=-1),
        "max_windows must be >= 1, not -1",
    ),
    "evaluate seq_len=0": (lambda m, t, p: quantlab.evaluate(p, seq_len=0), "seq_len must be >= 1"),
    "evaluate batch_size=0": (
        lambda m, t, p: quantlab.evaluate(p, batch_size=0),
        "batch_size must be >= 1",
    ),
    "evaluate a misspelt option": (
        lambda m, t, p: quantlab.evaluate(p, max_windowz=2),
        "did you mean 'max_windows'",
    ),
    "evaluate max_windows as text": (
        lambda m, t, p: quantlab.evaluate(p, max_windows="2"),
        "max_windows must be an integer",
    ),
    "evaluate stride without strided": (
        lambda m, t, p: quantlab.evaluate(p, stride=16),
        "stride applies to the strided convention",
    ),
    "evaluate cache_base without base": (
        lambda m, t, p: quantlab.evaluate(p, cache_base=False),
        "cache_base=False applies to base",
    ),
    "load with an unknown dtype": (
        lambda m, t, p: quantlab.load(p, dtype="float33"),
        "did you mean 'float32'",
    ),
    "load_model with a misspelt option": (
        lambda m, t, p: quantlab.load_model(p, verfy=False),
        "did you mean 'verify'",
    ),
    "config of a non-name": (
        lambda m, t, p: quantlab.config(5),
        "backend must be a non-empty string",
    ),
    "load_results of a number": (
        lambda m, t, p: quantlab.load_results(5),
        "must be a path or a list of paths",
    ),
    "run_recipe of a number": (lambda m, t, p: quantlab.run_recipe(5), "recipe must be a Recipe"),
    "summary_table of text": (
        lambda m, t, p: quantlab.summary_table("x"),
        "summary_table takes the DataFrame",
    ),
}


@pytest.mark.parametrize("case", list(API_MISTAKES))
def test_api_mistakes_are_quantlab_errors(case, tiny, tmp_path):
    model, tok = tiny
    call, message = API_MISTAKES[case]
    with pytest.raises(QuantlabError, match=message):
        call(copy.deepcopy(model), tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- minor items


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bits", "four", r"options\.bits.*got 'four'"),
        ("nonsense", 1, r"options\.nonsense: unknown key"),
    ],
)
def test_a_resigned_sidecar_with_invalid_options_is_refused(
    key, value, message, quantized, tmp_path
):
    ckpt = quantlab.save(quantized[0], tmp_path / "ckpt", tokenizer=quantized[1])
    meta = json.loads((ckpt / "quantlab.json").read_text())
    meta["options"][key] = value
    meta["sidecar_sha256"] = sidecar_digest(meta)  # signed: only the options check can see it
    (ckpt / "quantlab.json").write_text(json.dumps(meta))
    invalid = f"sidecar's options are not valid rtn options.*{message}"
    with pytest.raises(QuantlabError, match=invalid):
        quantlab.load(ckpt)


@pytest.mark.parametrize("damage", ["garbage", "other rows"])
def test_a_damaged_or_different_results_parquet_is_a_report_warning(damage, finished_run, tmp_path):
    import pandas as pd

    run, _ = _copy_run(finished_run, tmp_path / "run")
    if damage == "garbage":
        (run / "results.parquet").write_bytes(b"PAR1 not really")
    else:
        frame = pd.read_parquet(run / "results.parquet")
        frame.loc[1, "ppl"] = 1.0
        frame.to_parquet(run / "results.parquet")
    assert main(["report", str(run)]) == 0
    needle = "cannot be read" if damage == "garbage" else "does not match results.csv"
    assert needle in (run / "report.html").read_text()
    assert any("results.parquet" in w and needle in w for w in quantlab.caveats(run))
    assert not any("results.parquet" in w for w in quantlab.caveats(finished_run))


def test_runs_made_with_other_library_versions_are_a_compare_caveat(finished_run, tmp_path, capsys):
    run, _ = _copy_run(finished_run, tmp_path / "older")
    env = json.loads((run / "environment.json").read_text())
    torch_now = env["packages"]["torch"]
    env["packages"].update(torch="2.0.0", pandas="0.1")  # pandas computes no figure: not named
    (run / "environment.json").write_text(json.dumps(env))
    assert not any("library versions" in w for w in quantlab.caveats([finished_run, finished_run]))
    capsys.readouterr()
    assert main(["compare", str(finished_run), str(run), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert f"different library versions (torch {torch_now} in run; 2.0.0 in older)" in out, out
    assert "pandas" not in out.split("different library versions")[1].split("\n")[0]
    (run / "environment.json").unlink()
    warnings = quantlab.caveats([finished_run, run])
    assert any("recorded none (no environment.json)" in w for w in warnings)
