"""Gradient accumulation that equals the large-batch gradient, clip and guard included.

Each micro-batch's mean loss is back-propagated weighted by ``n_i / (k n_1)``
(``n_i`` its size, ``n_1`` the size of the window's first micro-batch, ``k =
accumulation_steps``); at the boundary the sum is rescaled by ``k n_1 / N``, ``N``
the samples in the window. That is exactly the mean-loss gradient of the
concatenated batch, also for micro-batches of unequal size and for a partial last
window, where a fixed ``loss / k`` is wrong. For equal sizes the weight is
PyTorch's ``loss / k`` and there is nothing to rescale, so under a ``GradScaler``
the half-precision backward sees gradients no larger than in PyTorch's recipe,
and overflows no more often.

Clipping, the guard and statistics run once, at the boundary, on the
accumulated gradient: clipping each micro-batch's gradient would clip a
different quantity. Give the accumulator a :class:`~gradtools.torch.Monitor`
(``monitor=``) to record that window-mean gradient, before it is clipped; a
``Monitor.record()`` of your own would see a partial sum inside the window and
nothing after it. Under mixed precision back-propagate ``scaler.scale(loss)``
and give the scaler to the guard: the guard unscales at the boundary, and the
monitor records after it. Under ``DistributedDataParallel`` wrap each micro-batch's
forward *and* backward in ``with acc.accumulate(batch_size):``: DDP decides in
the forward pass whether the backward will all-reduce, so ``no_sync()`` must
already be active there. Gradients are then all-reduced once per window.

Note that accumulation changes nothing about *stability*: the update equals
the large-batch update, so a learning rate that explodes at batch size B*k
explodes with k accumulated micro-batches of size B too (see chapter 6).
"""

from __future__ import annotations

import contextlib

import torch

from gradtools import _checks
from gradtools.torch import _checks as _tchecks
from gradtools.torch.guard import GradGuard
from gradtools.torch.monitor import Monitor
from gradtools.torch.norms import optimizer_parameters

__all__ = ["Accumulator"]


