"""GGUF export: every quantized tensor written, dequantized by the gguf package (an
independent reader), equals quantlab's dense weight (exact for Q4_0/Q5_0/Q8_0; for Q4_1/Q5_1
within half a float16 ulp of the block minimum); grids GGUF cannot hold are clear errors; and,
where llama.cpp's tools are built, llama.cpp's perplexity of the F32 export equals quantlab's
llamacpp-convention perplexity of the same weights."""

from __future__ import annotations

import os
import re

import gguf
import numpy as np
import pytest
import torch

from quantlab.errors import QuantlabError
from quantlab.formats.gguf import _qk_permutation, export_gguf, quantized_parts
from quantlab.models import load_model
from quantlab.quantizers.rtn import RTN, WeightQuantConfig

CPU = torch.device("cpu")


def _quantized(model_dir, **options):
    model = load_model(str(model_dir), dtype=torch.float32, device=CPU).model
    return RTN(WeightQuantConfig(**options)).quantize(model, None).model


def _dense_in_gguf_order(model, name: str, heads: dict[str, int]) -> torch.Tensor:
    w = model.get_submodule(name).dequantize()
    for proj, n in heads.items():
        if name.endswith(proj):
            w = w[_qk_permutation(w.shape[0], n)]
    return w


GRIDS = [
    ({"bits": 4, "sym": True, "group_size": 32}, "Q4_0"),
    ({"bits": 4, "sym": True, "group_size": 64}, "Q4_0"),
    ({"bits": 4, "sym": True, "group_size": -1}, "Q4_0"),
    ({"bits": 4, "sym": False, "group_size": 32}, "Q4_1"),
    ({"bits": 5, "sym": True, "group_size": 32}, "Q5_0"),
    ({"bits": 5, "sym": False, "group_size": 64}, "Q5_1"),
    ({"bits": 8, "sym": True, "group_size": 32}, "Q8_0"),
]


