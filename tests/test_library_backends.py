"""The library backends (int8-dynamic, int8-weight-only, bnb, quanto): option validation,
and quantize -> export -> reload IN A FRESH PROCESS -> the same logits, for every option set.

The in-memory model runs a forward pass before it is exported, on purpose: bitsandbytes
repacks 4-bit weights on the first CPU forward where avx512_bf16 exists, and a naive export
after that writes scales that no longer match. Reloaded logits must equal the in-memory
quantized model's within ``TOL`` (they are bit-identical on this machine)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from quantlab.checkpoint import export_checkpoint, read_sidecar
from quantlab.errors import MissingDependencyError, QuantlabError, RecipeError
from quantlab.models import load_model
from quantlab.recipe import parse_recipe
from quantlab.registry import get_backend

#: largest |reloaded logit - in-memory logit| accepted
TOL = 1e-4

CASES = [
    ("int8-dynamic", {}),
    ("int8-dynamic", {"activations": "per-tensor"}),
    ("int8-dynamic", {"activations": "per-tensor", "weights": "per-tensor"}),
    ("int8-dynamic", {"engine": "fbgemm"}),  # per-token by row scaling on fbgemm
    ("int8-weight-only", {}),
    ("bnb", {}),
    ("bnb", {"mode": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}),
    ("bnb", {"mode": "fp4"}),
    ("bnb", {"mode": "int8"}),
    ("bnb", {"mode": "int8", "threshold": 0.0}),
    ("quanto", {}),
    ("quanto", {"weights": "int4"}),
    ("quanto", {"weights": "int2"}),
    ("quanto", {"weights": "float8"}),
]
QUANT_METHOD = {
    "int8-dynamic": "torchao",
    "int8-weight-only": "torchao",
    "bnb": "bitsandbytes",
    "quanto": "quanto",
}


def _ids():
    return torch.randint(3, 380, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """Every case quantized, run once, exported; in-memory logits saved next to it."""
    root = tmp_path_factory.mktemp("libs")
    ids = _ids()
    out = []
    for i, (name, options) in enumerate(CASES):
        lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
        with torch.no_grad():
            float_logits = lm.model(ids).logits
        backend = get_backend(name)(get_backend(name).Config(**options))
        backend.check(lm.model)
        done = backend.quantize(lm.model, None)
        with torch.no_grad():
            logits = done.model(ids).logits  # a forward pass BEFORE the export
        ckpt = export_checkpoint(
            done, lm.tokenizer, backend, root / f"case{i}", source={}, label=f"case{i}"
        )
        torch.save({"logits": logits, "float": float_logits}, root / f"case{i}.pt")
        out.append((name, options, ckpt))
    return root, out


def test_reload_in_a_fresh_process_gives_the_same_logits(exported):
    root, cases = exported
    code = textwrap.dedent(f"""
        import json, sys, torch
        from quantlab.checkpoint import load_checkpoint
        ids = torch.randint(3, 380, (2, 48), generator=torch.Generator().manual_seed(0))
        out = {{}}
        for i in range({len(cases)}):
            m = load_checkpoint(
                r"{root}/case%d" % i, dtype=torch.float32, device=torch.device("cpu")
            ).model
            with torch.no_grad():
                torch.save(m(ids).logits, r"{root}/reloaded%d.pt" % i)
            out[i] = type(m).__name__
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, (name, options, ckpt) in enumerate(cases):
        saved = torch.load(root / f"case{i}.pt")
        reloaded = torch.load(root / f"reloaded{i}.pt")
        diff = float((reloaded - saved["logits"]).abs().max())
        assert diff <= TOL, f"{name} {options}: reloaded logits differ by {diff}"
        # ... and the quantization did something (a no-op export would also round-trip)
        assert float((saved["logits"] - saved["float"]).abs().max()) > 1e-4, (
            f"{name} {options} changed nothing"
        )
        qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        if options.get("activations") == "per-tensor" or options.get("engine") == "fbgemm":
            assert qcfg["quant_method"] == "quantlab" and qcfg["format"] == "int8-fbgemm"
        else:
            assert qcfg["quant_method"] == QUANT_METHOD[name]
        assert read_sidecar(ckpt)["modules"], f"{name}: no quantized module recorded"


def test_transformers_loads_the_torchao_and_bnb_checkpoints_itself(exported):
    """The ecosystem loader (no quantlab code) reads these formats."""
    root, cases = exported
    picks = [
        i
        for i, (n, o, _) in enumerate(cases)
        if n in ("bnb", "int8-weight-only") or (n == "int8-dynamic" and o == {})
    ]
    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.randint(3, 380, (2, 48), generator=torch.Generator().manual_seed(0))
        for i in {picks}:
            m = AutoModelForCausalLM.from_pretrained(
                r"{root}/case%d" % i, dtype=torch.float32
            ).eval()
            with torch.no_grad():
                torch.save(m(ids).logits, r"{root}/hf%d.pt" % i)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in picks:
        diff = float(
            (torch.load(root / f"hf{i}.pt") - torch.load(root / f"case{i}.pt")["logits"])
            .abs()
            .max()
        )
        assert diff <= TOL, f"{cases[i][:2]}: transformers' own load differs by {diff}"