class Accumulator:
    """Accumulate gradients over ``accumulation_steps`` micro-batches.

    Args:
        model (torch.nn.Module): the model (possibly wrapped in DDP).
        optimizer (torch.optim.Optimizer): stepped once per window.
        accumulation_steps (int): micro-batches per optimizer step, >= 1.
        clipper (gradtools.torch.clip.Clipper or None): applied at the boundary.
        guard (gradtools.torch.guard.GradGuard or None): steps the optimizer at the boundary (and may skip).
            When it raises, the window is closed all the same (its gradients are
            dropped), so a loop that catches the error goes on stepping.
        reduction (str): ``"mean"`` (the loss is a per-sample mean, default) or ``"sum"``.
        monitor (gradtools.torch.Monitor or None): records the window-mean gradient at
            each boundary, before clipping (through the guard, if there is one).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> acc = Accumulator(m, opt, accumulation_steps=2)
        >>> x = torch.ones(4, 3)
        >>> acc.backward(m(x[:2]).pow(2).mean(), batch_size=2)
        False
        >>> acc.backward(m(x[2:]).pow(2).mean(), batch_size=2)
        True

    With DistributedDataParallel (works without it too)::

        for xb, yb in loader:
            with acc.accumulate(batch_size=len(xb)):
                acc.backward(loss_fn(model(xb), yb))
    """

    def __init__(self, model, optimizer, accumulation_steps: int, clipper=None, guard=None, reduction: str = "mean",
                 monitor=None):
        _tchecks.module("model", model)
        _tchecks.optimizer("optimizer", optimizer, closure=False)
        self.model = model
        self.optimizer = optimizer
        self.accumulation_steps = _checks.integer("accumulation_steps", accumulation_steps, minimum=1)
        if guard is not None and clipper is not None:
            if guard.clipper is not None and guard.clipper is not clipper:
                raise ValueError("clipper and guard.clipper are both set and differ: give the clipper to one of them")
            guard.clipper = clipper  # the guard clips after checking, before stepping
        if clipper is not None and not hasattr(clipper, "clip_to"):
            raise TypeError(f"clipper must be a gradtools Clipper or None, got {type(clipper).__name__}")
        if guard is not None and not isinstance(guard, GradGuard):
            raise TypeError(f"guard must be a gradtools.torch.GradGuard or None, got {type(guard).__name__}")
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a gradtools.torch.Monitor or None, got {type(monitor).__name__}")
        if guard is not None and monitor is not None:
            if guard.monitor is not None and guard.monitor is not monitor:
                raise ValueError("monitor and guard.monitor are both set and differ: give the monitor to one of them")
            guard.monitor = monitor  # the guard records after unscaling, before clipping
        self.clipper = clipper
        self.guard = guard
        self.monitor = monitor
        self.reduction = _checks.choice("reduction", reduction, {"mean", "sum"})
        self.micro_step = 0
        self.samples = 0
        self._reference = 0  # k n_1 of the open window
        self.windows = 0  # windows closed, stepped or skipped by the guard
        self.optimizer_steps = 0  # windows whose step was taken
        self.last_clip = None
        self.last_guard = None
        self._pending = None  # (batch_size, boundary) inside accumulate()

    @property
    def _ddp(self) -> bool:
        return isinstance(self.model, torch.nn.parallel.DistributedDataParallel)

    @contextlib.contextmanager
    def accumulate(self, batch_size: int, last: bool = False):
        """Context for one micro-batch: forward and ``backward`` go inside.

        On a non-boundary micro-batch of a DDP model it enters ``model.no_sync()``.
        """
        batch_size = _checks.integer("batch_size", batch_size, minimum=1)
        boundary = bool(last) or self.micro_step + 1 == self.accumulation_steps
        ctx = self.model.no_sync() if (self._ddp and not boundary) else contextlib.nullcontext()
        self._pending = (batch_size, boundary)
        try:
            with ctx:
                yield self
            if self._pending is not None:
                raise RuntimeError("the accumulate() block ended without calling acc.backward(loss)")
        finally:
            self._pending = None

    def backward(self, loss: torch.Tensor, batch_size: int | None = None, last: bool = False) -> bool:
        """Back-propagate one micro-batch; step at the window's end.

        Returns True if the optimizer stepped: False inside a window, and False at a
        boundary whose step the guard skipped (``last_guard.reason`` says why).

        Args:
            loss: the micro-batch loss (a mean over its samples if reduction="mean").
            batch_size (int): samples in this micro-batch (taken from ``accumulate()`` inside one).
            last (bool): this is the final micro-batch of the data; close the window
                even if it is not full.
        """
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"loss must be a 0-d tensor, got {type(loss).__name__} "
                            f"with shape {tuple(getattr(loss, 'shape', ()))}")
        if self._pending is not None:
            batch_size, boundary = self._pending
            self._pending = None
        else:
            if self._ddp:
                raise RuntimeError("model is DistributedDataParallel: run the forward and backward inside "
                                   "`with acc.accumulate(batch_size):` so that no_sync() covers the forward pass")
            if batch_size is None:
                raise TypeError("batch_size must be an int, got None")
            batch_size = _checks.integer("batch_size", batch_size, minimum=1)
            boundary = bool(last) or self.micro_step + 1 == self.accumulation_steps
        if self.reduction == "mean":
            if self.micro_step == 0:
                self._reference = batch_size * self.accumulation_steps  # k n_1
            (loss / (self._reference / batch_size)).backward()  # loss / k when the sizes are equal
        else:
            loss.backward()
        self.micro_step += 1
        self.samples += batch_size
        if boundary:
            return self._step()
        return False

    def flush(self) -> bool:
        """Close a partial window (e.g. after the loop). Returns True if the optimizer stepped."""
        if self.micro_step == 0:
            return False
        if self._ddp:
            # The last backward ran under no_sync: all-reduce by hand, as DDP would have.
            import torch.distributed as dist

            world = dist.get_world_size()
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
        return self._step()

    def _window_parameters(self) -> list:
        """The parameters holding this window's gradient: the optimizer's, then the model's others."""
        params = optimizer_parameters(self.optimizer)
        owned = {id(p) for p in params}
        params += [p for p in self.model.parameters() if id(p) not in owned]
        return [p for p in params if p.grad is not None]

    @torch.no_grad()
    def _step(self) -> bool:
        stepped = False
        params = self._window_parameters()
        try:
            if self.reduction == "mean" and params and self.samples != self._reference:
                torch._foreach_mul_([p.grad for p in params], self._reference / self.samples)
            if self.guard is not None:
                self.last_guard = self.guard.step()
                stepped = self.last_guard.stepped
            else:
                if self.monitor is not None:
                    self.monitor.record()
                if self.clipper is not None:
                    self.last_clip = self.clipper(optimizer_parameters(self.optimizer))
                self.optimizer.step()
                stepped = True
                if self.monitor is not None:
                    self.monitor.after_step()
        finally:  # a guard error closes the window too: a caught error must not stall the loop
            self.optimizer.zero_grad(set_to_none=True)
            for p in params:  # and the model's parameters the optimizer does not own
                p.grad = None
            self.windows += 1
            self.optimizer_steps += int(stepped)
            self.micro_step = 0
            self.samples = 0
        return stepped
