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
    monkeypatch.setitem(
        sys.modules, "bitsandbytes", None
    )  # `import bitsandbytes` raises ImportError


# --------------------------------------------------------------------------- the second pass
# (issue 20): state that a careless or hostile user can produce


def _run_copy(ctx: Ctx, name: str, change: Callable[[Path], None] | None = None) -> Path:
    """A copy of the finished run (made once per session), ``change`` applied to it."""
    return _altered_copy(ctx.ref, ctx.root / "runs" / name, change or (lambda d: None))


def _replace_with_file(name: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        target.write_text("not a directory")

    return change


def _replace_with_dir(name: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        (run / name).mkdir()

    return change


def _edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        doc = json.loads((d / name).read_text())
        edit(doc)
        (d / name).write_text(json.dumps(doc))

    return change


def _auto_map(doc: dict) -> None:
    doc["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


def _safetensors(data: bytes) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        (d / "model.safetensors").write_bytes(data)

    return change


def _truncated_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _demo_run(ctx: Ctx) -> list[str]:
    return ctx.run(edit=lambda t: t.replace(f'"{ctx.model}"', "smollm2-135m"))


def _billion_laughs() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]")
    return "\n".join(lines) + "\nmethods: *a9\n"


def _foreign_dir(ctx: Ctx) -> Path:
    d = ctx.root / "foreign"
    d.mkdir(exist_ok=True)
    (d / "thesis.tex").write_text("precious")
    return d


# --------------------------------------------------------------------------- the third pass
# (issue 26): small input that grew without bound, names trusted over content, tools


def _huge_sweep(ctx: Ctx) -> list[str]:
    keys = ", ".join(f"k{i}: [{', '.join(str(v) for v in range(10))}]" for i in range(12))
    return ctx.run(
        edit=lambda t: t.replace(
            "options: {bits: 4, group_size: 32}}",
            f"options: {{bits: 4, group_size: 32}}, sweep: {{{keys}}}}}",
        )
    )


def _resigned_options(d: Path) -> None:
    from quantlab.checkpoint import sidecar_digest

    meta = json.loads((d / "quantlab.json").read_text())
    meta["options"]["bits"] = "four"
    meta["sidecar_sha256"] = sidecar_digest(meta)  # re-signed: the digest alone cannot catch it
    (d / "quantlab.json").write_text(json.dumps(meta))


def _fifo(ctx: Ctx) -> Path:
    path = ctx.root / "files" / "pipe.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.mkfifo(path)
    return path


def _tool_timeout_soon(monkeypatch) -> None:
    """A limit that is not a number, and tools that would answer (so the limit is read)."""
    import tempfile

    from quantlab.engines.llamacpp import TOOLS

    fake = Path(tempfile.mkdtemp(prefix="quantlab-fake-tools-"))
    for tool in TOOLS:
        (fake / tool).write_text("#!/bin/sh\necho 'version: 0 (fake)'\n")
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("QUANTLAB_LLAMACPP", str(fake))
    monkeypatch.setenv("QUANTLAB_TOOL_TIMEOUT_S", "soon")


def _models_labelled(label: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.run(
        text=BASE.format(model=c.model).replace(
            f'model: {{source: "{c.model}"}}',
            f'models: [{{source: "{c.model}", label: {label}}}, {{source: "{c.model}", label: '
            f"other}}]",
        )
    )


# id, argv builder, exact error class, regex the message must match (, optional set-up with
# monkeypatch)
CASES: list[tuple] = [
    (
        "yaml-malformed",
        lambda c: c.run(text="model: {source: x\nmethods: [\n"),
        RecipeError,
        r"invalid YAML.*line",
    ),
    (
        "yaml-not-a-mapping",
        lambda c: c.run(text="- rtn\n- gptq\n"),
        RecipeError,
        r"a recipe is a mapping",
    ),
    (
        "yaml-binary",
        lambda c: ["run", str(c.file("bin.yaml", b"\xff\xfe\x00model"))],
        RecipeError,
        r"not a UTF-8",
    ),
    (
        "recipe-missing",
        lambda c: ["run", str(c.root / "nope.yaml")],
        RecipeError,
        r"does not exist",
    ),
    (
        "recipe-is-a-directory",
        lambda c: ["run", str(c.root)],
        RecipeError,
        r"is a directory; give a recipe file",
    ),
    (
        "wrong-type",
        lambda c: c.run(edit=lambda t: t + "calibration: {samples: many}\n"),
        RecipeError,
        r"calibration\.samples.*integer",
    ),
    (
        "unknown-top-key",
        lambda c: c.run(edit=lambda t: t + "modle: {}\n"),
        RecipeError,
        r"modle.*did you mean 'model'",
    ),
    (
        "unknown-nested-key",
        _edit("seq_len: 64", "seq_lenn: 64"),
        RecipeError,
        r"seq_lenn.*did you mean 'seq_len'",
    ),
    (
        "unknown-option-key",
        _edit("group_size: 32", "group_sise: 32"),
        RecipeError,
        r"group_sise.*did you mean 'group_size'",
    ),
    (
        "unknown-backend",
        _edit("backend: rtn", "backend: gptqq"),
        RecipeError,
        r"gptqq.*did you mean 'gptq'",
    ),
    (
        "unknown-engine",
        _edit(
            "backend: rtn, options: {bits: 4, group_size: 32}",
            "backend: int8-dynamic, options: {engine: fbgem}",
        ),
        RecipeError,
        r"engine",
    ),
    (
        "unknown-convention",
        _edit("eval: {", "eval: {convention: gpqt, "),
        RecipeError,
        r"convention.*gptq",
    ),
    ("bits-out-of-range", _edit("bits: 4", "bits: 9"), RecipeError, r"bits"),
    (
        "group-size-out-of-range",
        _edit("group_size: 32", "group_size: 0"),
        RecipeError,
        r"group_size",
    ),
    (
        "group-size-not-dividing",
        _edit("group_size: 32", "group_size: 48"),
        QuantlabError,
        r"48.*(64|128).*32",
    ),
    (
        "dtype-unknown",
        _edit('source: "', 'dtype: float8, source: "'),
        RecipeError,
        r"dtype.*float32",
    ),
    (
        "device-unknown",
        _edit('source: "', 'device: gpu, source: "'),
        RecipeError,
        r"device must be auto, cpu, cuda",
    ),
    (
        "labels-repeated",
        _edit("methods:\n", "methods:\n  - {label: rtn-w4, backend: rtn}\n"),
        RecipeError,
        r"unique.*rtn-w4",
    ),
    (
        "label-path-traversal",
        _edit("label: rtn-w4", "label: ../../evil"),
        RecipeError,
        r"label '../../evil' must start with a letter",
    ),
    ("label-reserved", _edit("label: rtn-w4", "label: reference"), RecipeError, r"reserved"),
    (
        "name-path-traversal",
        lambda c: c.run(edit=lambda t: "name: ../up\n" + t),
        RecipeError,
        r"name '../up'",
    ),
    (
        "methods-empty",
        lambda c: c.run(text=f'model: {{source: "{c.model}"}}\nmethods: []\n'),
        RecipeError,
        r"methods",
    ),
    ("max-windows-zero", _edit("max_windows: 2", "max_windows: 0"), RecipeError, r"max_windows"),
    (
        "threads-negative",
        lambda c: c.run(edit=lambda t: t + "threads: -1\n"),
        RecipeError,
        r"threads",
    ),
    (
        "set-without-value",
        lambda c: c.run() + ["--set", "calibration.samples"],
        RecipeError,
        r"KEY=VALUE",
    ),
    (
        "set-unknown-key",
        lambda c: c.run() + ["--set", "calibration.sample=3"],
        RecipeError,
        r"did you mean 'samples'",
    ),
    (
        "calibration-longer-than-context",
        lambda c: c.run(
            edit=lambda t: (
                t.replace(
                    "backend: rtn, options: {bits: 4, group_size: 32}",
                    "backend: gptq, options: {bits: 4, group_size: 32}",
                )
                + "calibration: {samples: 2, seq_len: 512}\n"
            )
        ),
        QuantlabError,
        r"seq_len=512 is longer than the model's context \(256",
    ),
    (
        "text-empty",
        lambda c: _with_eval_source(c, c.file("empty.txt", b"")),
        QuantlabError,
        r"is empty",
    ),
    (
        "text-binary",
        lambda c: _with_eval_source(c, c.file("binary.txt", b"abc\x00\x01\x02" * 100)),
        QuantlabError,
        r"looks binary",
    ),
    (
        "text-not-utf8",
        lambda c: _with_eval_source(c, c.file("latin1.txt", "café crème".encode("latin-1") * 50)),
        QuantlabError,
        r"not valid UTF-8",
    ),
    (
        "jsonl-missing-field",
        lambda c: _with_eval_source(c, c.file("d.jsonl", b'{"body": "x"}\n')),
        QuantlabError,
        r"field 'text'",
    ),
    (
        "text-split-unknown",
        _edit("eval: {", "eval: {split: training, "),
        QuantlabError,
        r"pydoc has splits",
    ),
    (
        "model-missing",
        lambda c: c.run(edit=lambda t: t.replace(str(c.model), str(c.root / "no-model"))),
        QuantlabError,
        r"does not exist",
    ),
    (
        "model-dir-without-config",
        lambda c: c.run(edit=lambda t: t.replace(str(c.model), str(c.root / "files"))),
        QuantlabError,
        r"no config.json",
    ),
    (
        "gguf-truncated",
        lambda c: c.run(
            edit=lambda t: t.replace(
                str(c.model), str(c.file("t.gguf", b"GGUF\x03\x00\x00\x00" + b"\x01" * 40))
            )
        ),
        QuantlabError,
        r"GGUF file .* truncated, damaged",
    ),
    (
        "quantization-config-foreign",
        lambda c: c.run(
            edit=lambda t: t.replace(str(c.model), str(_model_dir(c, "exl2", _foreign_quant)))
        ),
        QuantlabError,
        r"exl2",
    ),
    (
        "weights-pickle-only",
        lambda c: c.run(
            edit=lambda t: t.replace(str(c.model), str(_model_dir(c, "pickle", _pickle_only)))
        ),
        QuantlabError,
        r"pickle.*safetensors only",
    ),
    (
        "checkpoint-tensor-file-missing",
        lambda c: [
            "eval",
            str(_damaged_ckpt(c, "missing", lambda d: (d / "model.safetensors").unlink())),
        ],
        QuantlabError,
        r"missing 'model.safetensors'",
    ),
    (
        "checkpoint-tensor-file-corrupt",
        lambda c: ["eval", str(_damaged_ckpt(c, "flipped", _flip_last_byte))],
        QuantlabError,
        r"does not match its manifest",
    ),
    (
        "checkpoint-truncated-no-verify",
        lambda c: ["eval", "--no-verify", str(_damaged_ckpt(c, "truncated", _truncate))],
        QuantlabError,
        r"cannot be read",
    ),
    (
        "checkpoint-sidecar-corrupt",
        lambda c: [
            "eval",
            str(_damaged_ckpt(c, "sidecar", lambda d: (d / "quantlab.json").write_text("{oops"))),
        ],
        QuantlabError,
        r"quantlab.json' is corrupt",
    ),
    (
        "output-is-a-file",
        lambda c: ["run", str(c.recipe()), "--out", str(c.file("out-file", b"x"))],
        QuantlabError,
        r"is a file",
    ),
    (
        "output-read-only",
        lambda c: ["run", str(c.recipe()), "--out", str(_read_only_dir(c))],
        QuantlabError,
        r"not writable",
    ),
    (
        "output-cannot-be-created",
        lambda c: ["run", str(c.recipe()), "--out", "/proc/self/quantlab/run"],
        QuantlabError,
        r"cannot create output directory",
    ),
    (
        "output-of-another-recipe",
        lambda c: ["run", str(_renamed(c.recipe(), "other.yaml")), "--out", str(c.ref)],
        QuantlabError,
        r"holds the results of recipe 'ref'",
    ),
    (
        "optional-dependency-missing",
        _edit("backend: rtn, options: {bits: 4, group_size: 32}", "backend: bnb"),
        MissingDependencyError,
        r"pip install 'quantlab\[bnb\]'",
        _bnb_missing,
    ),
    (
        "eval-base-missing",
        lambda c: ["eval", str(c.model), "--base", str(c.root / "no-base")],
        QuantlabError,
        r"does not exist",
    ),
    (
        "report-not-a-run",
        lambda c: ["report", str(c.root / "files")],
        QuantlabError,
        r"holds no results.csv",
    ),
    (
        "report-results-corrupt",
        lambda c: ["report", str(c.file("bad-run/results.csv", b"\x00\xff" * 64).parent)],
        QuantlabError,
        r"cannot be read as a results table",
    ),
    # 2. writing over other runs or outside the output directory
    (
        "report-out-over-another-run",
        lambda c: ["report", str(_run_copy(c, "other")), "--out", str(c.ref)],
        QuantlabError,
        r"holds a quantlab run, not a report",
    ),
    (
        "compare-out-over-a-compared-run",
        lambda c: [
            "compare",
            str(_run_copy(c, "other")),
            str(_run_copy(c, "other2")),
            "--out",
            str(c.ref),
        ],
        QuantlabError,
        r"holds a quantlab run, not a report",
    ),
    (
        "run-out-inside-another-run",
        lambda c: [
            "run",
            str(_renamed(c.recipe(), "nested.yaml")),
            "--out",
            str(c.ref / "rtn-w4" / "checkpoint" / "nested"),
        ],
        QuantlabError,
        r"is inside the quantlab (run|checkpoint) directory",
    ),
    (
        "run-out-foreign-directory",
        lambda c: ["run", str(c.recipe()), "--out", str(_foreign_dir(c))],
        QuantlabError,
        r"already holds files that quantlab did not write",
    ),
    (
        "label-300-characters",
        _edit("label: rtn-w4", "label: " + "x" * 300),
        RecipeError,
        r"300 characters.*at most 100",
    ),
    (
        "late-failure-nothing-left-to-quantize",
        _edit("group_size: 32}", "group_size: 32, skip: ['*']}"),
        QuantlabError,
        r"no linear layer is left to quantize",
    ),
    # 3. code or content from a checkpoint that should not be trusted
    (
        "checkpoint-auto-map",
        lambda c: [
            "eval",
            "--no-verify",
            str(_damaged_ckpt(c, "auto-map", _edit_json("config.json", _auto_map))),
        ],
        QuantlabError,
        r"auto_map.*does not run",
    ),
    (
        "model-auto-map",
        lambda c: c.run(
            edit=lambda t: t.replace(
                str(c.model), str(_model_dir(c, "auto-map", _edit_json("config.json", _auto_map)))
            )
        ),
        QuantlabError,
        r"auto_map.*trust_remote_code",
    ),
    (
        "checkpoint-manifest-deleted",
        lambda c: [
            "eval",
            str(
                _damaged_ckpt(c, "no-files", _edit_json("quantlab.json", lambda d: d.pop("files")))
            ),
        ],
        QuantlabError,
        r"has no manifest of its files",
    ),
    (
        "checkpoint-manifest-a-list",
        lambda c: [
            "eval",
            str(
                _damaged_ckpt(
                    c,
                    "files-list",
                    _edit_json("quantlab.json", lambda d: d.update(files=list(d["files"]))),
                )
            ),
        ],
        QuantlabError,
        r"has no manifest",
    ),
    (
        "checkpoint-manifest-null-entry",
        lambda c: [
            "eval",
            str(
                _damaged_ckpt(
                    c,
                    "files-null",
                    _edit_json("quantlab.json", lambda d: d["files"].update({"config.json": None})),
                )
            ),
        ],
        QuantlabError,
        r"entry of 'config.json' is not",
    ),
    (
        "checkpoint-manifest-outside",
        lambda c: [
            "eval",
            str(
                _damaged_ckpt(
                    c,
                    "files-outside",
                    _edit_json(
                        "quantlab.json",
                        lambda d: d["files"].update(
                            {"../../etc/passwd": {"sha256": "0", "bytes": 1}}
                        ),
                    ),
                )
            ),
        ],
        QuantlabError,
        r"outside the checkpoint",
    ),
    (
        "checkpoint-sidecar-options-edited",
        lambda c: [
            "eval",
            str(
                _damaged_ckpt(
                    c, "bits-8", _edit_json("quantlab.json", lambda d: d["options"].update(bits=8))
                )
            ),
        ],
        QuantlabError,
        r"changed since export",
    ),
    # 4. damaged or odd state: one error line each
    (
        "weights-random-bytes",
        lambda c: c.run(
            edit=lambda t: t.replace(
                str(c.model), str(_model_dir(c, "random", _safetensors(os.urandom(4096))))
            )
        ),
        QuantlabError,
        r"model.safetensors' cannot be read",
    ),
    (
        "weights-header-size-absurd",
        lambda c: c.run(
            edit=lambda t: t.replace(
                str(c.model),
                str(_model_dir(c, "absurd", _safetensors((2**62).to_bytes(8, "little") + b"{}"))),
            )
        ),
        QuantlabError,
        r"header size is impossible",
    ),
    (
        "weights-truncated",
        lambda c: c.run(
            edit=lambda t: t.replace(str(c.model), str(_model_dir(c, "half", _truncated_weights)))
        ),
        QuantlabError,
        r"shorter than its header says",
    ),
    (
        "checkpoint-random-bytes-no-verify",
        lambda c: [
            "eval",
            "--no-verify",
            str(_damaged_ckpt(c, "random", _safetensors(os.urandom(4096)))),
        ],
        QuantlabError,
        r"cannot be read",
    ),
    (
        "sidecar-backend-contradicts-tensors",
        lambda c: [
            "eval",
            "--no-verify",
            str(
                _damaged_ckpt(
                    c,
                    "as-awq",
                    _edit_json("quantlab.json", lambda d: d.update(backend="int8-dynamic")),
                )
            ),
        ],
        QuantlabError,
        r"cannot be loaded by backend 'int8-dynamic'",
    ),
    (
        "eval-device-torch-rejects",
        lambda c: ["eval", str(c.model), "--device", "gpu:x"],
        QuantlabError,
        r"not a device torch knows",
    ),
    (
        "eval-device-no-cuda",
        lambda c: ["eval", str(c.model), "--device", "cuda:3"],
        QuantlabError,
        r"CUDA is not available",
    ),
    (
        "cache-is-a-file",
        _demo_run,
        QuantlabError,
        r"cache directory .* cannot be used.*QUANTLAB_CACHE",
        lambda mp: mp.setenv("QUANTLAB_CACHE", "/proc/self/status"),
    ),
    (
        "cache-unwritable",
        _demo_run,
        QuantlabError,
        r"cache directory .* cannot be used",
        lambda mp: mp.setenv("QUANTLAB_CACHE", "/proc/self/quantlab-cache"),
    ),
    (
        "lock-file-is-a-directory",
        lambda c: [
            "run",
            str(c.recipe()),
            "--out",
            str(_run_copy(c, "lock-dir", _replace_with_dir(".quantlab.lock"))),
        ],
        QuantlabError,
        r"lock file .* is not a plain file",
    ),
    (
        "method-directory-is-a-file",
        lambda c: [
            "run",
            str(c.recipe()),
            "--out",
            str(_run_copy(c, "mdir-file", _replace_with_file("rtn-w4"))),
        ],
        QuantlabError,
        r"method directory .* is a file",
    ),
    (
        "checkpoint-is-a-file",
        lambda c: [
            "run",
            str(c.recipe()),
            "--force",
            "--out",
            str(_run_copy(c, "ckpt-file", _replace_with_file("rtn-w4/checkpoint"))),
        ],
        QuantlabError,
        r"checkpoint directory .* is a file",
    ),
    (
        "reference-is-a-file",
        lambda c: [
            "run",
            str(c.recipe()),
            "--force",
            "--out",
            str(_run_copy(c, "ref-file", _replace_with_file("reference"))),
        ],
        QuantlabError,
        r"divergence reference .* is a file",
    ),
    (
        "plots-is-a-file",
        lambda c: ["report", str(_run_copy(c, "plots-file", _replace_with_file("plots")))],
        QuantlabError,
        r"plots directory .* is a file",
    ),
    # 5. resource exhaustion
    (
        "yaml-billion-laughs",
        lambda c: c.run(text=_billion_laughs()),
        RecipeError,
        r"expands to more than 100000 values",
    ),
    (
        "recipe-file-too-large",
        lambda c: ["run", str(c.file("big.yaml", b"# padding\n" * 120_000))],
        RecipeError,
        r"too large for a recipe",
    ),
    # 6. smaller but real
    (
        "label-baseline-with-implicit-baseline",
        _edit("label: rtn-w4", "label: baseline"),
        RecipeError,
        r"labelled 'baseline'",
    ),
    (
        "group-size-true",
        _edit("group_size: 32", "group_size: true"),
        RecipeError,
        r"group_size.*valid integer",
    ),
    (
        "max-windows-true",
        _edit("max_windows: 2", "max_windows: true"),
        RecipeError,
        r"max_windows.*valid integer",
    ),
    (
        "yaml-duplicate-key",
        _edit("eval: {", "eval: {seq_len: 32, "),
        RecipeError,
        r"'seq_len' is given twice",
    ),
    (
        "validate-model-missing",
        lambda c: [
            "validate",
            str(c.recipe(edit=lambda t: t.replace(str(c.model), str(c.root / "no-model")))),
        ],
        QuantlabError,
        r"does not exist",
    ),
    (
        "validate-text-missing",
        lambda c: [
            "validate",
            str(
                c.recipe(
                    edit=lambda t: t.replace(
                        "eval: {", f'eval: {{source: "{c.root / "no-text.txt"}", '
                    )
                )
            ),
        ],
        QuantlabError,
        r"text source .* does not exist",
    ),
    (
        "model-without-weights",
        lambda c: c.run(
            edit=lambda t: t.replace(str(c.model), str(_model_dir(c, "no-weights", _no_weights)))
        ),
        QuantlabError,
        r"holds no weight files",
    ),
    (
        "sensitivity-seq-len-over-context",
        _edit("group_size: 32}", "group_size: 32}, sensitivity: {seq_len: 512}"),
        QuantlabError,
        r"methods\[0\]\.sensitivity\.seq_len=512",
    ),
    (
        "speed-decodes-past-context",
        _edit("speed: {enabled: false}", "speed: {new_tokens: 400}"),
        QuantlabError,
        r"decode past the model's context \(256",
    ),
    (
        "eval-stride-not-strided",
        lambda c: ["eval", str(c.model), "--stride", "16"],
        QuantlabError,
        r"--stride applies to the strided convention",
    ),
    (
        "eval-bos-not-llamacpp",
        lambda c: ["eval", str(c.model), "--bos", "yes"],
        QuantlabError,
        r"--bos applies to the llamacpp convention",
    ),
    (
        "eval-kl-windows-without-base",
        lambda c: ["eval", str(c.model), "--kl-windows", "2"],
        QuantlabError,
        r"--kl-windows applies to the divergence",
    ),
    # more instances of the same classes
    (
        "yaml-nested-too-deep",
        lambda c: c.run(text="methods: " + "[" * 50_000 + "]" * 50_000 + "\n"),
        RecipeError,
        r"nested too deeply",
    ),
    (
        "text-source-not-a-regular-file",
        lambda c: _with_eval_source(c, Path("/dev/zero")),
        QuantlabError,
        r"not a regular file",
    ),
    (
        "text-field-not-jsonl",
        _edit("eval: {", "eval: {text_field: body, "),
        RecipeError,
        r"text_field applies to \.jsonl",
    ),
    (
        "task-limit-without-tasks",
        _edit("eval: {", "eval: {task_limit: 5, "),
        RecipeError,
        r"task_limit applies to eval\.tasks",
    ),
    (
        "eval-text-field-not-jsonl",
        lambda c: ["eval", str(c.model), "--text-field", "body"],
        QuantlabError,
        r"--text-field applies to \.jsonl",
    ),
    (
        "checkpoint-sidecar-nested-too-deep",
        lambda c: [
            "eval",
            str(
                _damaged_ckpt(
                    c,
                    "deep",
                    lambda d: (d / "quantlab.json").write_text("[" * 100_000 + "]" * 100_000),
                )
            ),
        ],
        QuantlabError,
        r"quantlab.json' is corrupt",
    ),
    (
        "tokenizer-garbage",
        lambda c: c.run(
            edit=lambda t: t.replace(
                str(c.model),
                str(
                    _model_dir(
                        c,
                        "bad-tokenizer",
                        lambda d: (d / "tokenizer.json").write_bytes(os.urandom(512)),
                    )
                ),
            )
        ),
        QuantlabError,
        r"could not load model .*tokenizer|could not load model",
    ),
    # the third pass (issue 26)
    (
        "sweep-10-to-the-12",
        _huge_sweep,
        RecipeError,
        r"sweep expands to 1000000000000 methods; at most 256",
    ),
    (
        "sweep-key-unknown",
        _edit("group_size: 32}", "group_size: 32}, sweep: {sym: [true], grup_size: [64]}"),
        RecipeError,
        r"sweep\.grup_size: unknown key.*did you mean 'group_size'",
    ),
    (
        "model-labelled-report",
        _models_labelled("report"),
        RecipeError,
        r"'report', is the name of an entry quantlab writes",
    ),
    ("text-source-fifo", lambda c: _with_eval_source(c, _fifo(c)), QuantlabError, r"FIFO"),
    (
        "checkpoint-options-resigned-invalid",
        lambda c: ["eval", str(_damaged_ckpt(c, "bits-four", _resigned_options))],
        QuantlabError,
        r"sidecar's options are not valid rtn options",
    ),
    (
        "tool-timeout-not-a-number",
        _edit("group_size: 32}", "group_size: 32}, export: [native, gguf]"),
        QuantlabError,
        r"QUANTLAB_TOOL_TIMEOUT_S='soon' is not a positive",
        _tool_timeout_soon,
    ),
]


def _fingerprint(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".quantlab.lock"
    }


@pytest.fixture(scope="module")
def ctx(tiny_model_dir, tmp_path_factory) -> Ctx:
    root = tmp_path_factory.mktemp("bad-input")
    c = Ctx(root, tiny_model_dir, root / "ref", root / "ckpt")
    recipe = c.recipe()
    assert cli.main(["run", str(recipe), "--out", str(c.ref)]) == 0
    shutil.copytree(c.ref / "rtn-w4" / "checkpoint", c.ckpt)
    return c


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 101 and len({c[0] for c in CASES}) == len(CASES)


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
    assert [
        line for line in err.splitlines() if line.startswith("error: ")
    ] and "Traceback" not in err, err
    # nothing already computed was touched
    assert _fingerprint(ctx.ref) == before, f"{name} changed the finished run"
