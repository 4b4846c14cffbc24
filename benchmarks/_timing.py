"""Timing helpers shared by the benchmark scripts (wall-clock medians; the matmul peak they compare against)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["matmul_peak_gflops", "time_ms"]


def time_ms(fn: Callable[[], Any], min_time: float, min_samples: int = 5) -> float:
    """Median wall time of one call in ms: 2 warm-up calls, then calls until min_time and min_samples are met."""
    for _ in range(2):
        fn()
    samples = []
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(samples) < min_samples:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of the best of ``repeats`` torch n x n matmuls on ``threads`` threads: the CPU's practical peak."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
