"""GPTQ: the property that makes it worth having, its options, and its checkpoints."""

import copy
import json

import pytest
import torch

from quantlab.checkpoint import export_checkpoint, load_checkpoint
from quantlab.grid import dequantize_matrix, quantize_matrix
from quantlab.quantizers.gptq import GPTQ, gptq_quantize


def _layer_problem(seed=0, out_f=64, in_f=128, n=2048):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few loud channels, as in real activations
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(n, in_f, generator=g) @ mix
    x[:, :4] *= 8
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, x


def _out_err(w, w_hat, x):
    return float(((x @ (w - w_hat).t()) ** 2).mean())


@pytest.mark.parametrize(
    "bits,group,sym,act_order,static",
    [
        (4, 32, True, False, False),
        (4, 32, False, False, False),
        (3, 32, True, False, False),
        (2, 64, False, False, False),
        (4, 32, True, True, False),
        (4, 32, True, True, True),
        (4, -1, True, False, False),
        (8, 32, True, False, False),
    ],
)
def test_gptq_output_error_not_worse_than_rtn(bits, group, sym, act_order, static):
    w, x = _layer_problem(bits)
    h = 2 * x.t() @ x / x.shape[0]
    codes, scales, zeros, g_idx = gptq_quantize(
        w, h, bits, group, sym, act_order=act_order, static_groups=static
    )
    w_gptq = dequantize_matrix(codes, scales, zeros, g_idx)
    rc, rs, rz = quantize_matrix(w, bits, group, sym)
    gsz = 128 if group == -1 else group
    w_rtn = dequantize_matrix(rc, rs, rz, torch.arange(128) // gsz)
    assert _out_err(w, w_gptq, x) <= _out_err(w, w_rtn, x)
    if bits <= 4:  # at low bits the gain is large, not a tie
        assert _out_err(w, w_gptq, x) < 0.8 * _out_err(w, w_rtn, x)
    assert codes.min() >= 0 and codes.max() < 2**bits
    if act_order and not static:
        assert not torch.equal(g_idx, torch.arange(128) // gsz)  # groups follow importance
    else:
        assert torch.equal(g_idx, torch.arange(128) // gsz)


def test_dead_inputs_and_identity_hessian():
    w, _ = _layer_problem()
    h = torch.eye(128)
    h[5, 5] = 0  # an input that never fires
    codes, scales, zeros, g_idx = gptq_quantize(w, h, 4, 32, True)
    w_hat = dequantize_matrix(codes, scales, zeros, g_idx)
    # with H = I (no correlations) GPTQ reduces to RTN on the other columns
    rc, rs, rz = quantize_matrix(
        torch.cat([w[:, :5], torch.zeros(64, 1), w[:, 6:]], 1), 4, 32, True
    )
    w_rtn = dequantize_matrix(rc, rs, rz, torch.arange(128) // 32)
    assert torch.allclose(w_hat, w_rtn, atol=1e-6)


def test_gptq_backend_on_tiny_model_beats_rtn_and_round_trips(tiny, tmp_path):
    from quantlab.bench.perplexity import gptq_plan, score
    from quantlab.data import pydoc_text, tokenize
    from quantlab.quantizers.rtn import RTN

    model, tok = tiny
    ids = tokenize(pydoc_text("calibration"), tok)
    cal = ids[: 16 * 64].view(16, 64)
    backend = GPTQ(GPTQ.Config(bits=3, group_size=32, act_order=True))
    done = backend.quantize(copy.deepcopy(model), cal)
    q = done.model
    assert len(done.layer_stats) == 14
    # on the calibration windows themselves GPTQ must fit the float model's outputs better
    with torch.inference_mode():
        ref = model(cal).logits
        err_gptq = float((q(cal).logits - ref).pow(2).mean())
        r = RTN(RTN.Config(bits=3, group_size=32)).quantize(copy.deepcopy(model), None).model
        err_rtn = float((r(cal).logits - ref).pow(2).mean())
    assert err_gptq < err_rtn
    ckpt = export_checkpoint(q, tok, backend, tmp_path / "ckpt", source={}, label="g")
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["desc_act"] is True and qc["bits"] == 3
    loaded = load_checkpoint(ckpt, dtype=torch.float32, device=torch.device("cpu")).model
    with torch.inference_mode():
        assert torch.equal(loaded(cal[:2]).logits, q(cal[:2]).logits)
    assert score(loaded, gptq_plan(cal[:2].reshape(-1), 64))[0].isfinite().all()


def test_gptq_options_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="GPTQ bits must be one of 2, 3, 4, 8"):
        GPTQ.Config(bits=5)
    with pytest.raises(ValidationError):
        GPTQ.Config(damp_percent=0)


def test_staged_layer_runner_equals_the_layer(tiny):
    """Running a pre-norm layer stage by stage gives the layer's own output, and hands over
    the inputs each linear group really sees."""
    from quantlab.data import pydoc_text, tokenize
    from quantlab.quantizers.arch import arch_spec
    from quantlab.quantizers.sequential import first_layer_inputs, run_layer, staged_prenorm_layer

    model, tok = tiny
    spec = arch_spec(model)
    layers = model.model.layers
    cal = tokenize(pydoc_text("calibration"), tok)[: 4 * 64].view(4, 64)
    hidden, kwargs = first_layer_inputs(model, layers, cal, 2)
    seen = {}
    got = staged_prenorm_layer(
        layers[0],
        spec.prenorm,
        hidden,
        kwargs,
        lambda stage, xs: seen.setdefault(stage, [x.shape for x in xs]),
    )
    want = run_layer(layers[0], hidden, kwargs)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    # every batch's input, computed on demand
    assert seen == {
        "attn_in": [(2, 64, 64)] * 2,
        "o_in": [(2, 64, 64)] * 2,
        "mlp_in": [(2, 64, 64)] * 2,
        "down_in": [(2, 64, 128)] * 2,
    }
    # a stage nobody consumes costs nothing and changes nothing
    untouched = staged_prenorm_layer(
        layers[0], spec.prenorm, hidden, kwargs, lambda stage, xs: None
    )
    for a, b in zip(untouched, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_staged_and_hook_based_gptq_agree(tiny):
    """The staged runner is an optimisation: it must quantize exactly like the generic path."""
    from quantlab.data import pydoc_text, tokenize
    from quantlab.quantizers.arch import ARCHS

    model, tok = tiny
    cal = tokenize(pydoc_text("calibration"), tok)[: 8 * 64].view(8, 64)
    a = GPTQ(GPTQ.Config(bits=4, group_size=32)).quantize(copy.deepcopy(model), cal).model
    spec = ARCHS["llama"]
    try:
        ARCHS["llama"] = type(spec)(layers=spec.layers, sequential=spec.sequential, prenorm=None)
        b = GPTQ(GPTQ.Config(bits=4, group_size=32)).quantize(copy.deepcopy(model), cal).model
    finally:
        ARCHS["llama"] = spec
    for (na, ma), (_, mb) in zip(a.named_modules(), b.named_modules()):
        if hasattr(ma, "qweight"):
            assert torch.equal(ma.qweight, mb.qweight), na
            assert torch.allclose(ma.scales.float(), mb.scales.float()), na


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_linears_solve_like_separate_ones(act_order):
    """GPTQ is row-independent given H, so q/k/v (or gate/up) stacked into one matrix get the
    same codes, grids and column order as each solved alone (what the backend relies on)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=gen)
    h = x.t() @ x * (2 / x.shape[0])
    w1, w2 = torch.randn(96, 256, generator=gen), torch.randn(64, 256, generator=gen)
    stacked = gptq_quantize(torch.cat([w1, w2]), h, 4, 64, False, act_order=act_order)
    one, two = (gptq_quantize(w, h, 4, 64, False, act_order=act_order) for w in (w1, w2))
    assert torch.equal(stacked[0], torch.cat([one[0], two[0]]))
    assert torch.equal(stacked[1], torch.cat([one[1], two[1]], dim=1))
    assert torch.equal(stacked[2], torch.cat([one[2], two[2]], dim=1))
    assert torch.equal(stacked[3], one[3]) and torch.equal(stacked[3], two[3])


def test_gptqmodel_engine_names_its_extra_when_missing():
    import importlib.util

    from quantlab.errors import MissingDependencyError

    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("gptqmodel is installed here (tests/test_interop.py runs the engine)")
    GPTQ(GPTQ.Config(engine="quantlab")).check_dependencies()
    with pytest.raises(MissingDependencyError, match=r"quantlab\[gptq\]"):
        GPTQ(GPTQ.Config(engine="gptqmodel")).check_dependencies()
