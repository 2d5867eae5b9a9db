"""The guard's decision, framework-free: step, skip, or raise.

Both backends measure the gradients (global norm, the first variable with a
non-finite entry, how many such entries) and ask a :class:`StepDecider` what to
do. The decider also asks the clipping policy for this step's threshold, so a
skipped step never enters the policy's history.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from gradtools import _checks
from gradtools._ops import NUMPY, select
from gradtools.policies import SpikeDetector, Stateful, get_policy

__all__ = ["StepDecider", "Decision", "REASONS", "GuardBase", "NonFiniteGradientError", "TooManySkipsError", "ACTIONS"]

ACTIONS = {"skip", "raise", "zero"}


class NonFiniteGradientError(FloatingPointError):
    """A gradient held inf or nan, and the guard was told to raise."""


class TooManySkipsError(RuntimeError):
    """The guard skipped more consecutive steps than it was allowed to."""


@dataclass
class Decision:
    proceed: bool
    reason: str  # "ok", "zeroed", "nonfinite", "spike", "overflow"; "zero" asks the caller to zero
    threshold: float  # clip threshold for this step (inf: do not clip)


#: The reasons, indexed by the code :meth:`StepDecider.decide_arrays` returns.
REASONS = ("ok", "zeroed", "nonfinite", "spike", "overflow")
OK, ZEROED, NONFINITE, SPIKE, OVERFLOW = range(5)


class StepDecider(Stateful):
    """Decide, from a step's gradient statistics, whether to take the step.

    The decision is :meth:`decide_arrays`, written once over the operations of an
    ``xp`` namespace (:mod:`gradtools._ops`): with NumPy on the host (``decide``,
    the reference), with PyTorch on the gradients' device (what
    ``gradtools.torch.GradGuard`` calls, reading nothing back), with TensorFlow
    inside a Keras train step (what ``gradtools.keras.GradGuard`` calls, XLA
    included). The counters, the spike detector's window and the policy's state
    all live as arrays there.

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
        super().__init__()

    def init_state(self, xp) -> dict:
        zero = xp.asarray(0, xp.int)
        return {"steps": zero, "skipped": zero, "consecutive_skips": zero}

    def __repr__(self) -> str:
        return (f"StepDecider(action={self.action!r}, spike={self.spike!r}, "
                f"max_consecutive_skips={self.max_consecutive_skips}, policy={self.policy!r})")

    def _count(self, key: str) -> int:
        return int(self._xp.to_numpy(self._s[key]))

    skipped = property(lambda self: self._count("skipped"), doc="Steps skipped so far.")
    consecutive_skips = property(lambda self: self._count("consecutive_skips"), doc="Skips in a row, now.")

    # ------------------------------------------------------------------ the maths, once
    def decide_arrays(self, norm, nonfinite, xp, commit: bool = True) -> dict:
        """Decide one step with the operations of ``xp``, updating every state in place.

        ``norm``: the global norm (after zeroing, under ``action="zero"``); ``nonfinite``: a
        boolean array, whether the gradient held inf or nan. Returns arrays: ``proceed``,
        ``code`` (an index into :data:`REASONS`), ``threshold`` (a Python number for a fixed
        threshold) and ``too_many`` (the consecutive-skip limit is reached). The spike
        detector sees only steps that are not skipped for a non-finite gradient, and the
        policy only steps that are taken; the caller raises (:meth:`raise_for`). With
        ``commit=False`` nothing changes until the caller calls ``out["commit"]()``.
        """
        s = self.arrays(xp)
        pending = []
        bad = nonfinite & (self.action != "zero")
        spike = bad & False
        if self.spike is not None:
            state = self.spike.arrays(xp)
            flag, new = self.spike.update(state, norm, xp)
            pending.append((state, select(~bad, new, state, xp)))
            spike = flag & ~bad
        proceed = ~bad & ~spike
        threshold = math.inf
        if self.policy is not None:
            threshold = self._threshold(norm, proceed, xp, pending)
        # a step that raises (action "raise") is not taken, but it is no skip either
        skipped = spike if self.action == "raise" else ~proceed
        consecutive = xp.where(skipped, s["consecutive_skips"] + 1, xp.where(proceed, 0, s["consecutive_skips"]))
        pending.append((s, {"steps": s["steps"] + 1, "skipped": s["skipped"] + xp.where(skipped, 1, 0),
                            "consecutive_skips": consecutive}))

        def apply():
            for state, new in pending:
                if state is None:  # a host-only policy's trial, to keep
                    new()
                else:
                    xp.assign(state, new)

        if commit:
            apply()
        code = xp.where(bad, NONFINITE, xp.where(spike, SPIKE, xp.where(nonfinite, ZEROED, OK)))
        return {"proceed": proceed, "code": code, "threshold": threshold, "norm": norm,
                "too_many": consecutive >= self.max_consecutive_skips, "commit": apply}

    def _threshold(self, norm, proceed, xp, pending: list):
        policy = self.policy
        if not policy.on_device():  # a host-only policy: it needs the numbers
            if not bool(proceed):
                return xp.asarray(math.inf, xp.float)
            trial = copy.deepcopy(policy)
            threshold = trial.step(float(norm))
            pending.append((None, lambda: policy.__dict__.update(trial.__dict__)))
            return xp.asarray(threshold, xp.float)
        state = policy.arrays(xp)
        threshold, new = policy.update(state, norm, xp)
        pending.append((state, select(proceed, new, state, xp)))
        if type(threshold) is float:  # a constant (FixedThreshold), not a NumPy scalar computed this step
            return threshold
        return xp.where(proceed, threshold, math.inf)

    def raise_for(self, code: int, too_many: bool, first_bad=None, bad_count=None, note: str = "",
                  steps: int | None = None, consecutive: int | None = None) -> None:
        """Raise what a decision read on the host calls for (nothing for a step taken or skipped quietly).

        ``steps`` and ``consecutive`` (default: the counters now) are those of the decision,
        for a decision recorded on a device and read later.
        """
        steps = self.steps if steps is None else steps
        if code == NONFINITE and self.action == "raise":
            count = "" if bad_count is None else f" ({bad_count} non-finite entries in all)"
            where = "" if first_bad is None else f": first in {self.kind} {first_bad!r}"
            raise NonFiniteGradientError(f"non-finite gradient at step {steps}{where}{count}{note}")
        if too_many:
            raise TooManySkipsError(
                f"skipped {self.consecutive_skips if consecutive is None else consecutive} consecutive steps (last at step {steps}, reason: "
                f"{REASONS[code]}); max_consecutive_skips={self.max_consecutive_skips}. Lower the learning "
                "rate or inspect the data."
            )

    # ------------------------------------------------------------------ on the host, with NumPy
    def _decide(self, norm: float, nonfinite: bool, first_bad=None, bad_count=None, note="") -> Decision:
        out = NUMPY.run(self.decide_arrays, np.float64(norm), np.asarray(nonfinite), NUMPY)
        code = int(out["code"])
        self.raise_for(code, bool(out["too_many"]), first_bad, bad_count, note)
        return Decision(bool(out["proceed"]), REASONS[code], float(out["threshold"]))

    def overflow(self) -> Decision:
        """Record a loss-scale overflow: a step not taken, but an expected one under dynamic loss
        scaling (the scaler lowers its scale), so neither ``skipped`` nor the consecutive-skip
        limit counts it."""
        s = self.arrays(self._xp)
        self._xp.assign(s, {"steps": s["steps"] + 1})
        return Decision(False, "overflow", math.inf)

    def after_zeroing(self, norm: float) -> Decision:
        """Second half of a ``"zero"`` decision: the bad entries were zeroed, ``norm`` re-measured."""
        return self._decide(norm, True)

    def decide(self, norm: float, first_bad: str | None = None, bad_count: int = 0, note: str = "") -> Decision:
        """``norm``: the global norm; ``first_bad``: name of the first non-finite variable, or None.

        A decision with reason ``"zero"`` asks the caller to zero the non-finite
        entries, re-measure the norm and call :meth:`after_zeroing`, which checks
        the zeroed gradient for spikes like any other. ``note`` is appended to the
        ``NonFiniteGradientError`` message.
        """
        if first_bad is not None and self.action == "zero":
            return Decision(True, "zero", math.inf)
        return self._decide(norm, first_bad is not None, first_bad, bad_count, note)

    def state_dict(self) -> dict:
        """Counters, and the spike detector's and the policy's state (plain Python values)."""
        host = self._host()
        state = {key: int(host[key]) for key in ("steps", "skipped", "consecutive_skips")}
        if self.spike is not None:
            state["spike"] = self.spike.state_dict()
        if self.policy is not None:
            state["policy"] = self.policy.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        counters = {}
        for key in ("steps", "skipped", "consecutive_skips"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing key {key!r}")
            counters[key] = np.asarray(_checks.integer(f"state_dict[{key!r}]", state_dict[key], minimum=0))
        if self.spike is not None:
            if "spike" not in state_dict:
                raise ValueError("state_dict has no 'spike' state but this guard has a spike detector")
            self.spike.load_state_dict(state_dict["spike"])
        # A state without a policy (a guard that had no clipper, or one saved by gradtools 0.1,
        # whose PyTorch guard did not hold it) leaves the policy's own state as it is.
        if self.policy is not None and "policy" in state_dict:
            self.policy.load_state_dict(state_dict["policy"])
        self._store(counters)  # where the state lives


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
