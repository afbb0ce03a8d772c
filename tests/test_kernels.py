"""Kernels chosen at load (quantlab.formats.kernels): every kernel computes what the dense
path computes (within bfloat16 activation rounding), `auto` never keeps a kernel where its own
timings say dense is faster, a recorded choice replays, and what cannot run is refused or
recorded, never silent."""

from __future__ import annotations

import copy

import pytest
import torch

from quantlab.bench.speed import bytes_per_token
from quantlab.errors import QuantlabError
from quantlab.formats import LAYOUTS, QuantizedWeight
from quantlab.formats.kernels import TIMING_TOKENS, Int4Pack, Int8Pack, apply_kernels, shape_key
from quantlab.grid import quantize_matrix
from quantlab.quantizers.rtn import RTN
from quantlab.quantizers.weightonly import WeightQuantConfig

CPU = torch.device("cpu")


def _grid(out_f, in_f, bits, group_size, sym, act_order=False, seed=0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    g = in_f if group_size == -1 else group_size
    g_idx = torch.arange(in_f) // g
    if act_order:  # GPTQ desc_act: groups are sets of columns in a permuted order
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    codes, scales, zeros = quantize_matrix(w, bits, group_size, sym)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize(
    ("group", "sym", "act_order"),
    [(32, True, False), (64, False, False), (128, False, False), (64, True, True)],
)
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_int4pack_computes_what_the_dense_path_computes(group, sym, act_order, tokens):
    q = _grid(192, 256, 4, group, sym, act_order)
    assert Int4Pack.check(q, CPU) is None
    x = torch.randn(tokens, 256)
    ref = x @ q.dequantize().t()
    y = Int4Pack(q, CPU)(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _rel_err(y, ref) < 1e-2  # bfloat16 activations and scales: ~3e-3 typical


@pytest.mark.parametrize("sym", [True, False])
def test_int8pack_computes_what_the_dense_path_computes_with_any_zero_point(sym):
    q = _grid(96, 128, 8, -1, sym)
    assert Int8Pack.check(q, CPU) is None
    x = torch.randn(3, 7, 128)
    ref = x @ q.dequantize().t()
    y = Int8Pack(q, CPU)(x)
    assert y.shape == ref.shape and _rel_err(y, ref) < 1e-2
    assert (Int8Pack(q, CPU).correction is None) == bool((q.zeros == 128).all())


@pytest.mark.parametrize(
    ("kernel", "q", "reason"),
    [
        (Int4Pack, _grid(64, 128, 3, 32, True), "4-bit"),
        (Int4Pack, _grid(64, 128, 4, 16, True), "groups of 32"),
        (Int4Pack, _grid(64, 96, 4, -1, True), "not 96"),
        (Int8Pack, _grid(64, 128, 8, 32, True), "group_size: -1"),
        (Int8Pack, _grid(64, 128, 4, -1, True), "8-bit"),
    ],
)
def test_a_kernel_says_why_it_cannot_run_a_layer(kernel, q, reason):
    assert reason in kernel.check(q, CPU)


def _quantized_tiny(tiny, bits=4, group_size=32, layout="gptq"):
    model, _ = tiny
    cfg = WeightQuantConfig(bits=bits, group_size=group_size, sym=False)
    return RTN(cfg).quantize(copy.deepcopy(model), None).model.eval()


@pytest.mark.parametrize("kernel", ["int4pack", "auto"])
def test_a_model_with_kernels_gives_the_dense_logits(tiny, kernel):
    model = _quantized_tiny(tiny)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        dense_bytes = bytes_per_token(model)
        record = apply_kernels(model, kernel, CPU)
        got = model(ids).logits
    assert record["requested"] == kernel and record["shapes"]
    assert _rel_err(got, ref) < 2e-2
    if kernel == "int4pack":  # every layer reads its packed weights: far fewer bytes per token
        assert all(
            r["kernel"] == "int4pack" and r["max_tokens"] is None for r in record["shapes"].values()
        )
        assert bytes_per_token(model) < dense_bytes
        labels = {m.kernel for m in model.modules() if getattr(m, "fast", None) is not None}
        assert labels == {"int4pack(bf16 activations)"}


def test_auto_never_keeps_a_kernel_its_own_timings_call_slower(tiny):
    model = _quantized_tiny(tiny)
    record = apply_kernels(model, "auto", CPU)
    for key, rec in record["shapes"].items():
        timings = rec["timings_us"]
        assert set(timings) >= {"dense-dequant", "int4pack"} and set(timings["int4pack"]) == set(
            TIMING_TOKENS
        )
        if rec["kernel"] != "dense-dequant":
            served = [n for n in TIMING_TOKENS if n <= rec["max_tokens"]]
            assert all(timings[rec["kernel"]][n] < timings["dense-dequant"][n] for n in served), key
        else:  # dense kept: no kernel was faster even at one token
            assert timings["int4pack"][1] >= timings["dense-dequant"][1], key


def test_a_recorded_choice_replays_without_timing(tiny):
    model = _quantized_tiny(tiny)
    first = apply_kernels(model, "auto", CPU)
    again = apply_kernels(_quantized_tiny(tiny), "auto", CPU, choices=first["shapes"])
    for key, rec in again["shapes"].items():
        assert rec["replayed"] and "timings_us" not in rec
        assert (rec["kernel"], rec["max_tokens"]) == (
            first["shapes"][key]["kernel"],
            first["shapes"][key]["max_tokens"],
        )


def test_a_kernel_that_cannot_run_falls_back_to_dense_and_says_so(tiny):
    model = _quantized_tiny(tiny, bits=3)
    lines = []
    record = apply_kernels(model, "int4pack", CPU, log=lines.append)
    assert all(
        r["kernel"] == "dense-dequant" and "4-bit" in r["fallback"]
        for r in record["shapes"].values()
    )
    assert lines and "stays dense-dequant" in lines[0]
    assert not any(getattr(m, "fast", None) for m in model.modules())


def test_an_unknown_kernel_is_a_clear_error(tiny):
    with pytest.raises(QuantlabError, match="did you mean 'int4pack'"):
        apply_kernels(_quantized_tiny(tiny), "int4pak", CPU)


def test_shapes_are_keyed_by_what_a_choice_depends_on():
    assert shape_key(_grid(64, 128, 4, 32, True)) == "128x64 w4 g32"
    assert shape_key(_grid(64, 128, 4, 32, True, act_order=True)) == "128x64 w4 g32 act-order"


def test_the_awq_layout_runs_int4pack_too():
    q = _grid(64, 128, 4, 32, False)
    layer = LAYOUTS["awq-gemm"].pack(q, None, torch.float32)
    x = torch.randn(2, 128)
    ref = layer(x)
    layer.fast = Int4Pack(q, CPU)
    assert _rel_err(layer(x), ref) < 1e-2


def test_compiled_decode_generates_what_eager_decode_generates_with_and_without_kernels(tiny):
    """gpt-fast's pattern (static cache, compiled step) changes how fast, never what: the
    greedy tokens equal eager decode's; compilation is timed apart and labelled."""
    from quantlab.bench.speed import measure_speed

    model, _ = tiny
    prompt = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    runs = {}
    quantized = _quantized_tiny(tiny)
    apply_kernels(quantized, "int4pack", CPU)
    for name, m in (("float", model), ("int4pack", quantized)):
        for mode in ("eager", "compiled"):
            runs[name, mode] = measure_speed(
                m, prompt, new_tokens=6, warmup=0, repeats=1, mode=mode
            )
    for name in ("float", "int4pack"):
        eager, compiled = runs[name, "eager"], runs[name, "compiled"]
        assert compiled["generated"] == eager["generated"] and len(eager["generated"]) == 6
        assert (eager["mode"], compiled["mode"]) == ("eager", "compiled")
        assert compiled["compile_s"] > 0 and "compile_s" not in eager


def test_an_unknown_speed_mode_is_refused(tiny):
    from quantlab.bench.speed import measure_speed

    with pytest.raises(ValueError, match="eager"):
        measure_speed(tiny[0], torch.tensor([[5, 6]]), mode="jit")


@pytest.mark.parametrize("kernel", ["auto", "int4pack", "int8pack"])
def test_a_float_model_loads_with_any_kernel_unchanged(tiny, kernel):
    """The baseline row of a recipe with eval.kernel: auto has no packed layer: nothing to time."""
    import copy as _copy

    model = _copy.deepcopy(tiny[0])
    record = apply_kernels(model, kernel, CPU)
    assert record == {"requested": kernel, "device": "cpu", "shapes": {}}
