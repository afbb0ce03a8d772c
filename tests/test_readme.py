"""The README's and docs/' examples run on the install the README names (the dev install the
tests run in).

Every line of the README's ```bash blocks after "The two commands", then of the docs pages'
(in name order), runs in that order, in one scratch directory (later examples read what
earlier ones wrote, as they would for a reader), as written, with three rules:

- ``quantlab run`` without ``--quick`` gets ``--quick`` appended: the same recipe and
  overrides, fewer windows, so CI can afford it;
- a line ending in ``# online`` (a Hub id) runs with the Hub switched off
  (``HF_HUB_OFFLINE=1``) and must stop with one ``error:`` line and no traceback: tests
  never download, and an offline user must get that message;
- a line ending in ``# gpu`` runs when torch sees a CUDA device and otherwise must stop with
  one ``error:`` line naming CUDA.

The files the examples name as the reader's own (``./my-model``, ``notes.txt``) are made
here: a tiny Llama with a 1024-token context and some of the embedded text. The README's
Python block runs last, in the same directory. The two commands themselves are CI's own
(``.ci/run`` is ``scripts/test.sh``; ``scripts/demo.sh`` is set-up plus
``quantlab run recipes/awq_int4.yaml``, which runs here with ``--quick``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUANTLAB = Path(sys.executable).parent / "quantlab"


def _blocks(lang: str, docs: bool = False) -> list[str]:
    texts = [README[README.index("## A first run") :]]
    if docs:
        texts += [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    return [b for text in texts for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def _examples() -> list[str]:
    lines = []
    for block in _blocks("bash", docs=True):
        lines += [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    return lines


EXAMPLES = _examples()


def test_the_readme_has_examples_of_every_kind():
    assert [ln for ln in EXAMPLES if ln.startswith("quantlab run")]
    assert [ln for ln in EXAMPLES if ln.startswith("quantlab eval")]
    assert [ln for ln in EXAMPLES if ln.endswith("# online")]
    assert [ln for ln in EXAMPLES if ln.endswith("# gpu")]
    assert all(ln.startswith("quantlab ") for ln in EXAMPLES), "an example the test cannot run"
    assert len(_blocks("python")) == 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from quantlab.data import pydoc_text

    work = tmp_path_factory.mktemp("readme")
    (work / "recipes").symlink_to(ROOT / "recipes")
    build_tiny_llama(work / "my-model", max_position_embeddings=1024)
    (work / "notes.txt").write_text("\n\n".join(pydoc_text("evaluation").documents[:40]))
    return work


def _command(line: str) -> tuple[list[str], str]:
    tag = line.rsplit("#", 1)[1].strip() if " #" in line else ""
    argv = shlex.split(line, comments=True)
    if argv[:2] == ["quantlab", "run"] and "--quick" not in argv and tag != "online":
        argv.append("--quick")
    return [str(QUANTLAB), *argv[1:]], tag


@pytest.mark.slow
@pytest.mark.parametrize(
    "line", EXAMPLES, ids=[f"{i}-{ln.split()[1]}" for i, ln in enumerate(EXAMPLES)]
)
def test_readme_example_runs(line, workdir):
    argv, tag = _command(line)
    env = dict(os.environ, HF_HUB_OFFLINE="1") if tag == "online" else dict(os.environ)
    env.pop("QUANTLAB_DEBUG", None)
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    said = f"$ {line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if tag == "online" or (tag == "gpu" and not torch.cuda.is_available()):
        assert proc.returncode == 2, said
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, said
        assert (
            ("offline" in errors[0].lower()) if tag == "online" else ("cuda" in errors[0].lower())
        ), said
    else:
        assert proc.returncode == 0, said


@pytest.mark.slow
def test_readme_python_example_runs(workdir):
    code = _blocks("python")[0]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ppl, stderr, kld = map(float, proc.stdout.split()[-3:])
    assert 1 < ppl < 1000 and 0 < stderr < ppl and 0 < kld < 5, proc.stdout
