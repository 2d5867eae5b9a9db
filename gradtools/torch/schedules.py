"""Learning-rate schedules for PyTorch: a warm-up that composes with any scheduler.

:class:`Warmup` multiplies the rate of any ``LRScheduler`` (or the optimizer's
own rate) by the linear warm-up factor of :func:`gradtools.schedules.warmup_factor`.
Its twin is ``gradtools.keras.Warmup``; :func:`learning_rates` reads a
scheduler's rates step by step, to compare with ``gradtools.keras.learning_rates``.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from gradtools import _checks
from gradtools.schedules import check_warmup_steps, warmup_factor

__all__ = ["Warmup", "learning_rates"]


class Warmup(LRScheduler):
    """Linear warm-up in front of any scheduler: ``lr_t = min(1, (t + 1) / warmup_steps) * inner_t``.

    ``inner_t`` is the rate ``after`` would set at step ``t`` on its own. The
    inner scheduler keeps its own rates: before stepping it, ``Warmup`` gives
    the optimizer back the inner rates, so recursive schedulers such as
    ``ExponentialLR`` see their own values, not the warmed-up ones. Call
    ``step()`` once per optimizer step and do not step ``after`` yourself.
    ``state_dict()`` holds the inner scheduler's.

    Without ``after``, the warm-up is chainable, like ``LinearLR``: each step
    multiplies the current rate by ``factor(t) / factor(t - 1)``, so the
    optimizer's rate is ramped up to and then left alone, and a
    ``ReduceLROnPlateau`` (or any change you make) stepped alongside keeps working.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer ``after`` schedules.
        warmup_steps (int): steps of linear warm-up; 0 or 1 means none (step 0
            already runs at ``1 / warmup_steps`` of the rate).
        after (LRScheduler or None): the schedule to warm up, built on
            ``optimizer`` just before this one. ``ReduceLROnPlateau`` is refused
            (its step takes a metric).

    Example:
        >>> import torch, gradtools.torch as gt
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        >>> sched = gt.Warmup(opt, warmup_steps=2, after=decay)
        >>> gt.learning_rates(sched, 4).tolist()
        [0.5, 0.5, 0.25, 0.125]
    """

    def __init__(self, optimizer, warmup_steps: int, after: LRScheduler | None = None, last_epoch: int = -1):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.warmup_steps = check_warmup_steps(warmup_steps)
        if after is not None:
            if isinstance(after, torch.optim.lr_scheduler.ReduceLROnPlateau) or not isinstance(after, LRScheduler):
                raise TypeError(f"after must be an LRScheduler that steps without a metric, got "
                                f"{type(after).__name__}")
            if after.optimizer is not optimizer:
                raise ValueError("after must schedule the same optimizer as the Warmup "
                                 "(build it on `optimizer` first)")
        self.after = after
        super().__init__(optimizer, last_epoch)

    def _factor(self, step: int) -> float:
        return float(warmup_factor(step, self.warmup_steps))

    def get_lr(self) -> list:
        factor = self._factor(self.last_epoch)
        if self.after is not None:
            return [factor * lr for lr in self.after.get_last_lr()]
        if self._is_initial:
            return [factor * lr for lr in self.base_lrs]
        ratio = factor / self._factor(self.last_epoch - 1)
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def step(self, epoch=None) -> None:  # noqa: D102 (LRScheduler.step)
        if epoch is not None:
            raise TypeError("Warmup.step() takes no epoch: call it once per optimizer step")
        if self.after is not None and not self._is_initial:
            for group, lr in zip(self.optimizer.param_groups, self.after.get_last_lr()):
                group["lr"] = lr
            self.after.step()
        super().step()

    def state_dict(self) -> dict:
        state = {k: v for k, v in super().state_dict().items() if k != "after"}
        state["after"] = None if self.after is None else self.after.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        inner = state.pop("after", None)
        if (inner is None) != (self.after is None):
            saved, here = ("without", "has one") if inner is None else ("with", "has none")
            raise ValueError(f"state_dict was saved from a Warmup {saved} an inner scheduler, but this one {here}")
        if inner is not None:
            self.after.load_state_dict(inner)
        super().load_state_dict(state)


def learning_rates(scheduler: LRScheduler, steps: int) -> np.ndarray:
    """The rates the first param group gets at steps 0 .. steps - 1 (advances ``scheduler``).

    Each rate is read before the scheduler steps, as a training loop sees it.
    Use a fresh scheduler: this one is left ``steps`` steps further on.
    """
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(f"scheduler must be a torch LRScheduler, got {type(scheduler).__name__}")
    steps = _checks.integer("steps", steps, minimum=1)
    rates = []
    with warnings.catch_warnings():
        # No optimizer step is taken here, which torch would otherwise warn about.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        for _ in range(steps):
            rates.append(float(scheduler.optimizer.param_groups[0]["lr"]))
            scheduler.step()
    return np.asarray(rates)
