"""Published measurements the projection's efficiency is fitted to, each with its source.

An anchor is one measured speed of a known model shape and weight format on a known card.
Its bytes per step come from the shape and the format's bits per weight (the sizes these
give match the sources' own: 3.56 GiB for Llama-2-7B Q4_0 in llama-bench, 13.21 GB bf16 and
3.74 GB int4 g64 in torchao's table, 15.01 GB for Llama-3.1-8B bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantlab.hardware.cards import CARDS, GB, GIB, Card, find_card
from quantlab.hardware.shape import ModelShape

#: public configs (config.json of meta-llama/Llama-2-7b-hf and meta-llama/Llama-3.1-8B)
LLAMA2_7B = ModelShape(
    layers=32,
    hidden=4096,
    heads=32,
    kv_heads=32,
    head_dim=128,
    intermediate=11008,
    vocab=32000,
    max_context=4096,
    tied=False,
)
LLAMA31_8B = ModelShape(
    layers=32,
    hidden=4096,
    heads=32,
    kv_heads=8,
    head_dim=128,
    intermediate=14336,
    vocab=128256,
    max_context=131072,
    tied=False,
)
#: the demo model (SmolLM2-135M-Instruct): the CPU anchors measured in this repository
SMOLLM2_135M = ModelShape(
    layers=30,
    hidden=576,
    heads=9,
    kv_heads=3,
    head_dim=64,
    intermediate=1536,
    vocab=49152,
    max_context=8192,
    tied=True,
)

#: the 2-core Xeon VM of docs/results.md (copy bandwidth measured by quantlab: 25.4 GB/s); its
#: matmul rate was not measured, and batch-1 decode anchors do not need it
XEON_VM = Card(
    "2-core Xeon VM (docs/results.md)",
    8 * GIB,
    25.4 * GB,
    math.inf,
    kind="cpu",
    sources={"bandwidth": "measured by scripts/bench_speed.py, docs/results.md"},
)


def weight_bytes(shape: ModelShape, linear_bits: float, head_bits: float) -> float:
    """Bytes one decode step reads: the layers' matmuls at ``linear_bits`` per weight (codes,
    scales and zeros), the output head at ``head_bits`` (the input embedding is one row)."""
    return (shape.layers * shape.layer_params * linear_bits + shape.head_params * head_bits) / 8


@dataclass(frozen=True)
class Anchor:
    """One published measurement: ``tokens`` is the mean context of a decode run (the KV cache
    a step reads grows through it) or the prompt length of a prefill."""

    name: str
    card: Card
    engine: str
    kind: str
    shape: ModelShape
    read_bytes: float
    tokens: int
    measured_tokens_per_s: float
    source: str
    compute: str = "bf16"
    kv_bytes: float = 2


def _gpu(name: str) -> Card:
    return find_card(name, CARDS)


def _decode(
    name: str,
    card: Card,
    engine: str,
    shape: ModelShape,
    bits: tuple[float, float],
    context: int,
    tokens_per_s: float,
    source: str,
    kv_bytes: float = 2,
) -> Anchor:
    """A batch-1 decode anchor; ``bits``: (layers' bits per weight, output head's)."""
    return Anchor(
        name,
        card,
        engine,
        "decode",
        shape,
        weight_bytes(shape, *bits),
        context,
        tokens_per_s,
        source,
        kv_bytes=kv_bytes,
    )


_PR6766 = (
    "llama.cpp PR #6766 (https://github.com/ggml-org/llama.cpp/pull/6766), as quoted in "
    "quantlab issue #31: llama-bench tg128"
)
_GPT_FAST = (
    "gpt-fast README, Benchmarks (https://github.com/pytorch-labs/gpt-fast#benchmarks): "
    "8xA100-80GB (SXM, hybrid cube mesh) power-limited to 330 W, batch 1, 5-token prompt, "
    "200 new tokens"
)
_TORCHAO = (
    "torchao torchao/_models/llama/float8_benchmark_results.txt (https://github.com/pytorch/ao, "
    "2024-10-02) with benchmarks.sh ('Runs on H100'); its 2,003 GB/s effective bf16 read exceeds "
    "an H100 PCIe's 2,000 GB/s, so the card is the SXM; prompt ~6 tokens, 200 new tokens"
)
_TRT = (
    "TensorRT-LLM docs/source/performance.md as of v0.6.1 (commit 138f96d), Low Latency "
    "tables (data from v0.5): 1st token latency, batch 1, LLaMA 7B, "
    "https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/"
    "docs/source/performance.md"
)
_DOCS_SPEED = (
    "docs/results.md, Kernels and compiled decode (scripts/bench_speed.py): 64-token prompt, 32 new"
)
_DOCS_LLAMACPP = (
    "docs/llamacpp.md, the cpu_deploy table (llama-bench tg128, 2 threads; the F32 figure times "
    "the rounds' ratios); bandwidth taken from docs/results.md's session on the same VM type"
)
_A100, _H100, _COMPILE = _gpu("A100 80GB SXM"), _gpu("H100 SXM"), "torch.compile"

#: GPU decode at batch 1 (one GPU profile is fitted to all: docs/hardware.md)
GPU_DECODE = (
    _decode(
        "Llama-2-7B Q4_0, llama.cpp",
        _gpu("RTX 4090"),
        "llama.cpp CUDA",
        LLAMA2_7B,
        (4.5, 6.5625),
        64,
        146.8,
        _PR6766,
    ),
    _decode(
        "Llama-2-7B bf16, gpt-fast",
        _A100,
        f"gpt-fast ({_COMPILE})",
        LLAMA2_7B,
        (16, 16),
        105,
        104.9,
        _GPT_FAST,
    ),
    _decode(
        "Llama-2-7B int8 weight-only, gpt-fast",
        _A100,
        f"gpt-fast ({_COMPILE})",
        LLAMA2_7B,
        (8, 8),
        105,
        155.58,
        _GPT_FAST,
    ),
    _decode(
        "Llama-2-7B int4 g32 weight-only, gpt-fast",
        _A100,
        f"gpt-fast ({_COMPILE})",
        LLAMA2_7B,
        (5, 5),
        105,
        196.80,
        _GPT_FAST,
    ),
    _decode(
        "Llama-3.1-8B bf16, torchao",
        _H100,
        f"torchao ({_COMPILE})",
        LLAMA31_8B,
        (16, 16),
        105,
        133.44,
        _TORCHAO,
    ),
    _decode(
        "Llama-3.1-8B float8 weight-only, torchao",
        _H100,
        f"torchao ({_COMPILE})",
        LLAMA31_8B,
        (8, 8),
        105,
        204.17,
        _TORCHAO,
    ),
)
#: GPU prefill at batch 1: a 2048-token prompt's time to first token (133 ms, 36 ms)
GPU_PREFILL = (
    Anchor(
        "LLaMA 7B fp16, 2048-token prompt, TensorRT-LLM",
        _A100,
        "TensorRT-LLM",
        "prefill",
        LLAMA2_7B,
        weight_bytes(LLAMA2_7B, 16, 16),
        2048,
        2048 / 0.133,
        _TRT,
    ),
    Anchor(
        "LLaMA 7B fp8, 2048-token prompt, TensorRT-LLM",
        _H100,
        "TensorRT-LLM",
        "prefill",
        LLAMA2_7B,
        weight_bytes(LLAMA2_7B, 8, 8),
        2048,
        2048 / 0.036,
        _TRT,
        compute="fp8",
    ),
)
_VM = XEON_VM
#: CPU decode at batch 1 on the VM this repository's figures come from, per engine; torch's
#: KV cache is float32 there, llama.cpp's 16-bit
CPU_DECODE = {
    "torch eager": (
        _decode(
            "demo float32, eager",
            _VM,
            "torch eager",
            SMOLLM2_135M,
            (32, 32),
            80,
            28.3,
            _DOCS_SPEED,
            kv_bytes=4,
        ),
        _decode(
            "demo RTN W4 g32 int4pack, eager",
            _VM,
            "torch eager",
            SMOLLM2_135M,
            (5, 32),
            80,
            44.2,
            _DOCS_SPEED,
            kv_bytes=4,
        ),
    ),
    "torch compiled": (
        _decode(
            "demo float32, compiled",
            _VM,
            "torch compiled",
            SMOLLM2_135M,
            (32, 32),
            80,
            36.0,
            _DOCS_SPEED,
            kv_bytes=4,
        ),
        _decode(
            "demo RTN W4 g32 int4pack, compiled",
            _VM,
            "torch compiled",
            SMOLLM2_135M,
            (5, 32),
            80,
            68.0,
            _DOCS_SPEED,
            kv_bytes=4,
        ),
    ),
    "llama.cpp": (
        _decode(
            "demo F32 GGUF, llama.cpp",
            _VM,
            "llama.cpp CPU",
            SMOLLM2_135M,
            (32, 32),
            64,
            44.1,
            _DOCS_LLAMACPP,
        ),
        _decode(
            "demo Q8_0 GGUF, llama.cpp",
            _VM,
            "llama.cpp CPU",
            SMOLLM2_135M,
            (8.5, 8.5),
            64,
            44.1 * 2.08,
            _DOCS_LLAMACPP,
        ),
        _decode(
            "demo Q4_0 GGUF (Q8_0 embedding), llama.cpp",
            _VM,
            "llama.cpp CPU",
            SMOLLM2_135M,
            (4.5, 8.5),
            64,
            44.1 * 3.89,
            _DOCS_LLAMACPP,
        ),
    ),
}
