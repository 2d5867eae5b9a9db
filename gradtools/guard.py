"""The guard's decision, framework-free: step, skip, or raise.

Both backends measure the gradients (global norm, the first variable with a
non-finite entry, how many such entries) and ask a :class:`StepDecider` what to
do. The decider also asks the clipping policy for this step's threshold, so a
skipped step never enters the policy's history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradtools import _checks
from gradtools.policies import SpikeDetector, get_policy

__all__ = ["StepDecider", "Decision", "GuardBase", "NonFiniteGradientError", "TooManySkipsError", "ACTIONS"]

ACTIONS = {"skip", "raise", "zero"}


class NonFiniteGradientError(FloatingPointError):
    """A gradient held inf or nan, and the guard was told to raise."""


class TooManySkipsError(RuntimeError):
    """The guard skipped more consecutive steps than it was allowed to."""


@dataclass
class Decision:
    proceed: bool
    reason: str  # "ok", "zeroed", "nonfinite", "spike"
    threshold: float  # clip threshold for this step (inf: do not clip)


class StepDecider:
    """Decide, from a step's gradient statistics, whether to take the step.

    Args:
        action (str): on a non-finite gradient: ``"skip"``, ``"raise"`` or
            ``"zero"`` (the caller zeroes the bad entries and re-measures).
        spike (SpikeDetector or None): also skip steps whose norm is a spike.
        max_consecutive_skips (int): raise ``TooManySkipsError`` after this many in a row.
        policy: clipping policy (see :func:`gradtools.policies.get_policy`) or None.
        kind (str): "parameter" or "variable", used in messages.
    """

    def __init__(self, action: str = "skip", spike: SpikeDetector | None = None, max_consecutive_skips: int = 10,
                 policy=None, kind: str = "parameter"):
        self.action = _checks.choice("action", action, ACTIONS)
        if spike is not None and not isinstance(spike, SpikeDetector):
            raise TypeError(f"spike must be a gradtools.policies.SpikeDetector or None, got {type(spike).__name__}")
        self.spike = spike
        self.max_consecutive_skips = _checks.integer("max_consecutive_skips", max_consecutive_skips, minimum=1)
        self.policy = None if policy is None else get_policy(policy)
        self.kind = kind
        self.steps = 0
        self.skipped = 0
        self.consecutive_skips = 0

    def _skip(self, reason: str) -> Decision:
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TooManySkipsError(
                f"skipped {self.consecutive_skips} consecutive steps (last at step {self.steps}, reason: {reason}); "
                f"max_consecutive_skips={self.max_consecutive_skips}. Lower the learning rate or inspect the data."
            )
        return Decision(False, reason, math.inf)

    def skip(self, reason: str) -> Decision:
        """Record a step skipped for a reason found by the caller; it counts towards ``max_consecutive_skips``."""
        self.steps += 1
        return self._skip(reason)

    def overflow(self) -> Decision:
        """Record a loss-scale overflow: a step not taken, but an expected one under dynamic loss
        scaling (the scaler lowers its scale), so neither ``skipped`` nor the consecutive-skip
        limit counts it."""
        self.steps += 1
        return Decision(False, "overflow", math.inf)

    def after_zeroing(self, norm: float) -> Decision:
        """Second half of a ``"zero"`` decision: the bad entries were zeroed, ``norm`` re-measured."""
        return self._finish(norm, zeroed=True)

    def decide(self, norm: float, first_bad: str | None = None, bad_count: int = 0, note: str = "") -> Decision:
        """``norm``: the global norm; ``first_bad``: name of the first non-finite variable, or None.

        A decision with reason ``"zero"`` asks the caller to zero the non-finite
        entries, re-measure the norm and call :meth:`after_zeroing`, which checks
        the zeroed gradient for spikes like any other. ``note`` is appended to the
        ``NonFiniteGradientError`` message.
        """
        self.steps += 1
        if first_bad is not None:
            if self.action == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradient at step {self.steps}: first in {self.kind} {first_bad!r} "
                    f"({bad_count} non-finite entries in all){note}"
                )
            if self.action == "skip":
                return self._skip("nonfinite")
            return Decision(True, "zero", math.inf)
        return self._finish(norm, zeroed=False)

    def _finish(self, norm: float, zeroed: bool) -> Decision:
        # A zeroed gradient is checked too: zeroing a NaN must not let a x1000 spike through.
        if self.spike is not None and self.spike.step(norm):
            return self._skip("spike")
        threshold = self.policy.step(norm) if self.policy is not None else math.inf
        self.consecutive_skips = 0
        return Decision(True, "zeroed" if zeroed else "ok", threshold)

    def state_dict(self) -> dict:
        """Counters, and the spike detector's and the policy's state (plain Python values)."""
        state = {"steps": self.steps, "skipped": self.skipped, "consecutive_skips": self.consecutive_skips}
        if self.spike is not None:
            state["spike"] = self.spike.state_dict()
        if self.policy is not None:
            state["policy"] = self.policy.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("steps", "skipped", "consecutive_skips"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing key {key!r}")
            setattr(self, key, _checks.integer(f"state_dict[{key!r}]", state_dict[key], minimum=0))
        if self.spike is not None:
            if "spike" not in state_dict:
                raise ValueError("state_dict has no 'spike' state but this guard has a spike detector")
            self.spike.load_state_dict(state_dict["spike"])
        # A state without a policy (a guard that had no clipper, or one saved by gradtools 0.1,
        # whose PyTorch guard did not hold it) leaves the policy's own state as it is.
        if self.policy is not None and "policy" in state_dict:
            self.policy.load_state_dict(state_dict["policy"])


class GuardBase:
    """What both backends' ``GradGuard`` share: a decider fed the clipper's policy, and the counters.

    The backends add the measuring, zeroing, clipping and stepping.
    """

    def __init__(self, action: str, spike, max_consecutive_skips: int, clipper, kind: str):
        self.decider = StepDecider(action, spike, max_consecutive_skips, kind=kind)
        self.clipper = clipper  # feeds its policy to the decider

    @property
    def clipper(self):
        """The clipper applied after the check (``gradtools.torch.Clipper`` or ``gradtools.keras.Clipper``), or None."""
        return self._clipper

    @clipper.setter
    def clipper(self, clipper):
        if clipper is not None and not hasattr(clipper, "clip_to"):
            raise TypeError(f"clipper must be a gradtools Clipper or None, got {type(clipper).__name__}")
        self._clipper = clipper
        self.decider.policy = None if clipper is None else clipper.policy

    action = property(lambda self: self.decider.action)
    norm_type = property(lambda self: 2.0 if self.clipper is None else self.clipper.norm_type,
                         doc="The p of the norms the guard measures: the clipper's (else 2).")
    steps = property(lambda self: self.decider.steps)
    skipped = property(lambda self: self.decider.skipped)
    consecutive_skips = property(lambda self: self.decider.consecutive_skips)

    def state_dict(self) -> dict:
        """Counters, spike window and the policy's running state (plain Python values)."""
        return self.decider.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.decider.load_state_dict(state_dict)
