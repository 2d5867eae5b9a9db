"""Learning-rate range test, framework-free part (Smith, 2017).

The learning rate grows exponentially from ``start_lr`` to ``end_lr``; the
loss is smoothed with a bias-corrected EMA; the sweep stops when the smoothed
loss exceeds ``diverge_factor`` times its best value or becomes non-finite.

Two readings of the curve come back, both leaving out the first
``1 / (1 - beta)`` steps, where the average still rests on a few batches.
``suggested_lr`` is a tenth of the rate at the smoothed loss's minimum (fast.ai's
"minimum" rule): robust, because it rests on where the loss is lowest, not on a
slope that batch-to-batch noise can fake. ``steepest_lr`` is the rate of steepest
descent against log(lr); on a noisy curve it can land anywhere the noise dips.

:class:`RangeSweep` holds that logic step by step; ``gradtools.torch.lr_range_test``
and the Keras callback ``gradtools.keras.LRRangeTest`` only train and restore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradtools import _checks

__all__ = ["LRRangeResult", "RangeSweep", "lr_schedule", "smooth_losses", "suggest_lr"]


@dataclass
class LRRangeResult:
    """The curve of an LR range test and its two readings.

    ``lrs``: the rates tried; ``losses``: the smoothed losses; ``raw_losses``: each
    batch's own loss; ``suggested_lr``: a tenth of the rate at the smoothed minimum;
    ``diverged_at``: the step at which the sweep stopped on divergence, or None;
    ``steepest_lr``: the rate of steepest descent (see the module docstring).
    """

    lrs: list
    losses: list
    raw_losses: list
    suggested_lr: float | None
    diverged_at: int | None
    steepest_lr: float | None = None


def lr_schedule(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """Exponentially spaced rates from start_lr to end_lr inclusive."""
    start_lr = _checks.positive("start_lr", start_lr)
    end_lr = _checks.positive("end_lr", end_lr)
    if end_lr <= start_lr:
        raise ValueError(f"end_lr must be greater than start_lr={start_lr}, got {end_lr!r}")
    num_steps = _checks.integer("num_steps", num_steps, minimum=2)
    return start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))


def smooth_losses(losses, beta: float = 0.9) -> list:
    """Bias-corrected exponential moving average (as in fast.ai's finder)."""
    beta = _checks.in_range("beta", beta, 0.0, 1.0, high_open=True)
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest_lr(lrs, smoothed, skip_start: int = 0) -> float | None:
    """Rate of steepest descent of the smoothed loss against log(lr).

    ``skip_start`` leaves out the first points, where the moving average still
    rests on a handful of batches and one lucky batch looks like a steep descent.
    """
    skip_start = _checks.integer("skip_start", skip_start, minimum=0)
    lrs = np.asarray(lrs, dtype=float)[skip_start:]
    sm = np.asarray(smoothed, dtype=float)[skip_start:]
    if len(lrs) < 3:
        return None
    slopes = np.gradient(sm, np.log(lrs))
    finite = np.isfinite(slopes)
    if not finite.any():
        return None
    return float(lrs[int(np.nanargmin(np.where(finite, slopes, np.nan)))])


class RangeSweep:
    """The sweep, one step at a time: ``lr = sweep.lr(i)``, then ``sweep.record(loss)``.

    ``record`` returns True when the sweep must stop (divergence or the end).
    """

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, beta: float = 0.9,
                 diverge_factor: float = 4.0):
        self.schedule = lr_schedule(start_lr, end_lr, num_steps)
        self.beta = _checks.in_range("beta", beta, 0.0, 1.0, high_open=True)
        self.diverge_factor = _checks.positive("diverge_factor", diverge_factor)
        self.lrs, self.raw, self.smoothed = [], [], []
        self._avg, self._best, self.diverged_at = 0.0, math.inf, None

    def lr(self, i: int) -> float:
        return float(self.schedule[i])

    def record(self, loss: float) -> bool:
        i = len(self.raw)
        value = float(loss)
        self.lrs.append(self.lr(i))
        self.raw.append(value)
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        sm = self._avg / (1 - self.beta ** (i + 1))
        self.smoothed.append(sm)
        if not math.isfinite(sm) or sm > self.diverge_factor * self._best:
            self.diverged_at = i
            return True
        self._best = min(self._best, sm)
        return i + 1 >= len(self.schedule)

    def result(self) -> LRRangeResult:
        stop = self.diverged_at if self.diverged_at is not None else len(self.lrs)
        # The EMA averages over about 1 / (1 - beta) batches: skip that many (at most a third).
        skip = min(int(round(1 / (1 - self.beta))), stop // 3)
        smoothed = np.asarray(self.smoothed[skip:stop], dtype=float)
        finite = np.isfinite(smoothed)
        minimum = None
        if finite.any():
            minimum = self.lrs[skip + int(np.nanargmin(np.where(finite, smoothed, np.nan)))] / 10
        return LRRangeResult(self.lrs, self.smoothed, self.raw, minimum, self.diverged_at,
                             suggest_lr(self.lrs[:stop], self.smoothed[:stop], skip))
