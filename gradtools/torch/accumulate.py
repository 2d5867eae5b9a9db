"""Gradient accumulation that equals the large-batch gradient, clip and guard included.

Each micro-batch's mean loss is back-propagated multiplied by its size; at the
boundary the summed gradient is divided by the number of samples in the window.
That is exactly the mean-loss gradient of the concatenated batch, also for
micro-batches of unequal size and for a partial last window (a fixed
``loss / accumulation_steps`` is wrong in both cases).

Clipping, the guard and statistics run once, at the boundary, on the
accumulated gradient: clipping each micro-batch's gradient would clip a
different quantity. Under ``DistributedDataParallel`` the non-boundary
backward passes run inside ``model.no_sync()``, so gradients are all-reduced
once per window.

Note that accumulation changes nothing about *stability*: the update equals
the large-batch update, so a learning rate that explodes at batch size B*k
explodes with k accumulated micro-batches of size B too (see chapter 6).
"""

from __future__ import annotations

import contextlib

import torch

from gradtools import _checks
from gradtools.torch.norms import named_grads

__all__ = ["Accumulator"]


class Accumulator:
    """Accumulate gradients over ``accumulation_steps`` micro-batches.

    Args:
        model (torch.nn.Module): the model (possibly wrapped in DDP).
        optimizer (torch.optim.Optimizer): stepped once per window.
        accumulation_steps (int): micro-batches per optimizer step, >= 1.
        clipper (Clipper or None): applied at the boundary.
        guard (GradGuard or None): steps the optimizer at the boundary (and may skip).
        reduction (str): ``"mean"`` (the loss is a per-sample mean, default) or ``"sum"``.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> acc = Accumulator(m, opt, accumulation_steps=2)
        >>> x = torch.ones(4, 3)
        >>> acc.backward(m(x[:2]).pow(2).mean(), batch_size=2)
        False
        >>> acc.backward(m(x[2:]).pow(2).mean(), batch_size=2)
        True
    """

    def __init__(self, model, optimizer, accumulation_steps: int, clipper=None, guard=None, reduction: str = "mean"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.accumulation_steps = _checks.integer("accumulation_steps", accumulation_steps, minimum=1)
        self.clipper = clipper
        self.guard = guard
        self.reduction = _checks.choice("reduction", reduction, {"mean", "sum"})
        self.micro_step = 0
        self.samples = 0
        self.optimizer_steps = 0
        self.last_clip = None
        self.last_guard = None

    @property
    def _ddp(self) -> bool:
        return isinstance(self.model, torch.nn.parallel.DistributedDataParallel)

    def backward(self, loss: torch.Tensor, batch_size: int, last: bool = False) -> bool:
        """Back-propagate one micro-batch; step at the window's end. Returns True if it stepped.

        Args:
            loss: the micro-batch loss (a mean over its samples if reduction="mean").
            batch_size (int): samples in this micro-batch.
            last (bool): this is the final micro-batch of the data; close the window
                even if it is not full.
        """
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"loss must be a 0-d tensor, got {type(loss).__name__} "
                            f"with shape {tuple(getattr(loss, 'shape', ()))}")
        batch_size = _checks.integer("batch_size", batch_size, minimum=1)
        boundary = last or self.micro_step + 1 == self.accumulation_steps
        weight = float(batch_size) if self.reduction == "mean" else 1.0
        ctx = self.model.no_sync() if (self._ddp and not boundary) else contextlib.nullcontext()
        with ctx:
            (loss * weight).backward()
        self.micro_step += 1
        self.samples += batch_size
        if boundary:
            self._step()
            return True
        return False

    def flush(self) -> bool:
        """Close a partial window (e.g. after the loop). Returns True if it stepped."""
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
        self._step()
        return True

    @torch.no_grad()
    def _step(self) -> None:
        _, grads = named_grads(self.model)
        if self.reduction == "mean":
            torch._foreach_div_(grads, float(self.samples))
        if self.guard is not None:
            if self.clipper is not None and self.guard.clipper is None:
                self.guard.clipper = self.clipper
            self.last_guard = self.guard.step()
        else:
            if self.clipper is not None:
                self.last_clip = self.clipper(self.model)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        self.micro_step = 0
        self.samples = 0
