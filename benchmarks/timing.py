"""Shared timing helpers for the CPU benchmarks: interleaved repeats, medians, and the
machine's memory read bandwidth measured in the same run (the ceiling)."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def env_line() -> str:
    import importlib

    vers = []
    for mod in ("torch", "transformers", "peft", "safetensors"):
        try:
            vers.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; " + ", ".join(vers)


def read_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N GB/s of a streaming read (sum over a 1 GiB float32 array)."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    del x
    return n_bytes / best / 1e9


def interleaved_samples(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each fn, calling them round-robin (A B C, then C B A, ...)
    so that drift on a shared machine hits every candidate alike; sample i of every fn
    comes from the same round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(repeats):
        for k in order if i % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn (``interleaved_samples``)."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, repeats, warmup).items()}


def paired_overhead(samples: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``t_name / t_base - 1``: each ratio compares two calls made
    moments apart, which cancels the slow drift of a shared host that moves the separate
    medians by several percent."""
    return statistics.median(a / b - 1 for a, b in zip(samples[name], samples[base]))
