"""llama.cpp's quantizers in quantlab (quantlab.formats.ggml_quants), the importance matrix and its
files (quantlab.imatrix) and the ggml backend, checked against llama.cpp's own tools: for the
same F32 weights and the same imatrix file, quantlab's blocks are byte for byte what
``llama-quantize --pure`` writes, for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL, without and with
the importance matrix. The tools are built by scripts/llamacpp.sh; without them those tests
skip (QUANTLAB_REQUIRE_LLAMACPP=1 makes that a failure)."""

from __future__ import annotations

import os
import re
import subprocess

import gguf
import numpy as np
import pytest
import torch

from quantlab.errors import QuantlabError
from quantlab.formats import ggml_quants as gq
from quantlab.imatrix import (
    Imatrix,
    check_imatrix,
    compute_imatrix,
    gguf_names,
    read_imatrix,
    write_imatrix,
)

CPU = torch.device("cpu")
#: every 2-D tensor of the crafted file: [rows, columns] (16 blocks a row)
SHAPE = (128, 512)


def _tools():
    from quantlab.engines.llamacpp import find_llamacpp

    try:
        return find_llamacpp()
    except QuantlabError as e:
        if os.environ.get("QUANTLAB_REQUIRE_LLAMACPP") == "1":
            raise
        pytest.skip(str(e))


def _edge_blocks(a: np.ndarray, rng) -> np.ndarray:
    """Blocks that exercise the C code's corners: all zero, constant, all positive (Q4_1's
    minimum clamped to 0), all negative, |max| tied between signs, values on the quantization
    grid (rounding ties), below GROUP_MAX_EPS, signed zeros, one outlier."""
    blocks = a.reshape(a.shape[0], -1, gq.BLOCK)
    edits = [
        lambda b: b * 0,
        lambda b: np.full_like(b, 0.01),
        np.abs,
        lambda b: -np.abs(b),
        lambda b: np.where(
            np.arange(32) == 3, -np.abs(b).max(), np.where(np.arange(32) == 9, np.abs(b).max(), b)
        ),
        lambda b: rng.integers(-8, 8, 32).astype(np.float32) * np.float32(0.001),
        lambda b: np.full_like(b, 1e-20),
        lambda b: np.where(np.arange(32) % 2 == 0, np.float32(-0.0), b),
        lambda b: np.where(np.arange(32) == 17, b * 40, b),
        _iq4_tie,
    ]
    for r, edit in enumerate(edits):
        blocks[r, r % blocks.shape[1]] = edit(blocks[r, r % blocks.shape[1]]).astype(np.float32)
    return blocks.reshape(a.shape)


#: the column of _iq4_tie's weight that sits between two IQ4_NL levels (importance 0)
TIE_COLUMN = 9 * gq.BLOCK + 5


def _iq4_tie(b: np.ndarray) -> np.ndarray:
    """IQ4_NL levels times 2**-8, led by -127 (so the candidate 1/s fits exactly: d = 2**-8),
    and at column 5 the midpoint of levels 1 and 13: a tie, which best_index_int8 gives to the
    upper level. Its importance is 0, so it does not move the fitted scale."""
    rng = np.random.default_rng(9)
    levels = gq.IQ4NL_VALUES[rng.integers(1, 16, 32)]
    levels[0], levels[5] = -127, 7
    return (levels * np.float32(2.0**-8)).astype(np.float32)


