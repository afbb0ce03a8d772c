"""Nothing unsafe is loaded: no pickle, no remote code unless asked for (and then the report
says so), checkpoints verified against their manifests, method directories inside the run."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from quantlab.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "quantlab"


def _calls(name: str):
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                yield path, node


def test_torch_load_only_with_weights_only():
    for path, call in _calls("torch.load"):
        kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kw.get("weights_only") == "True", (
            f"{path}:{call.lineno}: torch.load without weights_only=True"
        )


def test_from_pretrained_of_weights_asks_for_safetensors():
    """Every model-weight load through transformers passes use_safetensors=True (GGUF files
    are read by the gguf package, not pickle)."""
    for path, call in _calls("AutoModelForCausalLM.from_pretrained"):
        kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kw.get("use_safetensors") == "True" or "gguf_file" in kw, f"{path}:{call.lineno}"


def test_every_from_pretrained_says_whether_remote_code_may_run():
    """transformers asks on a terminal (and runs the code on "y") when a config names code
    and trust_remote_code is left unset: every load in the package sets it explicitly."""
    calls = list(_calls(".from_pretrained"))
    assert calls
    for path, call in calls:
        kw = {k.arg for k in call.keywords}
        assert "trust_remote_code" in kw, (
            f"{path}:{call.lineno}: from_pretrained without trust_remote_code"
        )


def test_trust_remote_code_is_off_by_default_and_shown_when_on(tiny_recipe, tmp_path, capsys):
    from quantlab.recipe import load_recipe

    assert load_recipe(tiny_recipe).model.trust_remote_code is False
    text = tiny_recipe.read_text().replace(
        'model: {source: "', 'model: {trust_remote_code: true, source: "'
    )
    tiny_recipe.write_text(text)
    assert main(["run", str(tiny_recipe)]) == 0
    err = capsys.readouterr().err
    assert "trust_remote_code is ON" in err
    html = (tmp_path / "run" / "report.html").read_text()
    assert "trust_remote_code was ON" in html


def test_checkpoints_carry_a_sha256_manifest_of_every_file(tiny_recipe, tmp_path):
    import hashlib

    assert main(["run", str(tiny_recipe)]) == 0
    ckpt = tmp_path / "run" / "rtn-w4-g32" / "checkpoint"
    files = json.loads((ckpt / "quantlab.json").read_text())["files"]
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != "quantlab.json")
    assert sorted(files) == on_disk and "model.safetensors" in files
    for name, entry in files.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_eval_no_verify_loads_a_changed_checkpoint(tiny_recipe, tmp_path, capsys):
    assert main(["run", str(tiny_recipe)]) == 0
    ckpt = tmp_path / "run" / "rtn-w4-g32" / "checkpoint"
    config = ckpt / "generation_config.json"
    config.write_text(config.read_text() + "\n")  # harmless change, but not the exported bytes
    args = ["eval", str(ckpt), "--max-windows", "1", "--ctx", "64", "--json"]
    assert main(args) == 2
    assert "does not match its manifest" in capsys.readouterr().err
    assert main([*args, "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1


@pytest.mark.parametrize("label", ["..", "a/b", "/abs", ".hidden", "results.csv", "Plots"])
def test_method_labels_cannot_name_paths_outside_their_directory(label):
    from quantlab.errors import RecipeError
    from quantlab.recipe import parse_recipe

    with pytest.raises(RecipeError, match="label"):
        parse_recipe({"methods": [{"label": label, "backend": "rtn"}]})
