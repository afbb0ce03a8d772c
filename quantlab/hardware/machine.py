""" "This machine" as a card: its measured memory bandwidth (quantlab's own probe, the one the
speed phase uses, or a figure passed in), its measured float32 matmul rate, its memory and
cores. Measurements take a second or two; pass figures in to skip them."""

from __future__ import annotations

import os
import socket
import time

from quantlab.hardware.cards import GB, TERA, Card

NAME = "this machine"


def memory_total() -> int:
    """Physical memory in bytes (/proc/meminfo's MemTotal, else sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """The best float32 n x n matmul rate of ``repeats`` (FLOP/s), at torch's thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # first touch, thread pool start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def this_machine(
    bandwidth: float | None = None, bandwidth_source: str = "", flops: float | None = None
) -> Card:
    """This host as a card; what is not given is measured now."""
    from quantlab.bench.speed import memory_bandwidth

    if bandwidth is None:
        bandwidth = memory_bandwidth("cpu")
        bandwidth_source = "measured now: best of 5 copies of 256 MB"
    src = {
        "memory": "MemTotal (/proc/meminfo)",
        "bandwidth": bandwidth_source or "given",
        "dense_flops": "given" if flops else "measured now: best float32 1024x1024 matmul of 5",
    }
    flops = flops or matmul_flops()
    return Card(NAME, memory_total(), bandwidth, flops, kind="cpu", cores=cores(), sources=src)


def host() -> str:
    return socket.gethostname()


def describe(card: Card) -> str:
    return (
        f"{card.name} ({host()}): {card.cores} cores, {card.memory_bytes / (1 << 30):.0f} GiB, "
        f"{card.bandwidth_bytes_per_s / GB:.1f} GB/s ({card.sources.get('bandwidth')}), "
        f"{card.dense_flops / TERA * 1000:.0f} GFLOPS float32 matmul"
    )
