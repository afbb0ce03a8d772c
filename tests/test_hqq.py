"""HQQ: the grid equals a direct implementation of the paper's half-quadratic updates, the
optimiser lowers the error it minimises, the layout round-trips exactly (also through a
checkpoint reloaded in a fresh process), int4pack and GGUF Q4_1 take its float zero points,
and bad options are clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch

from quantlab.checkpoint import export_checkpoint, read_sidecar
from quantlab.errors import RecipeError
from quantlab.formats import LAYOUTS
from quantlab.formats.gguf import export_gguf
from quantlab.formats.kernels import Int4Pack
from quantlab.models import load_model
from quantlab.quantizers.hqq import HQQBackend, HQQConfig, hqq_grid
from quantlab.recipe import parse_recipe

CPU = torch.device("cpu")


def _weight(out_f=96, in_f=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[torch.rand(out_f, in_f, generator=g) < 0.002] *= 10  # a few outliers, as in real layers
    return w


def _paper_hqq(w: torch.Tensor, bits: int, group: int, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """HQQ as the paper writes it (Badri & Shaji 2023, with the hqq library's defaults): per
    group, scale from min-max, then for each iteration W_e = shrink_p(W - dequant(W)) and the
    zero point in closed form, stopping when the mean |error| stops falling."""
    maxq = 2**bits - 1
    wg = w.reshape(-1, group).double()
    lo, hi = wg.min(dim=1, keepdim=True).values, wg.max(dim=1, keepdim=True).values
    s_inv = (maxq / (hi - lo)).clamp(max=2e4)
    z = -lo * s_inv
    if bits == 4:
        z = torch.round(z)
    best = float("inf")
    for _ in range(iters):
        q = torch.round(wg * s_inv + z).clamp(0, maxq)
        r = (q - z) / s_inv
        e = wg - r
        e = torch.sign(e) * torch.relu(e.abs() - e.abs().pow(p - 1) / beta)
        z = (q - (wg - e) * s_inv).mean(dim=1, keepdim=True)
        beta *= kappa
        err = float((wg - r).abs().mean())
        if err >= best:
            break
        best = err
    return (1 / s_inv).reshape(w.shape[0], -1), z.reshape(w.shape[0], -1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_grid_is_the_papers_half_quadratic_solution(bits):
    w = _weight()
    q = hqq_grid(w, bits, 64)
    scale, zero = _paper_hqq(w, bits, 64)
    # stored in float16: the same numbers to float16's precision
    assert torch.allclose(q.scales.t().double(), scale, rtol=1e-3, atol=0)
    assert torch.allclose(q.zeros.t().double(), zero, rtol=2e-3, atol=2e-3)
    assert q.zeros.dtype == torch.float32 and not torch.equal(
        q.zeros, q.zeros.round()
    )  # real zero points


def _lp(w: torch.Tensor, q, p=0.7) -> float:
    return float((w - q.dequantize()).abs().pow(p).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_optimiser_lowers_the_error_it_minimises(bits):
    w = _weight(seed=1)
    plain, opt = hqq_grid(w, bits, 64, optimize=False), hqq_grid(w, bits, 64)
    assert _lp(w, opt) < 0.99 * _lp(w, plain)  # 2-8% lower on this matrix


def test_the_layout_round_trips_exactly():
    q = hqq_grid(_weight(), 3, 32)
    layer = LAYOUTS["hqq"].pack(q, None, torch.float32)
    back = LAYOUTS["hqq"].unpack(layer)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales.float(), q.scales)
    assert torch.equal(back.zeros, q.zeros) and torch.equal(layer.weight, q.dequantize())


def test_int4pack_runs_float_zero_points():
    q = hqq_grid(_weight(in_f=512), 4, 64)
    x = torch.randn(5, 512)
    dense = x @ q.dequantize().t()
    fast = Int4Pack(q, CPU)(x)
    assert float((fast - dense).norm() / dense.norm()) < 1e-2


def _quantized_tiny(tiny_model_dir, **options):
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=CPU)
    backend = HQQBackend(HQQConfig(**options))
    backend.check(lm.model)
    return lm, backend, backend.quantize(lm.model, None).model


def test_a_checkpoint_reloads_in_a_fresh_process_with_the_same_logits(tiny_model_dir, tmp_path):
    lm, backend, model = _quantized_tiny(tiny_model_dir, bits=4, group_size=32)
    ids = torch.randint(3, 380, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "mem.pt")
    ckpt = export_checkpoint(
        model, lm.tokenizer, backend, tmp_path / "ckpt", source={}, label="hqq"
    )
    code = textwrap.dedent(f"""
        import torch
        from quantlab.checkpoint import load_checkpoint
        ids = torch.randint(3, 380, (2, 48), generator=torch.Generator().manual_seed(0))
        m = load_checkpoint(r"{ckpt}", dtype=torch.float32, device=torch.device("cpu")).model
        with torch.no_grad():
            torch.save(m(ids).logits, r"{tmp_path / "disk.pt"}")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "disk.pt"), torch.load(tmp_path / "mem.pt"))
    meta = read_sidecar(ckpt)
    assert meta["layout"]["name"] == "hqq" and len(meta["modules"]) == 14
    assert "zeros" in {
        k.rsplit(".", 1)[1]
        for k in __import__("safetensors.torch").torch.load_file(ckpt / "model.safetensors")
    }


