"""The bad-input corpus: every case is one user mistake, the exact error class quantlab
raises for it, and a check of its message. Each case also goes through the command line:
exit code 2, one ``error:`` message, no traceback, and the finished run it points at keeps
every file byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantlab import cli
from quantlab.errors import MissingDependencyError, QuantlabError, RecipeError

BASE = """
model: {{source: "{model}"}}
methods:
  - {{label: rtn-w4, backend: rtn, options: {{bits: 4, group_size: 32}}}}
eval: {{seq_len: 64, max_windows: 2, batch_size: 2, speed: {{enabled: false}}}}
"""


@dataclass
class Ctx:
    root: Path
    model: Path
    ref: Path  # a finished run directory of recipe "ref"
    ckpt: Path  # a copy of one of its checkpoints, for the checkpoint cases

    def recipe(self, text: str | None = None, *, edit: Callable[[str], str] | None = None) -> Path:
        """A recipe named 'ref' (so it may write into the finished run) in a fresh folder."""
        folder = self.root / "cases"
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.iterdir()))
        path = folder / f"{n}" / "ref.yaml"
        path.parent.mkdir()
        body = BASE.format(model=self.model) if text is None else text
        path.write_text(edit(body) if edit else body, encoding="utf-8")
        return path

    def run(self, **kw) -> list[str]:
        return ["run", str(self.recipe(**kw)), "--out", str(self.ref)]

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def _edit(old: str, new: str) -> Callable[[Ctx], list[str]]:
    """A case: run the base recipe with ``old`` replaced by ``new``."""
    return lambda c: c.run(edit=lambda t: t.replace(old, new))


def _with_eval_source(ctx: Ctx, path: Path) -> list[str]:
    return ctx.run(edit=lambda t: t.replace("eval: {", f'eval: {{source: "{path}", '))


def _altered_copy(src: Path, dest: Path, change: Callable[[Path], None]) -> Path:
    """A copy of ``src`` (made once per session) with ``change`` applied to it."""
    if not dest.exists():
        shutil.copytree(src, dest)
        change(dest)
    return dest


def _model_dir(ctx: Ctx, name: str, change: Callable[[Path], None]) -> Path:
    return _altered_copy(ctx.model, ctx.root / "models" / name, change)


def _foreign_quant(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl2", "bits": 4.0}
    (d / "config.json").write_text(json.dumps(config))


def _pickle_only(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")


def _damaged_ckpt(ctx: Ctx, name: str, damage: Callable[[Path], None]) -> Path:
    return _altered_copy(ctx.ckpt, ctx.root / "ckpts" / name, damage)


def _flip_last_byte(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])


def _read_only_dir(ctx: Ctx) -> Path:
    if os.geteuid() == 0:  # permission bits do not bind root; /proc/self is read-only for everyone
        return Path("/proc/self")
    d = ctx.root / "ro"
    d.mkdir(exist_ok=True)
    d.chmod(0o555)
    return d


def _renamed(path: Path, name: str) -> Path:
    return path.rename(path.with_name(name))


def _bnb_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


# id, argv builder, exact error class, regex the message must match (, optional set-up with monkeypatch)
CASES: list[tuple] = [
    ("yaml-malformed", lambda c: c.run(text="model: {source: x\nmethods: [\n"), RecipeError, r"invalid YAML.*line"),
    ("yaml-not-a-mapping", lambda c: c.run(text="- rtn\n- gptq\n"), RecipeError, r"a recipe is a mapping"),
    ("yaml-binary", lambda c: ["run", str(c.file("bin.yaml", b"\xff\xfe\x00model"))], RecipeError, r"not a UTF-8"),
    ("recipe-missing", lambda c: ["run", str(c.root / "nope.yaml")], RecipeError, r"does not exist"),
    ("recipe-is-a-directory", lambda c: ["run", str(c.root)], RecipeError, r"is a directory; give a recipe file"),
    ("wrong-type", lambda c: c.run(edit=lambda t: t + "calibration: {samples: many}\n"), RecipeError,
     r"calibration\.samples.*integer"),
    ("unknown-top-key", lambda c: c.run(edit=lambda t: t + "modle: {}\n"), RecipeError, r"modle.*did you mean 'model'"),
    ("unknown-nested-key", _edit("seq_len: 64", "seq_lenn: 64"), RecipeError,
     r"seq_lenn.*did you mean 'seq_len'"),
    ("unknown-option-key", _edit("group_size: 32", "group_sise: 32"), RecipeError,
     r"group_sise.*did you mean 'group_size'"),
    ("unknown-backend", _edit("backend: rtn", "backend: gptqq"), RecipeError,
     r"gptqq.*did you mean 'gptq'"),
    ("unknown-engine", _edit("backend: rtn, options: {bits: 4, group_size: 32}", "backend: int8-dynamic, options: {engine: fbgem}"),
     RecipeError, r"engine"),
    ("unknown-convention", _edit("eval: {", "eval: {convention: gpqt, "),
     RecipeError, r"convention.*gptq"),
    ("bits-out-of-range", _edit("bits: 4", "bits: 9"), RecipeError, r"bits"),
    ("group-size-out-of-range", _edit("group_size: 32", "group_size: 0"),
     RecipeError, r"group_size"),
    ("group-size-not-dividing", _edit("group_size: 32", "group_size: 48"),
     QuantlabError, r"48.*(64|128).*32"),
    ("dtype-unknown", _edit('source: "', 'dtype: float8, source: "'),
     RecipeError, r"dtype.*float32"),
    ("device-unknown", _edit('source: "', 'device: gpu, source: "'),
     RecipeError, r"device must be auto, cpu, cuda"),
    ("labels-repeated", _edit("methods:\n", "methods:\n  - {label: rtn-w4, backend: rtn}\n"),
     RecipeError, r"unique.*rtn-w4"),
    ("label-path-traversal", _edit("label: rtn-w4", "label: ../../evil"),
     RecipeError, r"label '../../evil' must start with a letter"),
    ("label-reserved", _edit("label: rtn-w4", "label: reference"),
     RecipeError, r"reserved"),
    ("name-path-traversal", lambda c: c.run(edit=lambda t: "name: ../up\n" + t), RecipeError, r"name '../up'"),
    ("methods-empty", lambda c: c.run(text=f'model: {{source: "{c.model}"}}\nmethods: []\n'), RecipeError, r"methods"),
    ("max-windows-zero", _edit("max_windows: 2", "max_windows: 0"),
     RecipeError, r"max_windows"),
    ("threads-negative", lambda c: c.run(edit=lambda t: t + "threads: -1\n"), RecipeError, r"threads"),
    ("set-without-value", lambda c: c.run() + ["--set", "calibration.samples"], RecipeError, r"KEY=VALUE"),
    ("set-unknown-key", lambda c: c.run() + ["--set", "calibration.sample=3"], RecipeError,
     r"did you mean 'samples'"),
    ("calibration-longer-than-context", lambda c: c.run(edit=lambda t: t.replace(
        "backend: rtn, options: {bits: 4, group_size: 32}", "backend: gptq, options: {bits: 4, group_size: 32}")
        + "calibration: {samples: 2, seq_len: 512}\n"), QuantlabError, r"seq_len=512 is longer than the model's context \(256"),
    ("text-empty", lambda c: _with_eval_source(c, c.file("empty.txt", b"")), QuantlabError, r"is empty"),
    ("text-binary", lambda c: _with_eval_source(c, c.file("binary.txt", b"abc\x00\x01\x02" * 100)), QuantlabError,
     r"looks binary"),
    ("text-not-utf8", lambda c: _with_eval_source(c, c.file("latin1.txt", "café crème".encode("latin-1") * 50)),
     QuantlabError, r"not valid UTF-8"),
    ("jsonl-missing-field", lambda c: _with_eval_source(c, c.file("d.jsonl", b'{"body": "x"}\n')), QuantlabError,
     r"field 'text'"),
    ("text-split-unknown", _edit("eval: {", "eval: {split: training, "),
     QuantlabError, r"pydoc has splits"),
    ("model-missing", lambda c: c.run(edit=lambda t: t.replace(str(c.model), str(c.root / "no-model"))),
     QuantlabError, r"does not exist"),
    ("model-dir-without-config", lambda c: c.run(edit=lambda t: t.replace(str(c.model), str(c.root / "files"))),
     QuantlabError, r"no config.json"),
    ("gguf-truncated", lambda c: c.run(edit=lambda t: t.replace(
        str(c.model), str(c.file("t.gguf", b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)))), QuantlabError, r"GGUF file .* truncated, damaged"),
    ("quantization-config-foreign", lambda c: c.run(edit=lambda t: t.replace(
        str(c.model), str(_model_dir(c, "exl2", _foreign_quant)))), QuantlabError, r"exl2"),
    ("weights-pickle-only", lambda c: c.run(edit=lambda t: t.replace(
        str(c.model), str(_model_dir(c, "pickle", _pickle_only)))), QuantlabError, r"pickle.*safetensors only"),
    ("checkpoint-tensor-file-missing", lambda c: ["eval", str(_damaged_ckpt(
        c, "missing", lambda d: (d / "model.safetensors").unlink()))], QuantlabError, r"missing 'model.safetensors'"),
    ("checkpoint-tensor-file-corrupt", lambda c: ["eval", str(_damaged_ckpt(c, "flipped", _flip_last_byte))],
     QuantlabError, r"does not match its manifest"),
    ("checkpoint-truncated-no-verify", lambda c: ["eval", "--no-verify", str(_damaged_ckpt(c, "truncated", _truncate))],
     QuantlabError, r"cannot be read"),
    ("checkpoint-sidecar-corrupt", lambda c: ["eval", str(_damaged_ckpt(
        c, "sidecar", lambda d: (d / "quantlab.json").write_text("{oops")))], QuantlabError, r"quantlab.json' is corrupt"),
    ("output-is-a-file", lambda c: ["run", str(c.recipe()), "--out", str(c.file("out-file", b"x"))], QuantlabError,
     r"is a file"),
    ("output-read-only", lambda c: ["run", str(c.recipe()), "--out", str(_read_only_dir(c))], QuantlabError,
     r"not writable"),
    ("output-cannot-be-created", lambda c: ["run", str(c.recipe()), "--out", "/proc/self/quantlab/run"],
     QuantlabError, r"cannot create output directory"),
    ("output-of-another-recipe", lambda c: ["run", str(_renamed(c.recipe(), "other.yaml")), "--out", str(c.ref)],
     QuantlabError, r"holds the results of recipe 'ref'"),
    ("optional-dependency-missing", _edit("backend: rtn, options: {bits: 4, group_size: 32}", "backend: bnb"), MissingDependencyError,
     r"pip install 'quantlab\[bnb\]'", _bnb_missing),
    ("eval-base-missing", lambda c: ["eval", str(c.model), "--base", str(c.root / "no-base")], QuantlabError,
     r"does not exist"),
    ("report-not-a-run", lambda c: ["report", str(c.root / "files")], QuantlabError, r"holds no results.csv"),
    ("report-results-corrupt", lambda c: ["report", str(c.file("bad-run/results.csv", b"\x00\xff" * 64).parent)],
     QuantlabError, r"cannot be read as a results table"),
]


def _fingerprint(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".quantlab.lock"}


@pytest.fixture(scope="module")
def ctx(tiny_model_dir, tmp_path_factory) -> Ctx:
    root = tmp_path_factory.mktemp("bad-input")
    c = Ctx(root, tiny_model_dir, root / "ref", root / "ckpt")
    recipe = c.recipe()
    assert cli.main(["run", str(recipe), "--out", str(c.ref)]) == 0
    shutil.copytree(c.ref / "rtn-w4" / "checkpoint", c.ckpt)
    return c


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, ctx, monkeypatch, capsys):
    name, build, error, pattern, *setup = case
    for s in setup:
        s(monkeypatch)
    before = _fingerprint(ctx.ref)
    argv = build(ctx)
    # the exact class, from the command's own code
    args = cli._parser().parse_args(argv)
    with pytest.raises(QuantlabError) as info:
        cli.COMMANDS[args.command](args)
    assert type(info.value) is error, f"{name}: {type(info.value).__name__}: {info.value}"
    assert re.search(pattern, str(info.value), re.S), f"{name}: {info.value}"
    capsys.readouterr()
    # the command line: exit 2, a message, no traceback
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] and "Traceback" not in err, err
    # nothing already computed was touched
    assert _fingerprint(ctx.ref) == before, f"{name} changed the finished run"
