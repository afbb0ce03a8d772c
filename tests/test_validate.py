"""`quantlab validate` knows what `quantlab run` knows before loading weights: each method is
checked against the model's architecture built from config.json (on the meta device); several
recipes at once; `quantlab backends` says which backends this environment can run."""

from __future__ import annotations

from quantlab.cli import main


def _write(path, model, group):
    path.write_text(
        f'name: v\nmodel: {{source: "{model}"}}\n'
        f"methods:\n  - {{label: rtn, backend: rtn, options: {{bits: 4, group_size: {group}}}}}\n"
    )
    return path


def test_a_group_size_the_model_cannot_take_is_found_without_loading_weights(
    tiny_model_dir, tmp_path, capsys
):
    import shutil

    model = tmp_path / "config-only"  # the model's files without its weights: none can be read
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    bad = _write(tmp_path / "bad.yaml", model, 128)  # hidden size 64
    good = _write(tmp_path / "good.yaml", model, 32)
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        "error: method 'rtn' (rtn): group_size 128 does not divide the input width 64 of layer "
        "'model.layers.0.self_attn.q_proj'; group sizes that fit: 16, 32, 64, -1"
    ) in err
    assert main(["validate", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: valid recipe" in out and f"error: {bad}: method 'rtn'" in err
    assert "1 of 2 recipes are not valid" in err


def test_backends_says_what_is_usable_here(capsys):
    assert main(["backends"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert lines and all(
        line.endswith("[usable here]") or "NOT usable here: " in line for line in lines
    )
    assert any(line.startswith("rtn:") and line.endswith("[usable here]") for line in lines)


def test_validate_says_what_it_could_not_check(tiny_model_dir, tmp_path, capsys):
    hub = _write(tmp_path / "hub.yaml", "HuggingFaceTB/SmolLM2-360M", 64)
    assert main(["validate", str(hub), "--set", "eval.source=wikitext2"]) == 0
    out = capsys.readouterr().out
    assert (
        "not checked: the methods against HuggingFaceTB/SmolLM2-360M's architecture (not on this "
        "machine" in out
    )
    assert "not checked: the text source wikitext2 (online" in out
    local = _write(tmp_path / "local.yaml", tiny_model_dir, 32)
    assert main(["validate", str(local)]) == 0
    assert "not checked" not in capsys.readouterr().out
