"""RTN against an independent float64 NumPy dequantize-and-compare implementation."""

import numpy as np
import pytest
import torch

from quantlab.errors import QuantlabError
from quantlab.formats.gptq_v1 import PackedLinear
from quantlab.grid import quantize_matrix
from quantlab.quantizers.rtn import RTN


def numpy_rtn(w: np.ndarray, bits: int, group: int, sym: bool) -> np.ndarray:
    """Fake-quantize W [out, in] group by group, written from the grid definition."""
    maxq = 2**bits - 1
    out = np.empty_like(w, dtype=np.float64)
    g = w.shape[1] if group == -1 else group
    for o in range(w.shape[0]):
        for j in range(0, w.shape[1], g):
            x = w[o, j : j + g].astype(np.float64)
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            if sym:
                amax = max(abs(lo), hi)
                scale, zero = 2 * amax / maxq, (maxq + 1) // 2
            else:
                scale = (hi - lo) / maxq
            scale = float(np.float16(max(scale, np.finfo(np.float16).tiny)))  # stored as fp16
            if not sym:
                zero = np.clip(np.round(-lo / scale), 0, maxq)
            q = np.clip(np.round(x / scale) + zero, 0, maxq)
            out[o, j : j + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize(
    "bits,group,sym",
    [(4, 32, True), (4, 32, False), (3, 64, True), (2, 16, False), (8, -1, True), (6, 32, False)],
)
def test_rtn_matches_numpy_reference(bits, group, sym):
    torch.manual_seed(bits)
    w = torch.randn(64, 128) * 0.05
    w[3, 5] = 0.9  # an outlier row
    codes, scales, zeros = quantize_matrix(w, bits, group, sym)
    g = 128 if group == -1 else group
    layer = PackedLinear.from_codes(
        codes, scales, zeros, torch.arange(128) // g, bits, group, None, torch.float32
    )
    ref = numpy_rtn(w.numpy(), bits, group, sym)
    # the packed layer, unpacked from its int32 words, encodes the reference weights
    np.testing.assert_allclose(layer.dequantize().numpy(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(layer.weight.numpy(), ref, rtol=0, atol=1e-6)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    errs = []
    for bits in range(2, 9):
        codes, s, z = quantize_matrix(w, bits, 32, False)
        what = (codes.view(64, 4, 32) - z.t().unsqueeze(-1)).float() * s.t().unsqueeze(-1)
        errs.append(float((what.view(64, 128) - w).pow(2).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_rtn_backend_replaces_linears_and_keeps_lm_head(tiny):
    import copy

    model, _ = tiny
    q = RTN(RTN.Config(bits=4, group_size=32)).quantize(copy.deepcopy(model), None).model
    packed = [n for n, m in q.named_modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 2 * 7  # q k v o gate up down per layer
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, PackedLinear)
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_group_size_that_does_not_divide_names_layer_and_fits(tiny):
    model, _ = tiny
    with pytest.raises(QuantlabError) as e:
        RTN(RTN.Config(bits=4, group_size=48)).check(model)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "64" in msg and "32" in msg


def test_quantizing_tied_lm_head_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(QuantlabError, match="tied"):
        RTN(RTN.Config(bits=4, group_size=32, skip=[])).check(model)


# ------------------------------------------------------------ scale_search: mse | importance


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_clipping_search_is_never_worse_than_plain_rounding_by_its_measure(sym, weighted):
    from quantlab.grid import fake_quant
    from quantlab.quantizers.rtn import search_clip

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=gen) * torch.rand(1, 128, generator=gen)
    w[0, 5] = 9.0  # an outlier: clipping pays off in its group
    imp = torch.rand(128, generator=gen) ** 4 * 10 if weighted else None
    weights = imp if imp is not None else torch.ones(128)

    def cost(q):
        return float((((q - w) ** 2) * weights).sum())

    plain = fake_quant(w, 3, 32, sym)
    searched = fake_quant(search_clip(w, imp, 3, 32, sym, n_grid=20, max_shrink=0.5), 3, 32, sym)
    assert cost(searched) <= cost(plain) * (1 + 1e-6)
    assert cost(searched) < 0.95 * cost(plain)  # and with an outlier it finds a better range


def test_importance_rtn_weights_the_error_by_the_inputs_it_will_see(tiny):
    import copy

    from quantlab.quantizers.rtn import RTNConfig, input_mean_squares

    model, _ = tiny
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plain = RTN(RTNConfig(bits=3, group_size=32, sym=False))
    imp = RTN(RTNConfig(bits=3, group_size=32, sym=False, scale_search="importance"))
    assert imp.needs_calibration and not plain.needs_calibration
    with pytest.raises(QuantlabError, match="needs calibration"):
        imp.quantize(copy.deepcopy(model), None)
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    stats = input_mean_squares(model, names, calib)
    a, done = (
        plain.quantize(copy.deepcopy(model), None).model,
        imp.quantize(copy.deepcopy(model), calib),
    )
    b = done.model
    assert "clip search" in done.stage_seconds and "input statistics" in done.stage_seconds
    for n in names:  # the weighted error of every layer is no larger than plain rounding's
        w = model.get_submodule(n).weight.float()
        ea = float((((a.get_submodule(n).dequantize() - w) ** 2) * stats[n]).sum())
        eb = float((((b.get_submodule(n).dequantize() - w) ** 2) * stats[n]).sum())
        assert eb <= ea * (1 + 1e-6), n
