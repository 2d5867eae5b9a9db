"""Side-by-side timing: a ratio against a baseline run in the same process.

Used by the benchmarks and by chapters that compare two costs. A ratio of
medians over alternating rounds is what survives another machine; the absolute
times do not, so print those where nbval does not compare them.

Example:
    >>> from gradtools.timing import median_ratio
    >>> work = lambda: sum(range(1000))
    >>> ratio, base_s, cand_s = median_ratio(work, work, rounds=5)
    >>> 0.2 < ratio < 5
    True
"""

from __future__ import annotations

import statistics
import time


def median_ratio(base, candidate, rounds: int):
    """Time ``candidate()`` against ``base()`` in alternating order, after one warm-up call of each.

    Returns ``(median of the per-round ratios candidate / base, median base seconds,
    median candidate seconds)``: alternating the order lets drift in machine load
    affect both sides alike.
    """
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
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
