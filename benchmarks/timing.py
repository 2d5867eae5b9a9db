"""Side-by-side timing shared by the benchmarks: a ratio against a baseline run in the same process."""

from __future__ import annotations

import statistics
import time


def median_ratio(base, candidate, rounds: int):
    """Time ``candidate()`` against ``base()`` in alternating order, after one warm-up call of each.

    Returns ``(median of the per-round ratios candidate / base, median base seconds,
    median candidate seconds)``: alternating the order lets drift in machine load
    affect both sides alike.
    """
    base()
    candidate()
    ratios, base_times, candidate_times = [], [], []
    for r in range(rounds):
        first, second = (base, candidate) if r % 2 else (candidate, base)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        b, c = (t1 - t0, t2 - t1) if r % 2 else (t2 - t1, t1 - t0)
        ratios.append(c / b)
        base_times.append(b)
        candidate_times.append(c)
    return statistics.median(ratios), statistics.median(base_times), statistics.median(candidate_times)
