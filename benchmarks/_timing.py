"""Timing helpers shared by the benchmark scripts (wall-clock medians; the matmul peak they compare against)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["matmul_peak_gflops", "ort_call", "time_ms", "torch_call"]


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


def ort_call(onnx_bytes: bytes, shape: list[int], threads: int) -> Callable[[], Any]:
    """A zero-argument call of an ONNX Runtime session (``threads`` intra-op threads) on one random input."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    s = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    x = np.random.rand(*shape).astype(np.float32)
    return lambda: s.run(None, {name: x})


def torch_call(mod: Any, shape: list[int]) -> Callable[[], Any]:
    """A zero-argument no-grad call of a torch module on one random input."""
    import torch

    x = torch.rand(*shape)

    def run() -> Any:
        with torch.no_grad():
            return mod(x)

    return run
