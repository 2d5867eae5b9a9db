"""Check gradients before ``optimizer.step()``: raise, skip, or zero the bad entries.

A skipped step never calls ``optimizer.step()``, so weights and optimizer
state (moments, step counts) stay bit-identical. After ``max_consecutive_skips``
skips in a row the guard raises: a run that can no longer take a step should
stop loudly rather than spin.

The guard checks exactly the gradients ``optimizer.step()`` will apply: every
parameter in the optimizer's ``param_groups`` (a learnable temperature outside
the model included, a model parameter the optimizer does not own excluded). The
model only names them in messages and statistics.

Mixed precision: pass the ``torch.amp.GradScaler`` as ``scaler`` and replace
``scaler.step(optimizer); scaler.update()`` with ``guard.step()``. The guard
unscales (unless PyTorch's recipe already did: ``scaler.unscale_(optimizer)``
before ``guard.step()`` is fine), checks, and leaves the scaler exactly as the
plain loop would:

* A non-finite gradient is a loss-scale overflow, whatever ``action`` says: the
  scaler skips the step and lowers its scale. A fresh scaler overflows a few
  times while it finds its scale, so overflows are counted apart, in
  ``overflows``, and never raise ``TooManySkipsError``. Only gradients that stay
  non-finite for more than ``max_consecutive_overflows`` steps in a row (the
  scale has then fallen by 2 to that power) are treated as non-finite: then
  ``action`` applies, and the scaler still lowers its scale.
* Any other skip (a spike) leaves the scale and its growth tracker as they were.
* A scaler built with ``enabled=False`` is no scaler.

To watch the gradients, give the guard a :class:`~gradtools.torch.Monitor`
(``monitor=``): it records the unscaled gradients before they are zeroed or
clipped, and calls ``after_step()`` after the step, taken or skipped.

A normal step reads one number from the device, the global norm: the guard, the
spike detector and the clipping policy all decide on that float. Only a
non-finite norm costs more (the per-parameter counts, to name the culprit).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from gradtools import _checks
from gradtools.guard import GuardBase, NonFiniteGradientError, TooManySkipsError
from gradtools.policies import SpikeDetector
from gradtools.torch import _checks as _tchecks
from gradtools.torch.monitor import Monitor
from gradtools.torch.norms import GradStats, measure

__all__ = ["GradGuard", "NonFiniteGradientError", "TooManySkipsError", "GuardResult"]


@dataclass
class GuardResult:
    """What ``GradGuard.step()`` did.

    ``stepped``: whether the optimizer stepped; ``reason``: ``"ok"``, ``"zeroed"``,
    ``"nonfinite"``, ``"spike"`` or ``"overflow"``; ``stats``: the gradient statistics
    the decision was taken on (unscaled, before clipping); ``threshold``: the clipping
    threshold applied (``inf``: none).
    """

    stepped: bool
    reason: str
    stats: GradStats = field(repr=False)
    threshold: float = math.inf


# Which guard steps each GradScaler: a scaler shared by two guards would be updated twice a step.
_SCALER_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unscale_once(scaler, optimizer) -> None:
    """``scaler.unscale_(optimizer)``, unless PyTorch's AMP recipe already called it this step."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as exc:
        if "already been called" not in str(exc):
            raise