@pytest.fixture(scope="module")
def crafted(tiny_gguf, tmp_path_factory):
    """An F32 llama GGUF (the tiny model's metadata, heavy-tailed weights with edge blocks) and
    an importance matrix for it: (file, {name: weights}, imatrix, its GGUF file)."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("ggml")
    reader = gguf.GGUFReader(str(tiny_gguf))
    writer = gguf.GGUFWriter(str(out / "f32.gguf"), "llama")
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            sub = (
                f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
            )
            writer.add_key_value(f.name, f.contents(), f.types[0], sub)
    weights = {}
    for t in reader.tensors:
        a = np.array(t.data, dtype=np.float32)
        if a.ndim == 2:  # llama-quantize takes any shape; larger rows give sigma2 long sums
            a = _edge_blocks((rng.standard_t(3, size=SHAPE) * 0.02).astype(np.float32), rng)
        weights[t.name] = a
        writer.add_tensor(t.name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = sorted(n for n in weights if n.startswith("blk.") and weights[n].ndim == 2)
    sums = {n: (rng.gamma(0.5, size=SHAPE[1]) * 50).astype(np.float32) for n in names}
    for n in names:
        sums[n][TIE_COLUMN] = 0
    sums[names[0]][:40] = 0  # columns no token reached
    sums[names[1]][:] = 0  # a tensor whose every importance is zero: d = 0 in llama.cpp too
    counts = {n: 1000 + 37 * i for i, n in enumerate(names)}
    counts[names[2]] = 0  # no token: llama-quantize takes importance 1
    im = Imatrix(sums, counts, ["crafted"], 4, 64)
    return out / "f32.gguf", weights, im, write_imatrix(im, out / "imatrix.gguf")


def _llama_quantize(tools, src, dst, qtype, *extra) -> dict[str, np.ndarray]:
    """llama-quantize --pure (every quantizable tensor in ``qtype``): {name: raw bytes} of the
    tensors it wrote in that type."""
    cmd = [str(tools.tool("llama-quantize")), "--pure", *map(str, extra), str(src), str(dst), qtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {
        t.name: np.array(t.data).reshape(t.data.shape[0], -1)
        for t in gguf.GGUFReader(str(dst)).tensors
        if t.tensor_type.name == qtype
    }


@pytest.mark.parametrize("qtype", gq.TYPES)
def test_blocks_are_byte_identical_to_llama_quantize(qtype, crafted, tmp_path, monkeypatch):
    tools = _tools()
    monkeypatch.setattr(gq, "CHUNK", 5000)  # slices of 9 rows and a last one of 2: all exact
    f32, weights, _, im_file = crafted
    im = read_imatrix(im_file)  # what quantlab reads back, as llama-quantize reads the file
    for label, extra in (("plain", ()), ("imatrix", ("--imatrix", im_file))):
        theirs = _llama_quantize(tools, f32, tmp_path / f"{label}.gguf", qtype, *extra)
        assert len(theirs) == 15, sorted(theirs)  # 14 linear layers and the token embedding
        for name, data in theirs.items():
            imp = im.importance(name) if extra and name in im.sums else None
            ours = gq.quantize(weights[name], qtype, imp)
            assert ours.shape == data.shape and ours.dtype == np.uint8
            bad = np.unique(np.nonzero(ours != data)[0])
            assert bad.size == 0, f"{qtype} {label} {name}: rows {bad[:5].tolist()} differ"


def test_the_legacy_imatrix_file_gives_the_same_bytes(crafted, tmp_path):
    """The .dat format written by quantlab is read by llama-quantize as quantlab reads it."""
    tools = _tools()
    f32, weights, im, _ = crafted
    dat = write_imatrix(im, tmp_path / "imatrix.dat", legacy=True)
    back = read_imatrix(dat)
    assert back.legacy and sorted(back.sums) == sorted(im.sums)
    for name in im.sums:  # sum/count * ncall / ncall: the importance to float32 rounding
        np.testing.assert_allclose(back.importance(name), im.importance(name), rtol=1e-6)
    theirs = _llama_quantize(tools, f32, tmp_path / "q.gguf", "Q4_1", "--imatrix", dat)
    for name, data in theirs.items():
        imp = back.importance(name) if name in back.sums else None
        assert np.array_equal(gq.quantize(weights[name], "Q4_1", imp), data), name


def test_the_importance_search_lowers_the_weighted_error():
    """With importance, llama.cpp's searches keep the candidate with the least
    importance-weighted error, so quantlab's blocks must beat plain rounding by that measure
    (an independent property: a sign error in a refit would break it)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_t(4, size=(64, 256)) * 0.02).astype(np.float32)
    imp = rng.gamma(0.5, size=256).astype(np.float32) * 10
    for qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"):
        errs = []
        for use in (None, imp):
            data = gq.quantize(w, qtype, use)
            back = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, qtype))
            errs.append(float(((back - w) ** 2 * imp).sum()))
        assert errs[1] < errs[0], (qtype, errs)


