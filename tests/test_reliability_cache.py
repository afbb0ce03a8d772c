"""Issue 26, caches and references trusted by name: what quantlab reads back from its cache or
a run's reference/ is used only when it matches the digest recorded when it was written (else
it is computed again, said in one log line), a base model is keyed by its content, two
processes filling the same cache entry compute it once, and figures that are not finite are
printed as nan with a warning, not a traceback."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from quantlab.cache import RECORD
from quantlab.cli import main

EVAL = ["--ctx", "64", "--max-windows", "2", "--kl-windows", "2"]


def _eval_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _overwrite(path: Path, at: int, data: bytes) -> None:
    """Change bytes in place: same size, same name, other content."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory) -> dict[str, Path]:
    """RTN W4 g32 checkpoints of the tiny model and of other weights of the same shapes: the
    same backend and options, so only their content tells them apart."""
    from quantlab.checkpoint import export_checkpoint
    from quantlab.quantizers.rtn import RTN

    model, tok = tiny
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, m in (("tiny", model), ("other", other)):
        backend = RTN(RTN.Config(bits=4, group_size=32))
        quantized = backend.quantize(copy.deepcopy(m), None).model
        out[name] = export_checkpoint(
            quantized, tok, backend, root / name, source={}, label="rtn-w4"
        )
    return out


# --------------------------------------------------------------------------- eval's references


def test_a_damaged_cached_base_reference_is_recomputed(
    tiny_model_dir, checkpoints, capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    args = [checkpoints["tiny"], "--base", tiny_model_dir, *EVAL]
    first = _eval_json(capsys, *args)
    [entry] = [p for p in (tmp_path / "eval-references").iterdir() if not p.name.startswith(".")]
    _overwrite(entry / "logprobs.u16", 1000, b"\0" * 20000)
    again = _eval_json(capsys, *args)
    assert not again["base_reference_reused"] and again["kld_mean"] == first["kld_mean"]
    (entry / RECORD).unlink()  # as an entry written before records existed
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["kld_mean"] == first["kld_mean"]
    assert out.err.count("discarded and recomputed: it has no record") == 1
    assert _eval_json(capsys, *args)["base_reference_reused"]


def test_a_checkpoint_base_is_keyed_by_its_content(
    tiny_model_dir, checkpoints, capsys, monkeypatch, tmp_path
):
    """Another checkpoint (same backend and options) copied to the base's path is another base,
    verified or not (--no-verify: its files are hashed for the key)."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    for flags in ([], ["--no-verify"]):
        argv = [tiny_model_dir, "--base", base, *EVAL, *flags]
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(checkpoints["tiny"], base)
        first = _eval_json(capsys, *argv)
        shutil.rmtree(base)
        shutil.copytree(checkpoints["other"], base)
        other = _eval_json(capsys, *argv)
        direct = _eval_json(capsys, *argv, "--no-cache-base")
        assert not other["base_reference_reused"] and other["kld_mean"] == direct["kld_mean"]
        assert other["base_ppl"] == direct["base_ppl"] != first["base_ppl"]


# --------------------------------------------------------------------------- a run's reference/

RECIPE = """
name: refs
model: {{source: "{model}"}}
methods:
  - {{label: rtn-w4, backend: rtn, options: {{bits: 4, group_size: 32}}}}
eval: {{seq_len: 64, max_windows: 2, batch_size: 2, speed: {{enabled: false}}}}
output: {{dir: "{out}"}}
"""


def test_a_damaged_run_reference_is_recomputed_before_rescoring(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, out=tmp_path / "run"))
    assert main(["run", str(recipe)]) == 0
    first = pd.read_csv(tmp_path / "run" / "results.csv").set_index("method")["kld_mean"]
    _overwrite(tmp_path / "run" / "reference" / "logprobs.u16", 1000, b"\0" * 20000)
    (tmp_path / "run" / "rtn-w4" / "metrics.json").unlink()  # re-scored from its checkpoint
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert "does not match the digest" in capsys.readouterr().err
    again = pd.read_csv(tmp_path / "run" / "results.csv").set_index("method")["kld_mean"]
    assert again["rtn-w4"] == first["rtn-w4"]


# --------------------------------------------------------------------------- converted models


def test_a_converted_gguf_is_verified_when_read_back(tiny_gguf, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    args = [tiny_gguf, "--ctx", "64", "--max-windows", "2"]
    first = _eval_json(capsys, *args)
    [entry] = (tmp_path / "models").glob("gguf-*")
    size = (entry / "model.safetensors").stat().st_size
    damages = {
        "weights": lambda: _overwrite(entry / "model.safetensors", size - 4096, b"\xff" * 4096),
        "source record": lambda: (entry / "quantlab_source.json").write_text("{"),
        "written before records": lambda: (entry / RECORD).unlink(),
    }
    for name, damage in damages.items():
        damage()
        capsys.readouterr()
        assert main(["eval", *map(str, args), "--json"]) == 0, name
        out = capsys.readouterr()
        assert json.loads(out.out)["ppl"] == first["ppl"], name
        assert "is discarded and recomputed" in out.err, name


@pytest.fixture()
def demo_spec(tiny_gguf, monkeypatch, tmp_path):
    """A demo model like smollm2-135m whose wheel (holding the tiny GGUF) is already in the
    cache: the demo's path without the network."""
    from quantlab.cache import sha256_file
    from quantlab.models import DEMO_MODELS

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    spec = {
        "package": "quantlab-tiny-demo",
        "version": "0.0.1",
        "member": "quantlab_tiny_demo/tiny.gguf",
        "sha256": sha256_file(tiny_gguf),
        "description": "the tests' tiny model",
    }
    monkeypatch.setitem(DEMO_MODELS, "tiny-demo", spec)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "quantlab_tiny_demo-0.0.1-py3-none-any.whl", "w") as z:
        z.write(tiny_gguf, spec["member"])
    return spec


