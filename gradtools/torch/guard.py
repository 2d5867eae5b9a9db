"""Check gradients before ``optimizer.step()``: raise, skip, or zero the bad entries.

A skipped step never calls ``optimizer.step()``, so weights and optimizer
state (moments, step counts) stay bit-identical. After ``max_consecutive_skips``
skips in a row the guard raises: a run that can no longer take a step should
stop loudly rather than spin.

With a ``torch.amp.GradScaler`` pass it as ``scaler``: the guard unscales once,
then checks, and lets the scaler own the step (an overflow under dynamic loss
scaling is expected and only lowers the scale, so it is counted apart, in
``overflows``, and never raises ``TooManySkipsError``).

A normal step reads one number from the device, the global norm: the guard, the
spike detector and the clipping policy all decide on that float. Only a
non-finite norm costs more (the per-parameter counts, to name the culprit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gradtools import _checks
from gradtools.guard import GuardBase, NonFiniteGradientError, TooManySkipsError
from gradtools.policies import SpikeDetector
from gradtools.torch.norms import GradStats, count_nonfinite_entries, named_grads, stats_of

__all__ = ["GradGuard", "NonFiniteGradientError", "TooManySkipsError", "GuardResult"]


@dataclass
class GuardResult:
    stepped: bool
    reason: str  # "ok", "nonfinite", "spike", "overflow" or "zeroed"
    stats: GradStats = field(repr=False)


class GradGuard(GuardBase):
    """Guard ``optimizer.step()`` against non-finite or spiking gradients.

    The decision itself is :class:`gradtools.guard.StepDecider`'s, shared with
    ``gradtools.keras``; this class measures, zeroes, clips and steps. The decider
    is fed the clipper's policy, so it asks the policy for the threshold only on
    steps it takes, and ``state_dict()`` holds the policy's running state too.

    Args:
        model (torch.nn.Module): names parameters by module path in messages.
        optimizer (torch.optim.Optimizer): the optimizer to step.
        action (str): what to do on a non-finite gradient: ``"skip"`` (default),
            ``"raise"`` or ``"zero"`` (replace inf/nan entries with 0, then step).
        spike (SpikeDetector or None): also skip steps whose global norm is a spike.
        max_consecutive_skips (int): raise ``TooManySkipsError`` after this many
            skips in a row, default 10.
        scaler (torch.amp.GradScaler or None): mixed precision; see module doc.
        clipper (gradtools.torch.clip.Clipper or None): clip after checking, before
            stepping; the decider asks its policy for the threshold, and
            ``state_dict()`` carries the policy's state.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> guard = GradGuard(m, opt, action="skip")
        >>> m(torch.ones(1, 2)).sum().backward()
        >>> m.weight.grad[0, 0] = float("nan")
        >>> guard.step().stepped
        False
    """

    def __init__(self, model, optimizer, action: str = "skip", spike: SpikeDetector | None = None,
                 max_consecutive_skips: int = 10, scaler=None, clipper=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        super().__init__(action, spike, max_consecutive_skips, clipper, kind="parameter")
        self.scaler = scaler
        self.overflows = 0

    def state_dict(self) -> dict:
        return {**self.decider.state_dict(), "overflows": self.overflows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.decider.load_state_dict(state_dict)
        self.overflows = _checks.integer("state_dict['overflows']", state_dict.get("overflows", 0), minimum=0)

    @torch.no_grad()
    def step(self) -> GuardResult:
        """Check the gradients, then step the optimizer or skip. Returns what happened."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        names, grads = named_grads(self.model, "model")
        norm_type = self.norm_type
        stats = stats_of(names, grads, norm_type, count_nonfinite=False)
        norm = float(stats.total)  # the one host read of a normal step
        first_bad = None
        if not math.isfinite(norm):
            stats.nonfinite = count_nonfinite_entries(grads)
            first_bad = stats.first_nonfinite() or "<overflow>"
        if first_bad is not None and self.scaler is not None and self.decider.action != "raise":
            # Dynamic loss scaling overflow: the scaler skips the step and lowers the scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.overflows += 1
            self.decider.overflow()
            return GuardResult(False, "overflow", stats)
        bad_count = int(stats.nonfinite.sum()) if first_bad is not None else 0
        decision = self.decider.decide(norm, first_bad, bad_count)
        if decision.reason == "zero":
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            stats = stats_of(names, grads, norm_type, count_nonfinite=False)
            norm = float(stats.total)
            decision = self.decider.after_zeroing(norm)
        if not decision.proceed:
            return GuardResult(False, decision.reason, stats)
        if self.clipper is not None:
            self.clipper.clip_to(self.model, decision.threshold, stats=stats, norm=norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return GuardResult(True, decision.reason, stats)