def test_skipped_layers_stay_float_after_reload(tiny_model_dir, tmp_path):
    from quantlab.checkpoint import load_checkpoint

    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    backend = get_backend("bnb")(get_backend("bnb").Config(skip=["lm_head", "*.mlp.down_proj"]))
    done = backend.quantize(lm.model, None)
    ckpt = export_checkpoint(done, lm.tokenizer, backend, tmp_path / "ck", source={}, label="x")
    reloaded = load_checkpoint(ckpt, dtype=torch.float32, device=torch.device("cpu")).model
    down = reloaded.get_submodule("model.layers.0.mlp.down_proj")
    up = reloaded.get_submodule("model.layers.0.mlp.up_proj")
    assert type(down) is torch.nn.Linear and down.weight.dtype == torch.float32
    assert type(up).__name__ == "Linear4bit"


@pytest.mark.parametrize(
    "backend, options, message",
    [
        ("bnb", {"threshold": 5.0}, "threshold applies to mode int8"),
        ("bnb", {"mode": "int8", "double_quant": True}, "double_quant applies to the 4-bit modes"),
        (
            "bnb",
            {"mode": "int8", "compute_dtype": "float16"},
            "compute_dtype applies to the 4-bit modes",
        ),
        ("bnb", {"mode": "nf3"}, "nf4"),
        ("bnb", {"threshold": -1}, "greater than or equal to 0"),
        (
            "int8-dynamic",
            {"activations": "per-token", "weights": "per-tensor"},
            "needs engine: fbgemm",
        ),
        (
            "int8-dynamic",
            {"activations": "per-tensor", "engine": "torchao"},
            "runs on engine fbgemm",
        ),
        ("int8-dynamic", {"engine": "onednn"}, "fbgemm"),
        ("int8-dynamic", {"activations": "per-row"}, "per-token"),
        ("int8-weight-only", {"bits": 4}, "unknown key"),
        ("quanto", {"weights": "int3"}, "int8"),
        ("quanto", {"weigths": "int4"}, "did you mean 'weights'"),
        ("quanto", {"skip": "everything"}, "skip"),
    ],
)
def test_option_validation_names_the_problem(backend, options, message):
    doc = {"methods": [{"label": "m", "backend": backend, "options": options}]}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(doc)


def test_missing_library_names_the_extra(monkeypatch, tiny):
    model, _ = tiny
    for module, backend, extra in [
        ("bitsandbytes", "bnb", "bnb"),
        ("optimum.quanto", "quanto", "quanto"),
        ("torchao.quantization", "int8-weight-only", "torchao"),
    ]:
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if absent
        with pytest.raises(MissingDependencyError, match=rf"pip install 'quantlab\[{extra}\]'"):
            get_backend(backend)().check(model)
        monkeypatch.delitem(sys.modules, module)


def test_per_tensor_int8_refuses_non_float32(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype=torch.bfloat16, device=torch.device("cpu"))
    backend = get_backend("int8-dynamic")(
        get_backend("int8-dynamic").Config(activations="per-tensor")
    )
    with pytest.raises(QuantlabError, match="float32"):
        backend.quantize(lm.model, None)


def test_checkpoint_bits_per_weight_counts_what_each_format_stores(exported, tiny_model_dir):
    """bits/weight from the checkpoint header against the formats' definitions."""
    from quantlab.bench.size import checkpoint_bits_per_weight, checkpoint_tensor_bytes

    root, cases = exported
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    linears = [
        (n, m)
        for n, m in lm.model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    n_weights = sum(m.weight.numel() for _, m in linears)
    # per-layer constants (bitsandbytes' code maps and packed quant state, up to ~1.3 KB with
    # double quantization) weigh a lot on these 64-wide layers
    slack = 1600 * 8 * len(linears) / n_weights
    for name, options, ckpt in cases:
        bpw = checkpoint_bits_per_weight(lm.model, checkpoint_tensor_bytes(ckpt))
        if name == "bnb" and options.get("mode", "nf4") != "int8":
            # 4 bits per code + one absmax per 64 weights (fp32; uint8 + nested stats with
            # double quantization) + a 16-entry fp32 code map per layer
            absmax = 8 if options.get("double_quant") else 32
            expected = 4 + absmax / 64
            assert expected <= bpw <= expected + slack, (options, bpw)
        elif name == "quanto" and options.get("weights") == "int4":
            assert 4 < bpw < 5, bpw
        elif name == "quanto" and options.get("weights") == "int2":
            assert 2 < bpw < 3, bpw
        else:  # 8-bit codes plus per-channel (or per-tensor) scales
            assert 8 < bpw < 8 + 64 * len(linears) * 64 / n_weights + 1, (name, options, bpw)