@pytest.mark.parametrize(
    ("options", "qtype"), GRIDS, ids=[f"{q}-g{o['group_size']}" for o, q in GRIDS]
)
def test_every_written_tensor_dequantizes_to_quantlabs_weight(
    options, qtype, tiny_model_dir, tiny_gguf, tmp_path
):
    model = _quantized(tiny_model_dir, **options)
    types = export_gguf(model, tmp_path / "m.gguf", tiny_gguf)
    heads = {"q_proj": 4, "k_proj": 2}
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    by_name = {t.name: t for t in reader.tensors}
    quantized = [n for n, m in model.named_modules() if quantized_parts(m) is not None]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert len(quantized) == 14
    for name in quantized:
        t = by_name[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == qtype == types[t.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        want = _dense_in_gguf_order(model, name, heads).numpy()
        if qtype.endswith("_0"):
            assert np.array_equal(got, want), name
        else:  # m = float16(-zero * scale): at most half a float16 ulp of |m| away
            codes, scales, zeros, g_idx, _ = quantized_parts(model.get_submodule(name))
            m = (zeros.t()[:, g_idx].float() * scales.float().t()[:, g_idx]).numpy()
            if name.endswith(("q_proj", "k_proj")):
                m = m[
                    _qk_permutation(m.shape[0], heads["q_proj" if "q_proj" in name else "k_proj"])
                ]
            ulp = np.spacing(np.abs(m).astype(np.float16)).astype(np.float32)
            assert (np.abs(got - want) <= ulp / 2 + 1e-6).all(), name
    # everything else: float32, as the template had it
    for t in reader.tensors:
        if t.name not in types or types[t.name] == "F32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32


def test_several_widths_get_a_gguf_type_per_tensor(tiny_model_dir, tiny_gguf, tmp_path):
    """An allocation's layers (here module_bits, as bits: auto resolves to) keep their own
    widths in the file: Q4_0, Q5_0 and Q8_0 tensors side by side, each exact."""
    model = _quantized(
        tiny_model_dir,
        bits=4,
        group_size=32,
        sym=True,
        module_bits={"*.mlp.down_proj": 8, "*.self_attn.o_proj": 5},
    )
    types = export_gguf(model, tmp_path / "m.gguf", tiny_gguf)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    want_type = {"down_proj": "Q8_0", "o_proj": "Q5_0"}
    for t in reader.tensors:
        name = next(
            (
                n
                for n, m in model.named_modules()
                if quantized_parts(m) is not None
                and names.get_name(f"{n}.weight", try_suffixes=(".weight",)) == t.name
            ),
            None,
        )
        if name is None:
            continue
        assert (
            t.tensor_type.name == want_type.get(name.rsplit(".", 1)[1], "Q4_0") == types[t.name]
        ), name
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(
            got, _dense_in_gguf_order(model, name, {"q_proj": 4, "k_proj": 2}).numpy()
        ), name
    assert {"Q4_0", "Q5_0", "Q8_0"} <= set(types.values())


def test_the_file_runs_as_a_model_and_matches_quantlab(
    tiny_model_dir, tiny_gguf, tmp_path, monkeypatch
):
    """transformers reads the exported GGUF back (its own dequantization): the same logits."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    model = _quantized(tiny_model_dir, bits=4, sym=True, group_size=32)
    export_gguf(model, tmp_path / "q4_0.gguf", tiny_gguf)
    back = load_model(str(tmp_path / "q4_0.gguf"), dtype=torch.float32, device=CPU)
    ids = torch.tensor([[1, 300, 72, 292, 10, 90, 11, 28, 360]])
    with torch.no_grad():
        assert torch.allclose(back.model(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"bits": 3, "sym": True, "group_size": 32},
            r"3-bit symmetric grid has no GGUF block type",
        ),
        (
            {"bits": 8, "sym": False, "group_size": 32},
            r"8-bit zero-point grid has no GGUF block type",
        ),
        ({"bits": 4, "sym": True, "group_size": 16}, r"group_size 16 is not a multiple of 32"),
    ],
)
def test_grids_gguf_cannot_hold_are_clear_errors(
    options, message, tiny_model_dir, tiny_gguf, tmp_path
):
    model = _quantized(tiny_model_dir, **options)
    with pytest.raises(QuantlabError, match=message):
        export_gguf(model, tmp_path / "m.gguf", tiny_gguf)
    assert not (tmp_path / "m.gguf").exists()


def test_act_order_needs_static_groups(tiny_model_dir, tiny_gguf, tmp_path):
    from quantlab.data import pydoc_text, sample_calibration, tokenize
    from quantlab.quantizers.gptq import GPTQ

    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    text = pydoc_text("calibration")
    cal = sample_calibration(tokenize(text, lm.tokenizer), text, 4, 64, 0).ids
    for static, ok in ((False, False), (True, True)):
        model = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU).model
        cfg = GPTQ.Config(bits=4, group_size=32, act_order=True, static_groups=static)
        GPTQ(cfg).quantize(model, cal)
        if ok:
            assert export_gguf(model, tmp_path / "static.gguf", tiny_gguf)
        else:
            with pytest.raises(
                QuantlabError, match=r"act_order needs static_groups: true for GGUF export"
            ):
                export_gguf(model, tmp_path / "permuted.gguf", tiny_gguf)


def _llamacpp():
    from quantlab.engines.llamacpp import find_llamacpp

    try:
        return find_llamacpp()
    except QuantlabError as e:
        if os.environ.get("QUANTLAB_REQUIRE_LLAMACPP") == "1":
            raise
        pytest.skip(str(e))


def test_llamacpp_perplexity_of_the_f32_export_equals_quantlabs(
    tiny_model_dir, tiny_gguf, tmp_path
):
    """The engine cross-check: the dequantized weights written as F32, scored by
    llama-perplexity, give quantlab's llamacpp-convention perplexity of the same weights."""
    from quantlab.data import pydoc_text
    from quantlab.engines.llamacpp import perplexity
    from quantlab.evalspec import ScoringSpec
    from quantlab.scoring import build_plan, evaluate

    tools = _llamacpp()
    model = _quantized(tiny_model_dir, bits=4, sym=True, group_size=32)
    export_gguf(model, tmp_path / "f32.gguf", tiny_gguf, dequantized=True)
    export_gguf(model, tmp_path / "q4_0.gguf", tiny_gguf)
    text = pydoc_text("evaluation")
    text_file = tmp_path / "eval.txt"
    text_file.write_text("\n\n".join(text.documents[:40]), encoding="utf-8")
    from quantlab.data import Text

    sub = Text("pydoc:evaluation[:40]", text.documents[:40])
    tok = load_model(str(tiny_gguf), dtype=torch.float32, device=CPU).tokenizer
    plan = build_plan(
        ScoringSpec(convention="llamacpp", seq_len=128, max_windows=8), sub, tok, model
    )
    ours, _ = evaluate(model, plan, 4)
    theirs = perplexity(tools, tmp_path / "f32.gguf", text_file, ctx=128, chunks=8, threads=2)
    assert theirs["ppl"] == pytest.approx(ours.ppl, rel=5e-4), (theirs, ours.ppl)
    quant = perplexity(tools, tmp_path / "q4_0.gguf", text_file, ctx=128, chunks=8, threads=2)
    assert quant["ppl"] == pytest.approx(ours.ppl, rel=0.05)  # llama.cpp also quantizes activations


def _engine_recipe(path, source, out, methods: str, extra: str = "") -> object:
    path.write_text(f"""
model: {{source: "{source}"}}
calibration: {{samples: 4, seq_len: 64}}
methods:
{methods}
eval:
  convention: llamacpp
  seq_len: 128
  max_windows: 6
  speed: {{enabled: false}}
  engines: [torch, llamacpp]
  llamacpp: {{ctx: 128, chunks: 6, threads: 2, bench: {{n_prompt: 32, n_gen: 8, rounds: 2}}}}
output: {{dir: "{out}"}}
{extra}""")
    return path


def test_a_run_measures_every_gguf_row_with_llamacpp(tiny_gguf, tmp_path, monkeypatch, capsys):
    import json

    import pandas as pd

    from quantlab.cli import main

    monkeypatch.setenv("QUANTLAB_LLAMACPP", str(_llamacpp().bin_dir))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    methods = """  - {label: rtn-q4_0, backend: rtn, options: {bits: 4, group_size: 32},
     export: [native, gguf]}
  - {label: gptq-q4_1, backend: gptq, options: {bits: 4, group_size: 64, sym: false},
     export: [native, gguf]}
  - {label: llamacpp-q8_0, backend: llamacpp, options: {type: Q8_0}}
  - {label: ggml-q8_0, backend: ggml, options: {type: q8_0}}
  - {label: rtn-w3, backend: rtn, options: {bits: 3, group_size: 32}}
  - {label: rtn-mixed, backend: rtn,
     options: {bits: 4, group_size: 32, module_bits: {"*.mlp.down_proj": 8}},
     export: [native, gguf]}
  - {label: hqq-q4_1, backend: hqq, options: {bits: 4, group_size: 32}, export: [native, gguf]}"""
    recipe = _engine_recipe(tmp_path / "r.yaml", tiny_gguf, tmp_path / "run", methods)
    assert main(["run", str(recipe)]) == 0
    frame = pd.read_csv(tmp_path / "run" / "results.csv").set_index("method")
    gguf_rows = [
        "baseline",
        "rtn-q4_0",
        "gptq-q4_1",
        "llamacpp-q8_0",
        "ggml-q8_0",
        "rtn-mixed",
        "hqq-q4_1",
    ]
    assert list(frame.loc[gguf_rows, "gguf_type"]) == [
        "F32",
        "Q4_0",
        "Q4_1",
        "Q8_0",
        "Q8_0",
        "Q4_0",
        "Q4_1",
    ]
    # quantlab's own Q8_0 (the ggml backend, a GGUF checkpoint: exported and measured as one)
    # holds llama-quantize's blocks, so llama.cpp measures the same file twice
    blocks = [
        {
            t.name: bytes(t.data.tobytes())
            for t in gguf.GGUFReader(str(tmp_path / "run" / row / "model.gguf")).tensors
            if t.name.startswith("blk.")
        }
        for row in ("llamacpp-q8_0", "ggml-q8_0")
    ]
    assert blocks[0] == blocks[1]
    assert frame.loc["ggml-q8_0", "llamacpp_ppl"] == frame.loc["llamacpp-q8_0", "llamacpp_ppl"]
    # several widths: a type per tensor (the row names the most common), read back from the file
    written = {
        t.name: t.tensor_type.name
        for t in gguf.GGUFReader(str(tmp_path / "run" / "rtn-mixed" / "model.gguf")).tensors
        if t.name.startswith("blk.")
    }
    assert {n: t for n, t in written.items() if t != "Q4_0" and "norm" not in n} == {
        "blk.0.ffn_down.weight": "Q8_0",
        "blk.1.ffn_down.weight": "Q8_0",
    }
    assert (
        frame.loc["rtn-w3", ["gguf_type", "llamacpp_ppl"]].isna().all()
    )  # no GGUF: not measured there
    # the engine cross-check: llama.cpp's PPL of each F32 twin equals quantlab's own
    assert (frame.loc[gguf_rows, "llamacpp_engine_gap_pct"].abs() < 0.05).all(), frame[
        "llamacpp_engine_gap_pct"
    ]
    assert pd.isna(frame.loc["baseline", "llamacpp_kld_mean"])  # the base of the comparison
    assert (frame.loc[gguf_rows[1:], "llamacpp_kld_mean"] > 0).all()
    assert (frame.loc[gguf_rows, "llamacpp_decode_tokens_per_s"] > 0).all()
    assert frame.loc["baseline", "llamacpp_decode_x_float"] == 1.0
    # llama.cpp's own row: its checkpoint is the GGUF file, read back by transformers for the torch
    # scores
    metrics = json.loads((tmp_path / "run" / "llamacpp-q8_0" / "metrics.json").read_text())
    assert metrics["layers"]["gguf_tensor_types"]["Q8_0"] >= 14
    assert frame.loc["llamacpp-q8_0", "ppl"] == pytest.approx(
        frame.loc["baseline", "ppl"], rel=0.02
    )
    # a second run reuses every row and measures the engine again (speed of one session only)
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert (
        err.count("finished earlier with the same settings") == 8 and "llama.cpp phase done" in err
    )


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (
            "  - {label: a, backend: rtn, options: {bits: 3, group_size: 32}, export: [native, "
            "gguf]}",
            r"method 'a': a 3-bit grid with sym true has no GGUF block type",
        ),
        (
            "  - {label: a, backend: gptq, options: {bits: 4, group_size: 32, act_order: true}, "
            "export: [native, gguf]}",
            r"act_order needs static_groups: true",
        ),
        (
            "  - {label: a, backend: int8-weight-only, export: [native, gguf]}",
            r"cannot export GGUF",
        ),
        (
            "  - {label: a, backend: llamacpp, options: {type: Q4_K_X}}",
            r"llama-quantize has no type 'Q4_K_X'",
        ),
    ],
)
def test_gguf_and_engine_mistakes_are_one_line_before_any_work(
    methods, message, tiny_gguf, tmp_path, capsys
):
    from quantlab.cli import main

    _llamacpp()
    recipe = _engine_recipe(tmp_path / "r.yaml", tiny_gguf, tmp_path / "run", methods)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_missing_llamacpp_tools_say_how_to_get_them(tiny_gguf, tmp_path, monkeypatch, capsys):
    from quantlab.cli import main

    monkeypatch.setenv("QUANTLAB_LLAMACPP", str(tmp_path / "nowhere"))
    methods = (
        "  - {label: a, backend: rtn, options: {bits: 4, group_size: 32}, export: [native, gguf]}"
    )
    recipe = _engine_recipe(tmp_path / "r.yaml", tiny_gguf, tmp_path / "run", methods)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp's tools are not found" in err and "bash scripts/llamacpp.sh" in err
    assert not (tmp_path / "run").exists()


def test_the_llamacpp_engine_needs_a_gguf_row(tiny_gguf, tmp_path, capsys):
    from quantlab.cli import main

    recipe = _engine_recipe(
        tmp_path / "r.yaml",
        tiny_gguf,
        tmp_path / "run",
        "  - {label: a, backend: rtn, options: {bits: 4, group_size: 32}}",
    )
    assert main(["run", str(recipe)]) == 2
    assert "no method exports GGUF" in capsys.readouterr().err
