"""Learning-rate schedules, framework-free: linear warm-up and the one-cycle policy.

Each formula is written once, against an array module ``xp``: NumPy by default,
``keras.ops`` in :mod:`gradtools.keras.schedules`, so the Keras schedules trace
into a graph and the PyTorch ones (plain floats) use the very same lines.

* :func:`warmup_factor`: ``min(1, (step + 1) / warmup_steps)``, the linear
  warm-up of Goyal et al. (2017). Step 0 already moves (at ``lr / warmup_steps``)
  and step ``warmup_steps - 1`` runs at the full rate.
* :func:`one_cycle`: Smith and Topin's one-cycle policy (2019) exactly as
  ``torch.optim.lr_scheduler.OneCycleLR`` computes it (two phases, cosine).

Example:
    >>> from gradtools.schedules import one_cycle, warmup_factor
    >>> [float(warmup_factor(s, 4)) for s in range(6)]
    [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    >>> round(float(one_cycle(29, max_lr=1.0, total_steps=100)), 6)  # the peak
    1.0
"""

from __future__ import annotations

import math

import numpy as np

from gradtools import _checks

__all__ = ["warmup_factor", "one_cycle", "check_warmup_steps", "check_one_cycle"]


def check_warmup_steps(warmup_steps) -> int:
    """``warmup_steps`` as an int >= 0, or a ValueError/TypeError naming it."""
    return _checks.integer("warmup_steps", warmup_steps, minimum=0)


def warmup_factor(step, warmup_steps: int, xp=np):
    """The multiplier of a linear warm-up at ``step`` (0-based): ``min(1, (step + 1) / warmup_steps)``.

    ``warmup_steps = 0`` means no warm-up (factor 1). ``step`` may be a tensor
    of ``xp``'s kind, cast to a float type.
    """
    warmup_steps = check_warmup_steps(warmup_steps)
    if warmup_steps == 0:
        return xp.minimum(step * 0.0 + 1.0, 1.0)
    return xp.minimum((step + 1.0) / warmup_steps, 1.0)


def check_one_cycle(max_lr, total_steps, pct_start, div_factor, final_div_factor):
    """The one-cycle arguments, validated (each error names its argument)."""
    max_lr = _checks.positive("max_lr", max_lr)
    total_steps = _checks.integer("total_steps", total_steps, minimum=2)
    pct_start = _checks.in_range("pct_start", pct_start, 0.0, 1.0, low_open=True, high_open=True)
    if pct_start * total_steps - 1 <= 0 or pct_start * total_steps >= total_steps:
        raise ValueError(f"pct_start * total_steps must leave both phases at least one step, "
                         f"got pct_start={pct_start} with total_steps={total_steps}")
    div_factor = _checks.positive("div_factor", div_factor)
    final_div_factor = _checks.positive("final_div_factor", final_div_factor)
    return max_lr, total_steps, pct_start, div_factor, final_div_factor


def _anneal_cos(start, end, pct, xp):
    return end + (start - end) / 2.0 * (xp.cos(math.pi * pct) + 1.0)


def one_cycle(step, max_lr: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, xp=np):
    """The one-cycle learning rate at ``step`` (0-based), as ``OneCycleLR(anneal_strategy="cos")``.

    The rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start * total_steps - 1`` steps along a half cosine, then falls along
    another to ``max_lr / div_factor / final_div_factor`` at step ``total_steps - 1``.

    Args:
        step: the step, a number or an ``xp`` tensor (float).
        max_lr (float): the peak rate.
        total_steps (int): the length of the cycle.
        pct_start (float): the fraction of the cycle spent rising, default 0.3.
        div_factor (float): initial rate = ``max_lr / div_factor``, default 25.
        final_div_factor (float): final rate = initial / ``final_div_factor``, default 1e4.
        xp: the array module (NumPy, or ``keras.ops``).
    """
    max_lr, total_steps, pct_start, div_factor, final_div_factor = check_one_cycle(
        max_lr, total_steps, pct_start, div_factor, final_div_factor)
    initial = max_lr / div_factor
    final = initial / final_div_factor
    peak_step = pct_start * total_steps - 1.0
    last_step = total_steps - 1.0
    rising = _anneal_cos(initial, max_lr, step / peak_step, xp)
    falling = _anneal_cos(max_lr, final, (step - peak_step) / (last_step - peak_step), xp)
    return xp.where(step <= peak_step, rising, falling)
