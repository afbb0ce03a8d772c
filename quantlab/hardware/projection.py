"""The projection's arithmetic: does a model fit on a card, and how fast could it run there.

A forward pass takes ``max(bytes / (bandwidth x memory efficiency), FLOPs / (peak x compute
efficiency)) + layers x overhead``: decode streams the weights and the KV cache (memory-bound
at small batch), a long prefill multiplies (compute-bound), and every layer costs a fixed time
(kernel launches, synchronisation, small ops) that keeps tiny models from absurd speeds. The
batch-B decode curve is this formula at B sequences: memory-bound until the FLOPs catch up.
The efficiencies are fitted to measurements (:mod:`quantlab.hardware.efficiency`).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.hardware.cards import GIB, Card
from quantlab.hardware.shape import ModelShape

#: the share of a card's memory an engine lets itself use (vLLM's gpu_memory_utilization
#: default); the rest stays with the driver, other processes and fragmentation
ENGINE_MEMORY_FRACTION = 0.90
#: held back besides: CUDA context, cuBLAS/attention workspaces, CUDA-graph pools and a prefill
#: chunk's activations (or, on a CPU, the process and the OS)
ENGINE_RESERVE_BYTES = 1 * GIB


@dataclass(frozen=True)
class Efficiency:
    """How close an engine comes to a card's figures (fitted, see docs/hardware.md)."""

    memory: float  # share of the datasheet (or measured) bandwidth that weights and KV stream at
    compute: float  # share of the peak matmul throughput a prefill reaches
    layer_overhead_s: float  # fixed seconds per decoder layer per forward pass
    source: str


def usable_bytes(card: Card) -> int:
    """Memory the engine can fill with weights and KV cache."""
    return int(card.memory_bytes * ENGINE_MEMORY_FRACTION - ENGINE_RESERVE_BYTES)


def max_batch(usable: int, weights: int, kv_per_token: int, context: int) -> int:
    """Sequences of ``context`` tokens whose KV cache fits beside the weights (0: none)."""
    free = usable - weights
    return max(0, int(free // (kv_per_token * context))) if free > 0 else 0


def max_context(usable: int, weights: int, kv_per_token: int, batch: int, model_max: int) -> int:
    """The longest context ``batch`` sequences can each hold, at most the model's own."""
    free = usable - weights
    return min(model_max, max(0, int(free // (kv_per_token * batch)))) if free > 0 else 0


def forward_time(
    read_bytes: float, flops: float, layers: int, card: Card, eff: Efficiency, compute: str = "bf16"
) -> tuple[float, str]:
    """Seconds of one forward pass, and what bounds it ('memory' or 'compute')."""
    memory = read_bytes / (card.bandwidth_bytes_per_s * eff.memory)
    math = flops / (card.peak(compute) * eff.compute)
    bound = "memory" if memory >= math else "compute"
    return max(memory, math) + layers * eff.layer_overhead_s, bound


def decode_rate(
    shape: ModelShape,
    read_bytes: float,
    kv_per_token: float,
    context: int,
    batch: int,
    card: Card,
    eff: Efficiency,
    compute: str = "bf16",
) -> tuple[float, str]:
    """Decode tokens/s of ``batch`` sequences (all of them) whose KV cache holds ``context``
    tokens: every step reads the weights once and each sequence's cache."""
    step_bytes = read_bytes + batch * context * kv_per_token
    flops = batch * shape.decode_flops(context)
    t, bound = forward_time(step_bytes, flops, shape.layers, card, eff, compute)
    return batch / t, bound


def prefill_rate(
    shape: ModelShape,
    read_bytes: float,
    tokens: int,
    batch: int,
    card: Card,
    eff: Efficiency,
    compute: str = "bf16",
) -> tuple[float, str]:
    """Prefill tokens/s of ``batch`` prompts of ``tokens`` each, in one forward pass."""
    flops = batch * shape.prefill_flops(tokens)
    t, bound = forward_time(read_bytes, flops, shape.layers, card, eff, compute)
    return batch * tokens / t, bound