class GradGuard(GuardBase):
    """Guard ``optimizer.step()`` against non-finite or spiking gradients.

    The decision itself is :class:`gradtools.guard.StepDecider`'s, shared with
    ``gradtools.keras``; this class measures, zeroes, clips and steps. The decider
    is fed the clipper's policy, so it asks the policy for the threshold only on
    steps it takes, and ``state_dict()`` holds the policy's running state too.

    Args:
        model (torch.nn.Module): names the optimizer's parameters (by module path)
            in messages and statistics.
        optimizer (torch.optim.Optimizer): the optimizer to step; the guard checks
            every parameter it owns. Closure optimizers (LBFGS) are not supported.
        action (str): what to do on a non-finite gradient: ``"skip"`` (default),
            ``"raise"`` or ``"zero"`` (replace inf/nan entries with 0, then check
            the rest as usual and step).
        spike (SpikeDetector or None): also skip steps whose global norm is a spike.
        max_consecutive_skips (int): raise ``TooManySkipsError`` after this many
            skips in a row, default 10.
        scaler (torch.amp.GradScaler or None): mixed precision; see the module doc.
        clipper (gradtools.torch.clip.Clipper or None): clip after checking, before
            stepping; the decider asks its policy for the threshold, and
            ``state_dict()`` carries the policy's state.
        monitor (gradtools.torch.Monitor or None): records the unscaled, unclipped
            gradients on every ``step()``, taken or skipped.
        max_consecutive_overflows (int): with a scaler, non-finite gradients this
            many steps in a row are loss-scale overflows; one more, and ``action``
            applies. Default 32.

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
                 max_consecutive_skips: int = 10, scaler=None, clipper=None, monitor=None,
                 max_consecutive_overflows: int = 32):
        _tchecks.module("model", model)
        _tchecks.optimizer("optimizer", optimizer, closure=False)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if monitor is not None and not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a gradtools.torch.Monitor or None, got {type(monitor).__name__}")
        self.model = model
        self.optimizer = optimizer
        super().__init__(action, spike, max_consecutive_skips, clipper, kind="parameter")
        if scaler is not None:
            owner = _SCALER_GUARDS.get(scaler)
            owner = None if owner is None else owner()
            if owner is not None and owner.optimizer is not optimizer:
                raise ValueError(
                    "scaler already belongs to a GradGuard of another optimizer: the guard calls "
                    "scaler.update() after its own step, so one GradScaler cannot serve two guards. For one "
                    "loss over several optimizers use PyTorch's recipe (scaler.step for each, one update)")
            _SCALER_GUARDS[scaler] = weakref.ref(self)
        self.scaler = scaler
        self.monitor = monitor
        self.max_consecutive_overflows = _checks.integer("max_consecutive_overflows", max_consecutive_overflows,
                                                         minimum=1)
        self.overflows = 0
        self.consecutive_nonfinite = 0  # non-finite steps in a row under an enabled scaler
        self._names: dict[int, str] = {}

    def state_dict(self) -> dict:
        return {**self.decider.state_dict(), "overflows": self.overflows,
                "consecutive_nonfinite": self.consecutive_nonfinite}

    def load_state_dict(self, state_dict: dict) -> None:
        self.decider.load_state_dict(state_dict)
        for key in ("overflows", "consecutive_nonfinite"):
            setattr(self, key, _checks.integer(f"state_dict[{key!r}]", state_dict.get(key, 0), minimum=0))

    def _owned_grads(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
        """Names, parameters and gradients of what ``optimizer.step()`` will apply."""
        names, params = [], []
        seen = set()
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None or id(p) in seen:
                    continue
                seen.add(id(p))
                if id(p) not in self._names:  # resolved once, again only when the model changed
                    self._names = {id(q): n for n, q in self.model.named_parameters()}
                names.append(self._names.get(id(p), f"param_groups[{gi}][{pi}]"))
                params.append(p)
        if not params:
            raise ValueError("none of the optimizer's parameters has a gradient: call loss.backward() "
                             "before guard.step()")
        return names, params, [p.grad for p in params]

    def _scaler(self):
        return self.scaler if self.scaler is not None and self.scaler.is_enabled() else None

    @torch.no_grad()
    def step(self) -> GuardResult:
        """Check the gradients, then step the optimizer or skip. Returns what happened."""
        names, params, grads = self._owned_grads()
        scaler = self._scaler()
        if scaler is not None:
            _unscale_once(scaler, self.optimizer)
        result, nonfinite = None, False
        try:
            if self.monitor is not None:
                self.monitor.record()
            stats, norm, first_bad = measure(names, grads, self.norm_type)  # one host read when finite
            nonfinite, note = first_bad is not None, ""
            if scaler is not None:
                self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if nonfinite else 0
                if nonfinite and self.consecutive_nonfinite <= self.max_consecutive_overflows:
                    self.overflows += 1
                    self.decider.overflow()
                    result = GuardResult(False, "overflow", stats)
                    return result
                note = f" for {self.consecutive_nonfinite} consecutive steps under loss scaling"
            bad_count = int(stats.nonfinite.sum()) if nonfinite else 0
            decision = self.decider.decide(norm, first_bad, bad_count, note)
            if decision.reason == "zero":
                for g in grads:
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
                stats, norm, _ = measure(names, grads, self.norm_type)
                decision = self.decider.after_zeroing(norm)
            threshold = math.inf
            if decision.proceed and self.clipper is not None:
                threshold = decision.threshold
                self.clipper.rescale(params, threshold, stats.total)  # clip_to's rescaling, without a report
            result = GuardResult(decision.proceed, decision.reason, stats, threshold)
            return result
        finally:  # also when the decider raised: the scaler and the monitor always finish the step
            self._finish(result is not None and result.stepped, nonfinite, scaler)

    def _finish(self, stepped: bool, nonfinite: bool, scaler) -> None:
        """Step or not; leave the scaler as ``scaler.step(); scaler.update()`` would, or untouched on a skip."""
        if scaler is None:
            if stepped:
                self.optimizer.step()
        elif nonfinite:  # unscale_ found inf/nan: the scaler lowers its scale, as in the plain loop
            if stepped:
                self.optimizer.step()  # action "zero": the entries were zeroed; scaler.step would skip
            else:
                scaler.step(self.optimizer)  # skips the step
            scaler.update()
        elif stepped:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            # A skip that is no overflow (a spike): end the scaler's step, keep its scale and growth tracker.
            scaler.update(scaler.get_scale())
        if self.monitor is not None:
            self.monitor.after_step()