def test_c_rounding_rules():
    """The C code's rounding, which numpy's defaults would get wrong: Q8_0's roundf sends
    halves away from zero; Q4_0 truncates x/d + 8.5 (so a code sits at 8 - 8 = -8 for the
    largest magnitude, and 15 caps +8); an all-zero block has d = -0 (max / -8)."""
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127, 2.5, -2.5, 0.5]
    data = gq.quantize(x, "Q8_0")
    assert np.frombuffer(data[0, :2].tobytes(), "<f2")[0] == 1.0
    assert data[0, 2:6].view(np.int8).tolist() == [127, 3, -3, 1]
    x = np.zeros((1, 32), np.float32)
    x[0, :3] = [-8, 8, 4]  # d = -8 / -8 = 1 ... max is the first |x| = 8: -8, d = 1
    codes = gq.quantize(x, "Q4_0")[0, 2:]
    lo = codes & 0x0F
    assert lo[:3].tolist() == [0, 15, 12] and lo[3] == 8
    zero = gq.quantize(np.zeros((1, 32), np.float32), "Q4_0")
    assert zero[0, :2].tolist() == [0x00, 0x80] and (zero[0, 2:] == 0x88).all()


def test_an_imatrix_of_another_model_is_one_clear_error(tiny):
    model, _ = tiny
    layers = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    ]
    names = gguf_names(model, layers)
    columns = {names[n]: model.get_submodule(n).in_features for n in layers}
    good = Imatrix(
        {g: np.ones(c, np.float32) for g, c in columns.items()}, dict.fromkeys(columns, 1)
    )
    check_imatrix(good, columns, "x")
    other = Imatrix(
        {**{g: np.ones(c * 9, np.float32) for g, c in columns.items()}}, dict.fromkeys(columns, 1)
    )
    with pytest.raises(
        QuantlabError,
        match=r"not this model's: 14 entries of another width .*576 columns, "
        r"the tensor has 64.*imatrix: true",
    ):
        check_imatrix(other, columns, "'other.gguf'")
    del good.sums["blk.1.ffn_down.weight"]
    with pytest.raises(QuantlabError, match=r"no entry for 1 tensors \(blk.1.ffn_down.weight\)"):
        check_imatrix(good, columns, "x")


def test_rows_that_are_not_whole_blocks_are_one_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantlab.quantizers.ggml import Ggml

    with pytest.raises(
        QuantlabError, match=r"rows of 48 weights are not a multiple of 32, the block of Q4_0"
    ):
        gq.quantize(np.zeros((4, 48), np.float32), "Q4_0")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(cfg)
    with pytest.raises(
        QuantlabError, match=r"'model.layers.0.self_attn.q_proj' of shape \(48, 48\): rows of 48"
    ):
        Ggml(Ggml.Config(type="iq4_nl")).check(model)
    with pytest.raises(Exception, match="Q4_K"):
        Ggml.Config(type="Q4_K")


def _pydoc_file(path, n_docs: int = 40):
    from quantlab.data import pydoc_text

    text = "\n\n".join(pydoc_text("calibration").documents[:n_docs])
    path.write_text(text, encoding="utf-8")
    return path, text


