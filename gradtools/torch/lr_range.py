"""Learning-rate range test for PyTorch (Smith, 2017); the sweep itself is :mod:`gradtools.lr_range`.

Weights, buffers and optimizer state are restored afterwards, so the test
leaves the model exactly as it found it.
"""

from __future__ import annotations

import copy

from gradtools.lr_range import LRRangeResult, RangeSweep
from gradtools.torch import _checks as _tchecks

__all__ = ["lr_range_test", "LRRangeResult"]


def _stream(batches):
    """The batches one at a time; a re-iterable (list, DataLoader) starts again when it runs out."""
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
    reiterable = it is not batches
    total = 0
    while True:
        drawn = 0
        for batch in it:
            drawn += 1
            yield batch
        total += drawn
        if total == 0:
            raise ValueError("batches is empty: the range test needs at least one batch")
        if drawn == 0 or not reiterable:
            return
        it = iter(batches)


def lr_range_test(model, optimizer, loss_fn, batches, start_lr: float = 1e-7, end_lr: float = 10.0,
                  num_steps: int = 100, beta: float = 0.9, diverge_factor: float = 4.0) -> LRRangeResult:
    """Run an LR range test and restore model and optimizer afterwards.

    Args:
        model (torch.nn.Module): the model.
        optimizer (torch.optim.Optimizer): its optimizer; every param group's lr is swept.
        loss_fn (callable): ``loss_fn(model, batch) -> 0-d tensor``.
        batches (iterable): batches, drawn one at a time (a DataLoader is never
            materialised). A re-iterable (list, DataLoader) is iterated again when it
            runs out before ``num_steps``; a one-shot iterator ends the sweep there.
        start_lr (float): the sweep's first rate, default 1e-7.
        end_lr (float): its last rate, default 10.
        num_steps (int): steps in the sweep, default 100.
        beta (float): EMA factor for smoothing, default 0.9.
        diverge_factor (float): stop when smoothed loss > factor * best, default 4.

    Returns:
        LRRangeResult with the rates tried, smoothed and raw losses, a suggested
        rate and the step at which the sweep stopped on divergence (or None).
    """
    _tchecks.module("model", model)
    _tchecks.optimizer("optimizer", optimizer, closure=False)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    sweep = RangeSweep(start_lr, end_lr, num_steps, beta, diverge_factor)
    stream = _stream(batches)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    try:
        model.train()
        for i, batch in zip(range(num_steps), stream):
            for group in optimizer.param_groups:
                group["lr"] = sweep.lr(i)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            done = sweep.record(float(loss.detach()))
            if sweep.diverged_at is not None:
                break  # never step on a diverged loss
            loss.backward()
            optimizer.step()
            if done:
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return sweep.result()