def test_gguf_q4_1_holds_the_float_zero_points(tiny_model_dir, tiny_gguf, tmp_path):
    _, _, model = _quantized_tiny(tiny_model_dir, bits=4, group_size=32)
    types = export_gguf(model, tmp_path / "m.gguf", tiny_gguf)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name == "Q4_1" == types[t.name]
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    want = model.get_submodule("model.layers.0.mlp.down_proj").dequantize().numpy()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 5}, "bits must be one of 2, 3, 4, 8"),
        ({"sym": True}, "sym"),
        ({"group_size": 0}, "group_size must be a positive"),
        ({"iters": 0}, "iters"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    methods = [{"label": "h", "backend": "hqq", "options": options}]
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"model": {"source": "smollm2-135m"}, "methods": methods})


def test_a_group_size_that_does_not_divide_a_layer_is_refused(tiny_model_dir):
    from quantlab.errors import QuantlabError

    with pytest.raises(QuantlabError, match="group_size 48 does not divide"):
        _quantized_tiny(tiny_model_dir, group_size=48)


def test_round_zero_starts_from_an_integer_zero_point_as_hqq_does_for_4_bits():
    w = _weight()
    # HQQ's default: a rounded start for 4 bits only (the optimiser then moves it)
    assert torch.equal(
        hqq_grid(w, 4, 64, optimize=False).zeros, hqq_grid(w, 4, 64, optimize=False).zeros.round()
    )
    assert not torch.equal(
        hqq_grid(w, 3, 64, optimize=False).zeros, hqq_grid(w, 3, 64, optimize=False).zeros.round()
    )
    start = hqq_grid(w, 3, 64, optimize=False, round_zero=True)
    assert torch.equal(start.zeros, start.zeros.round())
    assert not torch.equal(hqq_grid(w, 3, 64, round_zero=True).zeros, hqq_grid(w, 3, 64).zeros)


@pytest.mark.parametrize("bits", [3, 4])
def test_the_grid_is_torchaos_own_hqq_quantizer(bits):
    """torchao's full HQQ entry point (the one its Int4WeightOnlyConfig(..."hqq") runs) gives
    the same scales and zero points, to the float16 quantlab stores."""
    from torchao.quantization import quant_primitives as qp

    choose = getattr(qp, "_choose_qparams_and_quantize_affine_hqq", None)
    if choose is None:
        pytest.skip("this torchao has no _choose_qparams_and_quantize_affine_hqq")
    w = _weight(seed=2)
    _, s, z, _ = choose(
        w,
        nbits=bits,
        group_size=64,
        axis=1,
        compute_dtype=torch.float32,
        device="cpu",
        raw_output=True,
    )
    q = hqq_grid(w, bits, 64)
    assert torch.equal(s.half().float().t(), q.scales) and torch.equal(
        z.half().float().t(), q.zeros
    )
