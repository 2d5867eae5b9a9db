"""Check gradients before ``optimizer.step()``: raise, skip, or zero the bad entries.

A skipped step never calls ``optimizer.step()``, so weights and optimizer
state (moments, step counts) stay bit-identical. After ``max_consecutive_skips``
skips in a row the guard raises: a run that can no longer take a step should
stop loudly rather than spin.

With a ``torch.amp.GradScaler`` pass it as ``scaler``: the guard unscales once,
then checks, and lets the scaler own the step (an overflow under dynamic loss
scaling is expected and only lowers the scale, so it is counted apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradtools import _checks
from gradtools.policies import SpikeDetector
from gradtools.torch.norms import GradStats, grad_stats

__all__ = ["GradGuard", "NonFiniteGradientError", "TooManySkipsError", "GuardResult"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient held inf or nan, and the guard was told to raise."""


class TooManySkipsError(RuntimeError):
    """The guard skipped more consecutive steps than it was allowed to."""


@dataclass
class GuardResult:
    stepped: bool
    reason: str  # "ok", "nonfinite", "spike", "overflow" or "zeroed"
    stats: GradStats = field(repr=False)


class GradGuard:
    """Guard ``optimizer.step()`` against non-finite or spiking gradients.

    Args:
        model (torch.nn.Module): names parameters by module path in messages.
        optimizer (torch.optim.Optimizer): the optimizer to step.
        action (str): what to do on a non-finite gradient: ``"skip"`` (default),
            ``"raise"`` or ``"zero"`` (replace inf/nan entries with 0, then step).
        spike (SpikeDetector or None): also skip steps whose global norm is a spike.
        max_consecutive_skips (int): raise ``TooManySkipsError`` after this many
            skips in a row, default 10.
        scaler (torch.amp.GradScaler or None): mixed precision; see module doc.
        clipper (gradtools.torch.Clipper or None): clip after checking, before stepping.

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
        self.action = _checks.choice("action", action, {"skip", "raise", "zero"})
        if spike is not None and not isinstance(spike, SpikeDetector):
            raise TypeError(f"spike must be a gradtools.policies.SpikeDetector or None, got {type(spike).__name__}")
        self.spike = spike
        self.max_consecutive_skips = _checks.integer("max_consecutive_skips", max_consecutive_skips, minimum=1)
        self.scaler = scaler
        self.clipper = clipper
        self.steps = 0
        self.skipped = 0
        self.overflows = 0
        self.consecutive_skips = 0

    def state_dict(self) -> dict:
        state = {"steps": self.steps, "skipped": self.skipped, "overflows": self.overflows,
                 "consecutive_skips": self.consecutive_skips}
        if self.spike is not None:
            state["spike"] = self.spike.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("steps", "skipped", "overflows", "consecutive_skips"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing key {key!r} for GradGuard")
            setattr(self, key, _checks.integer(f"state_dict[{key!r}]", state_dict[key], minimum=0))
        if self.spike is not None:
            if "spike" not in state_dict:
                raise ValueError("state_dict has no 'spike' state but this GradGuard has a SpikeDetector")
            self.spike.load_state_dict(state_dict["spike"])

    def _skip(self, reason: str, stats: GradStats) -> GuardResult:
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TooManySkipsError(
                f"skipped {self.consecutive_skips} consecutive steps (last at step {self.steps}, reason: {reason}); "
                f"max_consecutive_skips={self.max_consecutive_skips}. Lower the learning rate or inspect the data."
            )
        return GuardResult(False, reason, stats)

    @torch.no_grad()
    def step(self) -> GuardResult:
        """Check the gradients, then step the optimizer or skip. Returns what happened."""
        self.steps += 1
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        stats = grad_stats(self.model)
        finite = stats.is_finite()
        if not finite and self.scaler is not None and self.action != "raise":
            # Dynamic loss scaling overflow: the scaler skips the step and lowers the scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.overflows += 1
            return self._skip("overflow", stats)
        if not finite:
            if self.action == "raise":
                name = stats.first_nonfinite() or "<unknown>"
                count = int(stats.nonfinite.sum())
                raise NonFiniteGradientError(
                    f"non-finite gradient at step {self.steps}: first in parameter {name!r} "
                    f"({count} non-finite entries in all)"
                )
            if self.action == "skip":
                return self._skip("nonfinite", stats)
            for p in self.model.parameters():
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            stats = grad_stats(self.model)
        elif self.spike is not None and self.spike.step(float(stats.total)):
            return self._skip("spike", stats)
        if self.clipper is not None:
            self.clipper(self.model, stats=stats)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.consecutive_skips = 0
        return GuardResult(True, "ok" if finite else "zeroed", stats)