def test_llama_imatrix_files_are_read_and_quantlab_computes_the_same(tiny, tiny_gguf, tmp_path):
    """llama-imatrix's own GGUF file is read, and quantlab's importance of the same windows
    (its tokens, BOS first in every chunk, as llama-imatrix feeds them) equals llama.cpp's."""
    tools = _tools()
    model, tok = tiny
    ctx, chunks = 64, 4
    text_file, text = _pydoc_file(tmp_path / "cal.txt")
    out = tmp_path / "imatrix.gguf"
    proc = subprocess.run(
        [
            str(tools.tool("llama-imatrix")),
            "-m",
            str(tiny_gguf),
            "-f",
            str(text_file),
            "-o",
            str(out),
            "-c",
            str(ctx),
            "--chunks",
            str(chunks),
            "--no-ppl",
            "-t",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = read_imatrix(out)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor([ids[i * ctx : (i + 1) * ctx] for i in range(chunks)])
    windows[:, 0] = tok.bos_token_id
    layers = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    ]
    ours = compute_imatrix(model, windows, gguf_names(model, layers))
    assert sorted(theirs.sums) == sorted(ours.sums) and len(ours.sums) == 14
    assert theirs.chunk_count == chunks and theirs.chunk_size == ctx
    for name in ours.sums:
        assert theirs.counts[name] == ours.counts[name] == ctx * chunks
        np.testing.assert_allclose(
            ours.importance(name), theirs.importance(name), rtol=1e-3, atol=1e-7, err_msg=name
        )


def test_the_ggml_backend_writes_llama_quantizes_file_and_llama_cpp_runs_it(
    tiny_model_dir, tiny_gguf, tmp_path
):
    """The backend's checkpoint: the whole GGUF file, every tensor (q/k rows permuted, token
    embedding Q8_0, norms F32), equals what llama-quantize makes of the F32 export with the
    importance matrix saved beside it; llama-perplexity runs it."""
    from quantlab.checkpoint import export_checkpoint
    from quantlab.data import pydoc_text, sample_calibration, tokenize
    from quantlab.engines.llamacpp import perplexity
    from quantlab.formats.gguf import export_gguf
    from quantlab.models import load_model
    from quantlab.quantizers.base import QuantizeContext
    from quantlab.quantizers.ggml import Ggml

    tools = _tools()
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    text = pydoc_text("calibration")
    cal = sample_calibration(tokenize(text, lm.tokenizer), text, 4, 64, 0).ids
    export_gguf(lm.model, tmp_path / "f32.gguf", tiny_gguf)
    backend = Ggml(Ggml.Config(type="iq4_nl", imatrix=True))
    source = {"gguf": str(tiny_gguf)}
    done = backend.quantize(lm.model, cal, QuantizeContext(lm.tokenizer, source, tmp_path))
    ckpt = export_checkpoint(
        done, lm.tokenizer, backend, tmp_path / "ckpt", source=source, label="ggml"
    )
    ours = {t.name: t for t in gguf.GGUFReader(str(ckpt / "model.gguf")).tensors}
    _llama_quantize(
        tools,
        tmp_path / "f32.gguf",
        tmp_path / "theirs.gguf",
        "IQ4_NL",
        "--token-embedding-type",
        "q8_0",
        "--imatrix",
        ckpt / "imatrix" / "imatrix.gguf",
    )
    theirs = gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors
    assert sorted(ours) == sorted(t.name for t in theirs)
    types = {}
    for t in theirs:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        assert ours[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(ours[t.name].data), np.asarray(t.data)), t.name
    assert types == {"IQ4_NL": 14, "Q8_0": 1, "F32": 5}
    file_types = [
        int(gguf.GGUFReader(str(p)).fields["general.file_type"].contents())
        for p in (ckpt / "model.gguf", tmp_path / "theirs.gguf")
    ]
    assert (
        file_types == [gguf.LlamaFileType.MOSTLY_IQ4_NL] * 2
    )  # the "ftype" llama.cpp's tools show
    text_file, _ = _pydoc_file(tmp_path / "eval.txt")
    base = perplexity(tools, tmp_path / "f32.gguf", text_file, ctx=64, chunks=4, threads=2)
    quant = perplexity(tools, ckpt / "model.gguf", text_file, ctx=64, chunks=4, threads=2)
    assert np.isfinite(quant["ppl"]) and quant["ppl"] == pytest.approx(base["ppl"], rel=0.2), (
        quant,
        base,
    )


def test_a_foreign_imatrix_file_stops_a_run_before_any_quantization(
    crafted, tiny_gguf, tmp_path, capsys
):
    """A recipe naming another model's imatrix file: one error line naming what differs and
    what would work, before any method is quantized."""
    from quantlab.cli import main

    _, _, im, _ = crafted
    foreign = Imatrix({n: np.ones(96, np.float32) for n in im.sums}, dict.fromkeys(im.sums, 10))
    path = write_imatrix(foreign, tmp_path / "other.gguf")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{source: "{tiny_gguf}"}}
