"""Learning-rate range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks").

The learning rate grows exponentially from ``start_lr`` to ``end_lr`` over
``num_steps`` steps; the loss is smoothed with a bias-corrected EMA; the sweep
stops when the smoothed loss exceeds ``diverge_factor`` times its best value or
becomes non-finite. Weights, buffers and optimizer state are restored
afterwards, so the test leaves the model exactly as it found it.

The suggestion is the rate at the steepest descent of the smoothed loss
(the most negative slope of loss against log-lr), a common and conservative
reading of the curve.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from gradtools import _checks

__all__ = ["lr_range_test", "LRRangeResult", "lr_schedule", "smooth_losses", "suggest_lr"]


@dataclass
class LRRangeResult:
    lrs: list
    losses: list  # smoothed
    raw_losses: list
    suggested_lr: float | None
    diverged_at: int | None  # step index where the sweep stopped, or None


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


def suggest_lr(lrs, smoothed) -> float | None:
    """Rate of steepest descent of the smoothed loss against log(lr)."""
    lrs = np.asarray(lrs, dtype=float)
    sm = np.asarray(smoothed, dtype=float)
    if len(lrs) < 3:
        return None
    slopes = np.gradient(sm, np.log(lrs))
    finite = np.isfinite(slopes)
    if not finite.any():
        return None
    i = int(np.nanargmin(np.where(finite, slopes, np.nan)))
    return float(lrs[i])


def lr_range_test(model, optimizer, loss_fn, batches, start_lr: float = 1e-7, end_lr: float = 10.0,
                  num_steps: int = 100, beta: float = 0.9, diverge_factor: float = 4.0) -> LRRangeResult:
    """Run an LR range test and restore model and optimizer afterwards.

    Args:
        model (torch.nn.Module): the model.
        optimizer (torch.optim.Optimizer): its optimizer; every param group's lr is swept.
        loss_fn (callable): ``loss_fn(model, batch) -> 0-d tensor``.
        batches (iterable): batches; cycled if shorter than ``num_steps``.
        start_lr, end_lr (float): the sweep's ends, default 1e-7 and 10.
        num_steps (int): steps in the sweep, default 100.
        beta (float): EMA factor for smoothing, default 0.9.
        diverge_factor (float): stop when smoothed loss > factor * best, default 4.

    Returns:
        LRRangeResult with the rates tried, smoothed and raw losses, a suggested
        rate and the step at which the sweep stopped on divergence (or None).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    diverge_factor = _checks.positive("diverge_factor", diverge_factor)
    schedule = lr_schedule(start_lr, end_lr, num_steps)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the range test needs at least one batch")

    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    lrs, raw, smoothed = [], [], []
    best, avg, diverged_at = math.inf, 0.0, None
    was_training = model.training
    try:
        model.train()
        for i, lr in enumerate(schedule):
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batches[i % len(batches)])
            value = float(loss.detach())
            lrs.append(float(lr))
            raw.append(value)
            avg = beta * avg + (1 - beta) * value
            sm = avg / (1 - beta ** (i + 1))
            smoothed.append(sm)
            if not math.isfinite(sm) or sm > diverge_factor * best:
                diverged_at = i
                break
            best = min(best, sm)
            loss.backward()
            optimizer.step()
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    stop = diverged_at if diverged_at is not None else len(lrs)
    suggestion = suggest_lr(lrs[:stop], smoothed[:stop])
    return LRRangeResult(lrs, smoothed, raw, suggestion, diverged_at)
