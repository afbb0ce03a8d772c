"""AWQ: its search never loses to no scaling, folding preserves the float model, the GEMM
packing follows AutoAWQ's published layout, and checkpoints round-trip."""

import copy
import json

import pytest
import torch

from quantlab.checkpoint import export_checkpoint, load_checkpoint
from quantlab.formats.awq_gemm import AWQLinear, pack_awq, unpack_awq
from quantlab.grid import fake_quant
from quantlab.quantizers.awq import AWQ, awq_search_clip, awq_search_scales, gram


def reference_pack_awq(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM packing as its format description states it: for 4 bits, word `col`
    holds columns col*8 + [0, 2, 4, 6, 1, 3, 5, 7] in nibbles 0..7 (written independently)."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_awq_packing_matches_published_order_and_round_trips():
    codes = torch.randint(0, 16, (40, 64), generator=torch.Generator().manual_seed(0))
    codes[0, :8] = torch.tensor([15, 0, 1, 2, 3, 4, 5, 6])
    packed = pack_awq(codes)
    assert torch.equal(packed, reference_pack_awq(codes))
    assert torch.equal(unpack_awq(packed), codes)
    # columns 0..7 = 15,0,1,2,3,4,5,6 -> nibbles hold columns 0,2,4,6,1,3,5,7 = 15,1,3,5,0,2,4,6
    assert packed[0, 0].item() & 0xFFFFFFFF == 0x6420531F


def _problem(seed=0, out_f=96, in_f=128, n=1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g)
    x[:, :6] *= 20  # salient input channels, the case AWQ exists for
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, x


@pytest.mark.parametrize(
    "bits,group,sym,duo",
    [(4, 32, False, True), (4, 64, True, False), (3, 32, False, True), (2, 32, False, False)],
)
def test_scale_search_never_worse_than_no_scaling(bits, group, sym, duo):
    w, x = _problem(bits)
    s, losses = awq_search_scales(
        w, gram(x), x.abs().mean(0), bits, group, sym, n_grid=10, duo_scaling=duo
    )
    assert losses.shape == (11,)
    # the objective, computed directly on the tokens, agrees with the second-moment form
    best = float(
        torch.nn.functional.mse_loss(x / s @ (fake_quant(w * s, bits, group, sym)).t(), x @ w.t())
    )
    none = float(torch.nn.functional.mse_loss(x @ fake_quant(w, bits, group, sym).t(), x @ w.t()))
    assert best == pytest.approx(float(losses.min()), rel=1e-3)
    assert none == pytest.approx(float(losses[0]), rel=1e-3)
    assert best <= none
    assert best < 0.9 * none  # with salient channels scaling really helps


def test_clip_search_does_not_increase_error():
    w, x = _problem(1, out_f=32)
    mx = awq_search_clip(w, gram(x[:256]), 4, 32, False, n_grid=20, max_shrink=0.5)
    assert mx.shape == (32, 4)
    org = w.abs().view(32, 4, 32).amax(2)
    assert (mx <= org + 1e-7).all() and (mx >= 0.5 * org - 1e-6).all()
    clipped = torch.clamp(w, -mx.repeat_interleave(32, 1), mx.repeat_interleave(32, 1))
    err = lambda v: float(((x[:256] @ (fake_quant(v, 4, 32, False) - w).t()) ** 2).mean())  # noqa: E731
    assert err(clipped) <= err(w) * (1 + 1e-4)
    assert (mx < org - 1e-7).any()  # it does clip somewhere


def test_folding_scales_preserves_the_float_function(tiny):
    """What AWQ does before it quantizes: divide each scale group's input by s (folded into the
    norm or linear in front) and multiply the linears' columns by s. With arbitrary positive
    scales in every group of every layer, the float model computes the same logits."""
    from quantlab.data import pydoc_text, tokenize
    from quantlab.quantizers.arch import arch_spec, decoder_layers
    from quantlab.quantizers.awq import fold_scales

    model, tok = tiny
    folded = copy.deepcopy(model)
    spec = arch_spec(folded)
    gen = torch.Generator().manual_seed(3)
    n = 0
    for layer in decoder_layers(folded, spec):
        for sg in spec.scale_groups:
            prev, lins = layer.get_submodule(sg.prev), [layer.get_submodule(m) for m in sg.linears]
            if isinstance(prev, torch.nn.Linear) and prev.out_features != lins[0].in_features:
                continue  # v_proj -> o_proj under GQA: AWQ skips it too
            s = torch.exp(torch.randn(lins[0].in_features, generator=gen))  # scales from 0.05 to 20
            fold_scales(prev, s)
            for lin in lins:
                lin.weight.data.mul_(s.view(1, -1))
            n += 1
    assert n == 6  # q/k/v, gate/up and down in both layers
    ids = tokenize(pydoc_text("calibration"), tok)[: 2 * 64].view(2, 64)
    with torch.inference_mode():
        a, b = model(ids).logits, folded(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    # and the check can fail: a scale that is not folded changes the function
    layer = decoder_layers(folded, spec)[0]
    layer.mlp.down_proj.weight.data.mul_(2)
    with torch.inference_mode():
        assert not torch.allclose(a, folded(ids).logits, atol=1e-2)


def test_awq_on_tiny_model_searches_then_quantizes(tiny, tmp_path):
    from quantlab.data import pydoc_text, tokenize

    model, tok = tiny
    ids = tokenize(pydoc_text("calibration"), tok)
    cal = ids[: 8 * 64].view(8, 64)
    backend = AWQ(AWQ.Config(bits=4, group_size=32, search_tokens=256))
    done = backend.quantize(copy.deepcopy(model), cal)
    q = done.model
    assert sum(isinstance(m, AWQLinear) for m in q.modules()) == 14
    # the search chose real scales somewhere (not always s = 1), and they lowered its objective
    searched = [v for v in done.layer_stats.values() if "awq_best_grid_index" in v]
    assert len(searched) == 12  # q, k, v, gate, up and down in two layers
    helped = [v for v in searched if v["awq_best_grid_index"] > 0]
    assert helped and all(v["awq_loss_best"] < v["awq_loss_identity"] for v in helped)
    # GQA here (4 heads, 2 kv heads): v_proj -> o_proj scaling is skipped, by design
    assert "awq_loss_identity" not in done.layer_stats["model.layers.0.self_attn.o_proj"]
    ckpt = export_checkpoint(q, tok, backend, tmp_path / "ckpt", source={}, label="a")
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    loaded = load_checkpoint(ckpt, dtype=torch.float32, device=torch.device("cpu")).model
    with torch.inference_mode():
        assert torch.equal(loaded(cal[:2]).logits, q(cal[:2]).logits)
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128, 64 // 8)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").shape == (4, 64)


def test_scale_folding_alone_keeps_the_float_model(tiny):
    """With 8 bits and fine groups, AWQ's model stays close to float: folding is exact."""
    from quantlab.data import pydoc_text, tokenize

    model, tok = tiny
    cal = tokenize(pydoc_text("calibration"), tok)[: 4 * 64].view(4, 64)
    q = (
        AWQ(AWQ.Config(bits=8, group_size=16, format="gptq", clip=False, search_tokens=128))
        .quantize(copy.deepcopy(model), cal)
        .model
    )
    with torch.inference_mode():
        a, b = model(cal).logits, q(cal).logits
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


def test_awq_options_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gemm format stores 4-bit weights only"):
        AWQ.Config(bits=3)
    AWQ.Config(bits=3, format="gptq")
    with pytest.raises(ValidationError, match="format gptq stores"):
        AWQ.Config(bits=5, format="gptq")


def test_next_inputs_float_calibrates_later_layers_on_float_outputs(tiny):
    """'float' (AutoAWQ's one pass per layer) and 'quantized' (a second pass) see the same
    inputs in layer 0, different ones from layer 1 on, and both quantize every layer."""
    from quantlab.data import pydoc_text, tokenize

    model, tok = tiny
    cal = tokenize(pydoc_text("calibration"), tok)[: 4 * 64].view(4, 64)
    stats = {}
    for mode in ("quantized", "float"):
        backend = AWQ(AWQ.Config(bits=4, group_size=32, search_tokens=128, next_inputs=mode))
        done = backend.quantize(copy.deepcopy(model), cal)
        assert all(
            not isinstance(m, torch.nn.Linear) or n == "lm_head"
            for n, m in done.model.named_modules()
        )
        stats[mode] = done.layer_stats
    first = "model.layers.0.self_attn.q_proj"
    second = "model.layers.1.self_attn.q_proj"
    assert stats["quantized"][first] == stats["float"][first]
    assert (
        stats["quantized"][second]["awq_loss_identity"]
        != stats["float"][second]["awq_loss_identity"]
    )


# ------------------------------------------------------------------ scoring by X^T X or forward


def _ranking_agrees(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Every pair of candidates that ``a`` tells apart by more than ``rtol`` is in the same
    order in ``b``."""
    da, db = a.view(-1, 1) - a.view(1, -1), b.view(-1, 1) - b.view(1, -1)
    apart = da.abs() > rtol * a.abs().max()
    return bool(((da.sign() == db.sign()) | ~apart).all())


@pytest.mark.parametrize("bits,group,duo", [(4, 32, True), (3, 64, False)])
def test_forward_scoring_ranks_candidates_as_the_second_moment_does(bits, group, duo):
    """The same objective two ways: sum((dW Sigma) * dW) / out and mean((x dW^T)^2). Not bit
    for bit: the two sum the same products in different orders (float32 matmuls, a float64
    total), so the losses agree to float rounding and the ranking and the chosen scales agree."""
    from quantlab.quantizers.awq import forward_mse, output_mse

    w, x = _problem(bits)
    args = dict(bits=bits, group_size=group, sym=False, n_grid=10, duo_scaling=duo)
    s_g, l_g = awq_search_scales(w, gram(x), x.abs().mean(0), **args)
    s_f, l_f = awq_search_scales(w, None, x.abs().mean(0), inputs=x, **args)
    assert torch.allclose(l_g, l_f, rtol=1e-4) and _ranking_agrees(l_g, l_f, 1e-4)
    assert torch.equal(s_g, s_f)
    dw = fake_quant(w, bits, group, False) - w
    assert forward_mse(dw, x, chunk=100) == pytest.approx(output_mse(dw, gram(x)), rel=1e-5)


def test_clip_blocks_from_tokens_are_the_second_moments_blocks():
    from quantlab.quantizers.awq import gram_blocks

    w, x = _problem(0)
    blocks = gram_blocks(x, 32)
    sig = gram(x)
    assert torch.allclose(blocks[1], sig[32:64, 32:64], rtol=1e-4, atol=1e-4)
    a = awq_search_clip(w, sig, 4, 32, False, n_grid=10)
    b = awq_search_clip(w, None, 4, 32, False, n_grid=10, blocks=blocks)
    assert torch.equal(a, b)


def test_the_way_flips_at_the_width_the_op_count_says():
    """X^T X costs t in^2 + C out in^2, the forward passes C t in out + t in g (C candidates):
    forward is cheaper past in* = (C t out + t g) / (t + C out)."""
    from quantlab.quantizers.awq import cheaper_way

    t, out_f, n_grid, g = 8192, 1536, 20, 128
    c = n_grid + 1
    flip = (c * t * out_f + t * g) / (t + c * out_f)  # ~6540
    assert cheaper_way(t, int(flip), out_f, n_grid, g) == "gram"
    assert cheaper_way(t, int(flip) + 1, out_f, n_grid, g) == "forward"
    # a 1.5B model's down_proj (8960 -> 1536): forward; the demo's widths (576, 1536 in;
    # search_tokens 8192): X^T X, as before the choice existed
    assert cheaper_way(t, 8960, 1536, n_grid, 128) == "forward"
    for in_f, out_f in [(576, 576 + 2 * 192), (576, 576), (576, 2 * 1536), (1536, 576)]:
        assert cheaper_way(t, in_f, out_f, n_grid, 64) == "gram"


def test_auto_scores_by_the_cheaper_way_and_both_ways_choose_the_same_scales(tiny, capsys):
    """On the tiny model (inputs 64 and 128 wide): 64 search tokens make every input cheaper
    by forward passes, 256 by X^T X (the op count's flip: ~62 and ~217 wide); the log says
    so, once per shape (q/k/v, o, gate/up, down).
    Forced either way, every layer chooses the same grid point."""
    from quantlab.data import pydoc_text, tokenize
    from quantlab.quantizers.awq import cheaper_way

    model, tok = tiny
    cal = tokenize(pydoc_text("calibration"), tok)[: 6 * 64].view(6, 64)
    assert cheaper_way(64, 128, 64, 20, 32) == "forward"
    assert cheaper_way(256, 128, 64, 20, 32) == "gram"
    stats = {}
    for tokens, way in [(64, "forward"), (256, "gram")]:
        capsys.readouterr()
        AWQ(AWQ.Config(bits=4, group_size=32, search_tokens=tokens)).quantize(
            copy.deepcopy(model), cal
        )
        said = [ln for ln in capsys.readouterr().err.splitlines() if "candidates scored" in ln]
        assert len(said) == 4 and all(f"scored by {way} (auto" in ln for ln in said), said
    for way in ("gram", "forward"):
        cfg = AWQ.Config(bits=4, group_size=32, search_tokens=256, score_on=way)
        stats[way] = AWQ(cfg).quantize(copy.deepcopy(model), cal).layer_stats
    for n, v in stats["gram"].items():
        if "awq_best_grid_index" in v:
            assert v["awq_best_grid_index"] == stats["forward"][n]["awq_best_grid_index"], n
            assert v["awq_loss_best"] == pytest.approx(stats["forward"][n]["awq_loss_best"], 1e-4)