methods:
  - {{label: ok, backend: ggml, options: {{type: q8_0}}}}
  - {{label: foreign, backend: ggml, options: {{type: q4_0, imatrix_file: "{path}"}}}}
eval: {{seq_len: 64, max_windows: 2, speed: {{enabled: false}}}}
output: {{dir: "{tmp_path / "run"}"}}
""")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err, err
    assert re.search(
        r"importance matrix '.*other.gguf' is not this model's: 14 entries of another width "
        r"\(blk.0.attn_k.weight \(96 columns, the tensor has 64\)",
        err,
    ), err
    assert not (tmp_path / "run" / "ok" / "checkpoint").exists()


@pytest.mark.slow
def test_the_demo_models_file_equals_llama_quantizes(tmp_path):
    """The real model (576-wide rows, a 49152 x 576 tied embedding): quantlab's Q4_0 with an
    importance matrix (2 calibration windows: cheap) is llama-quantize's, tensor for tensor."""
    from quantlab.data import pydoc_text, sample_calibration, tokenize
    from quantlab.formats.gguf import export_ggml, export_gguf
    from quantlab.models import _demo_gguf, load_model

    tools = _tools()
    lm = load_model("smollm2-135m", dtype=torch.float32, device=CPU)
    text = pydoc_text("calibration")
    cal = sample_calibration(tokenize(text, lm.tokenizer), text, 2, 128, 0).ids
    layers = [
        n for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    ]
    im = compute_imatrix(lm.model, cal, gguf_names(lm.model, layers))
    write_imatrix(im, tmp_path / "imatrix.gguf")
    template = _demo_gguf("smollm2-135m")
    export_gguf(lm.model, tmp_path / "f32.gguf", template)
    importance = {n: im.importance(n) for n in im.sums}
    export_ggml(lm.model, tmp_path / "ours.gguf", template, "Q4_0", importance=importance)
    _llama_quantize(
        tools,
        tmp_path / "f32.gguf",
        tmp_path / "theirs.gguf",
        "Q4_0",
        "--token-embedding-type",
        "q8_0",
        "--imatrix",
        tmp_path / "imatrix.gguf",
    )
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    theirs = gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors
    assert len(theirs) == len(ours) == 272
    for t in theirs:
        assert ours[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(ours[t.name].data), np.asarray(t.data)), t.name


# ------------------------------------------------------- search: awq (format-aware scales)


@pytest.mark.parametrize("qtype", gq.TYPES)
def test_fake_quant_reads_the_blocks_back_as_ggml_does(qtype):
    """What the search scores is exactly what llama.cpp will compute with: fake_quant equals
    gguf-py's dequantization of quantize's bytes (float16 scales included), with and without
    importance."""
    from gguf import quants

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 256)) * rng.random(256) * 3).astype(np.float32)
    for imp in (None, rng.random(256).astype(np.float32) + 0.01):
        data = gq.quantize(w, qtype, imp)
        ref = quants.dequantize(data, getattr(gguf.GGMLQuantizationType, qtype))
        assert np.array_equal(gq.fake_quant(w, qtype, imp), ref.astype(np.float32)), qtype