def test_the_demo_gguf_is_checked_against_its_known_sha256(demo_spec, tiny_gguf, tmp_path, capsys):
    from quantlab.cache import sha256_file
    from quantlab.models import _demo_gguf, demo_model_dir

    path = _demo_gguf("tiny-demo")
    assert sha256_file(path) == demo_spec["sha256"]
    _overwrite(path, 100, b"\0" * 64)
    capsys.readouterr()
    assert _demo_gguf("tiny-demo") == path and sha256_file(path) == demo_spec["sha256"]
    assert "does not match its known sha256" in capsys.readouterr().err
    model = demo_model_dir("tiny-demo")
    assert (model / RECORD).is_file() and sha256_file(path) == demo_spec["sha256"]


# --------------------------------------------------------------------------- two processes


_DRIVER = """
import sys, time
from pathlib import Path
import torch, transformers  # imported before the start line, so both begin the work together
from quantlab import cli, evalcmd, models, scoring
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
sys.exit(cli.main(sys.argv[3:]))
"""


def test_two_evals_on_an_empty_cache_compute_the_base_once(tiny_model_dir, checkpoints, tmp_path):
    """Two real `quantlab eval --base` processes, started together on an empty cache: both
    succeed with equal numbers, and the base distributions are computed once (the other waits
    for the entry's lock and reuses it); without the lock both wrote into one directory."""
    import os

    env = dict(os.environ, QUANTLAB_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    go = tmp_path / "go"
    # 200 windows: computing the base takes seconds, far longer than the two starts differ by,
    # so without the lock both compute it (measured: 3 of 3 pairs, one of them crashing)
    argv = [
        "eval",
        str(checkpoints["tiny"]),
        "--base",
        str(tiny_model_dir),
        "--ctx",
        "64",
        "--max-windows",
        "200",
        "--kl-windows",
        "200",
        "--json",
        "--threads",
        "1",
    ]
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(r), str(go), *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    a, b = (json.loads(out) for out, _ in results)
    assert a["kld_mean"] == b["kld_mean"] and a["base_ppl"] == b["base_ppl"]
    if a["base_reference"] == b["base_reference"]:  # unless the code changed between the starts
        assert sorted([a["base_reference_reused"], b["base_reference_reused"]]) == [False, True]


# --------------------------------------------------------------------------- not finite, not JSON


def test_a_nan_perplexity_is_printed_as_nan_with_a_warning(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    nan_dir = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, nan_dir)
    weights = load_file(nan_dir / "model.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()},
        nan_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    argv = ["eval", str(nan_dir), "--base", str(tiny_model_dir), *EVAL, "--no-cache-base"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "perplexity nan" in out.out and "KL mean nan" in out.out
    assert "warning: the perplexity" in out.err and "not a finite number" in out.err


def test_json_nested_beyond_the_parser_is_one_error(tiny_model_dir, tmp_path, capsys):
    from quantlab.errors import QuantlabError
    from quantlab.modelfiles import check_safetensors

    deep = tmp_path / "deep"
    shutil.copytree(tiny_model_dir, deep)
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["eval", str(deep)]) == 2
    assert "config.json' cannot be read (RecursionError)" in capsys.readouterr().err
    header = b"[" * 100_000
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(QuantlabError, match="header is not valid"):
        check_safetensors(tmp_path / "w")