@pytest.mark.parametrize("qtype", ["Q4_0", "IQ4_NL"])
def test_the_format_aware_search_never_loses_to_no_search(qtype):
    """On its own objective (output MSE of llama.cpp's quantizer with importance), candidate 0
    is exactly no search, the returned scales are the argmin, and on inputs with a few loud
    channels (what AWQ exploits) the search strictly wins."""
    from quantlab.quantizers.awq import gram, output_mse
    from quantlab.quantizers.ggml_awq import ggml_search_scales

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) * (1 + 20 * (torch.rand(128, generator=g) > 0.95))
    w = torch.randn(64, 128, generator=g) * 0.05
    sigma = gram(x)
    imp = x.pow(2).mean(0).numpy().astype(np.float32)
    s, losses = ggml_search_scales(w, sigma, x.abs().mean(0), qtype, imp, 10, True)
    plain = torch.from_numpy(gq.fake_quant(w.numpy(), qtype, imp))
    assert float(losses[0]) == pytest.approx(output_mse(plain - w, sigma), rel=1e-6)
    wq = torch.from_numpy(gq.fake_quant((w * s).numpy(), qtype, imp / (s * s).numpy())) / s
    assert output_mse(wq - w, sigma) == pytest.approx(float(losses.min()), rel=1e-6)
    assert float(losses.min()) < 0.9 * float(losses[0]), losses


def test_search_awq_folds_scales_and_llama_cpp_runs_the_file(tiny_model_dir, tiny_gguf, tmp_path):
    """ggml search: awq on the tiny model: the float model's function is unchanged by the
    folding; every linear's chosen loss is at most no search's; the file is what llama-quantize
    makes of the folded F32 model with the saved (rescaled) imatrix, and llama-perplexity runs
    it; a search knob without the search is one clear error."""
    from pydantic import ValidationError

    from quantlab.checkpoint import export_checkpoint
    from quantlab.data import pydoc_text, sample_calibration, tokenize
    from quantlab.engines.llamacpp import perplexity
    from quantlab.formats.gguf import export_gguf
    from quantlab.models import load_model
    from quantlab.quantizers.base import QuantizeContext
    from quantlab.quantizers.ggml import Ggml

    with pytest.raises(ValidationError, match="only apply with search: awq"):
        Ggml.Config(n_grid=5)
    tools = _tools()
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    text = pydoc_text("calibration")
    cal = sample_calibration(tokenize(text, lm.tokenizer), text, 4, 64, 0).ids
    before = lm.model(cal[:2]).logits
    backend = Ggml(Ggml.Config(type="q4_0", imatrix=True, search="awq", n_grid=8))
    source = {"gguf": str(tiny_gguf)}
    rec_model = backend.quantize(lm.model, cal, QuantizeContext(lm.tokenizer, source, tmp_path))
    torch.testing.assert_close(lm.model(cal[:2]).logits, before, rtol=1e-4, atol=1e-4)
    stats = {k: v for k, v in rec_model.layer_stats.items() if "search_loss_best" in v}
    assert len(stats) == 2 * 6  # two layers: q/k/v, gate/up and down (o: GQA, not scaled)
    assert all(v["search_loss_best"] <= v["search_loss_identity"] for v in stats.values())
    assert any(v["search_best_grid_index"] > 0 for v in stats.values()), stats
    ckpt = export_checkpoint(
        rec_model, lm.tokenizer, backend, tmp_path / "ckpt", source=source, label="ggml"
    )
    # the saved importance is the folded model's own (inputs x / s): recomputed, it agrees
    saved = read_imatrix(ckpt / "imatrix" / "imatrix.gguf")
    names = gguf_names(lm.model, [n for n in stats])
    again = compute_imatrix(lm.model, cal, names)
    for n in names.values():
        np.testing.assert_allclose(saved.importance(n), again.importance(n), rtol=1e-3, err_msg=n)
    export_gguf(lm.model, tmp_path / "folded.gguf", tiny_gguf)
    _llama_quantize(
        tools,
        tmp_path / "folded.gguf",
        tmp_path / "theirs.gguf",
        "Q4_0",
        "--token-embedding-type",
        "q8_0",
        "--imatrix",
        ckpt / "imatrix" / "imatrix.gguf",
    )
    ours = {t.name: t for t in gguf.GGUFReader(str(ckpt / "model.gguf")).tensors}
    for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors:
        assert np.array_equal(np.asarray(ours[t.name].data), np.asarray(t.data)), t.name
    text_file, _ = _pydoc_file(tmp_path / "eval.txt")
    quant = perplexity(tools, ckpt / "model.gguf", text_file, ctx=64, chunks=4, threads=2)
    assert np.isfinite(quant["ppl"]), quant
