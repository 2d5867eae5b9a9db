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

Host reads. The measurement, the spike detector, the clipping policy and the
decision are tensor operations on the gradients' device (the maths is
:mod:`gradtools.policies`' and :class:`gradtools.guard.StepDecider`'s, shared
with ``gradtools.keras``), and the gradients are clipped by a factor computed
there. What remains is taking the step or not:

* ``sync=True`` (default): the guard reads one integer, the verdict, and calls
  ``optimizer.step()`` only on a step it takes. An error (``action="raise"``,
  ``TooManySkipsError``) is raised in that ``step()``.
* ``sync=False``: no read. ``optimizer.step()`` always runs, and a
  skipped step is undone on the device, ``torch.where(skip, before, after)``,
  from a copy of the parameters and of the optimizer's state taken before it
  (memory for one more copy of both). Two cases read one flag: a step in which
  the optimizer creates state (its first), because a skipped one must leave no
  state behind and no tensor operation can delete a dictionary entry; and state
  kept on the host (a step counter on the CPU next to gradients on a GPU:
  PyTorch's Adam default unless ``capturable=True`` or ``fused=True``), because
  restoring it needs the decision there. Errors are raised at the next read of a
  :class:`GuardResult` field, at :meth:`GradGuard.check`, or every
  ``check_every`` steps, whichever comes first. This is how OLMo-core's
  skip-step optimizers avoid the synchronisation, for any optimizer.

Either way the read-free half, :meth:`GradGuard.decide` (measure, decide, clip), compiles
with ``torch.compile(fullgraph=True)``, and :meth:`GradGuard.apply` takes the step: after
one read with ``sync=True``, undone on the device with ``sync=False``.

Under a ``GradScaler`` the scaler reads its own found-inf flag in
``scaler.step()``; the guard then reads the verdict too (``sync`` is ignored).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from gradtools import _checks
from gradtools._ops import NUMPY
from gradtools.guard import NONFINITE, OK, OVERFLOW, REASONS, ZEROED, GuardBase, NonFiniteGradientError, TooManySkipsError
from gradtools.policies import SpikeDetector
from gradtools.stats import GradStats
from gradtools.torch import _checks as _tchecks
from gradtools.torch._ops import ops_on
from gradtools.torch.monitor import Monitor
from gradtools.torch.norms import count_nonfinite_entries, local, measure, nonfinite_counts

__all__ = ["GradGuard", "NonFiniteGradientError", "TooManySkipsError", "GuardResult"]


class GuardResult:
    """What ``GradGuard.step()`` did; the fields are read from the device when read.

    ``stepped``: whether the optimizer's step was taken; ``reason``: ``"ok"``,
    ``"zeroed"``, ``"nonfinite"``, ``"spike"`` or ``"overflow"``; ``stats``: the
    gradient statistics the decision was taken on (unscaled, before clipping);
    ``threshold``: the clipping threshold applied (``inf``: none), a Python number
    or a 0-d tensor; ``code``: the verdict as a 0-d tensor (an index into
    :data:`gradtools.guard.REASONS`), for code that must not read it.
    """

    def __init__(self, code, stats, threshold=math.inf, guard=None, verdict: int | None = None):
        self.code, self.stats, self.threshold, self._guard, self._verdict = code, stats, threshold, guard, verdict
        self._applied = False

    def _read(self) -> int:
        if self._verdict is None:
            if self._guard is not None:
                self._guard.check()  # a deferred error surfaces at the first read
            self._verdict = int(self.code)
        return self._verdict

    stepped = property(lambda self: self._read() in (OK, ZEROED))
    reason = property(lambda self: REASONS[self._read()])

    def __repr__(self) -> str:
        return f"GuardResult(code={self.code!r}, threshold={self.threshold!r})"


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
        sync (bool): read the verdict (one integer) and call ``optimizer.step()`` only on
            steps taken (True, default), or read nothing and undo skipped steps on the
            device (False); see the module doc.
        check_every (int): with ``sync=False``, read the recorded errors every this many
            steps (and at the first read of a result), default 100.

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
                 max_consecutive_overflows: int = 32, sync: bool = True, check_every: int = 100):
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
        self._names: dict[int, str] = {id(q): n for n, q in model.named_parameters()}
        self._groups = optimizer.param_groups
        params = self._params()
        if len({id(p) for p in params}) != len(params):
            twice = next(self._names_of([p])[0] for i, p in enumerate(params) if any(p is q for q in params[:i]))
            raise ValueError(f"optimizer holds parameter {twice!r} twice: it would be measured (and stepped) twice")
        self.sync = _checks.boolean("sync", sync)
        self.check_every = _checks.integer("check_every", check_every, minimum=1)
        self._alarm, self._unchecked, self._copies = None, 0, None
        self._place(local(params[0]).device)  # the state on the device from the start: decide() traces once

    def state_dict(self) -> dict:
        return {**self.decider.state_dict(), "overflows": self.overflows,
                "consecutive_nonfinite": self.consecutive_nonfinite}

    def load_state_dict(self, state_dict: dict) -> None:
        self.decider.load_state_dict(state_dict)
        for key in ("overflows", "consecutive_nonfinite"):
            setattr(self, key, _checks.integer(f"state_dict[{key!r}]", state_dict.get(key, 0), minimum=0))

    def _params(self) -> list[torch.Tensor]:
        """The optimizer's parameters, in its order (what an error recorded without a read indexes)."""
        # the optimizer's own list (add_param_group appends to it), reached without the optimizer:
        # Dynamo specialises a compiled function on the identity of an optimizer it meets
        return [p for group in self._groups for p in group["params"]]

    def _owned_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Parameters and gradients of what ``optimizer.step()`` will apply (no names: no strings,
        no ``id()``, nothing a compiled ``decide`` would specialise on a particular model)."""
        params = [p for p in self._params() if p.grad is not None]
        if not params:
            raise ValueError("none of the optimizer's parameters has a gradient: call loss.backward() "
                             "before guard.step()")
        return params, [p.grad for p in params]

    def _names_of(self, params) -> list[str]:
        """The model's names for ``params`` (``param_groups[i][j]`` for one the model does not hold)."""
        if any(id(p) not in self._names for p in params):  # again only when the model changed
            self._names = {id(q): n for n, q in self.model.named_parameters()}
            for gi, group in enumerate(self.optimizer.param_groups):
                for pi, p in enumerate(group["params"]):
                    self._names.setdefault(id(p), f"param_groups[{gi}][{pi}]")
        return [self._names[id(p)] for p in params]

    def _scaler(self):
        return self.scaler if self.scaler is not None and self.scaler.is_enabled() else None

    @torch.no_grad()
    def step(self) -> GuardResult:
        """Check the gradients, then step the optimizer or skip. Returns what happened.

        With ``sync=False`` (and no scaler) this is :meth:`decide` then :meth:`apply`; with
        ``sync=True`` it reads the global norm too where reading it is free (CPU gradients),
        decides with NumPy, and measures in float64 only when the float32 norm overflowed.
        """
        if not self.sync and self._scaler() is None:
            if self.monitor is not None:
                self.monitor.record()
            result = self.decide()
            self.apply(result)
            return result
        self._groups = self.optimizer.param_groups  # load_state_dict() replaces the list
        params, grads = self._owned_grads()
        names = self._names_of(params)
        scaler = self._scaler()
        if scaler is not None:
            _unscale_once(scaler, self.optimizer)
        result, verdict, overflowed = None, None, False
        try:
            norms, total, own = measure(grads, self.norm_type, wide=False)  # the rare overflow: below
            stats = GradStats(names, norms, total, None, self.norm_type)
            stats.count_with(lambda: nonfinite_counts(total, grads))
            if self.monitor is not None:
                self.monitor.record(stats)  # the same measurement, before zeroing and clipping
            nonfinite = ~torch.isfinite(total)
            if scaler is not None and bool(nonfinite):
                # the scaler reads its own flag anyway; its flag looks at the entries, not at the norm
                overflowed = bool(stats.nonfinite.sum() > 0)
                verdict = self._overflow(overflowed)
                if verdict is not None:
                    result = GuardResult(torch.tensor(OVERFLOW), stats, verdict=OVERFLOW)
                    return result
            elif scaler is not None:
                self._overflow(False)
            if self.action == "zero":
                stats.nonfinite = count_nonfinite_entries(grads)  # before zeroing, on the device
                for g in grads:
                    torch.nan_to_num_(local(g), nan=0.0, posinf=0.0, neginf=0.0)
                norms, total, own = measure(grads, self.norm_type, wide=False)
            out = self._decide_read(total, nonfinite)
            verdict = self._read_verdict(out)  # the one read of a step with a finite norm
            if verdict >= 16 and not bool(stats.nonfinite.sum() > 0):
                # a non-finite norm of finite entries: a float32 overflow; measure again in float64
                norms, total = measure(grads, self.norm_type, wide=True, narrow=(norms, total, own))[:2]
                own, nonfinite = total, torch.zeros((), dtype=torch.bool, device=total.device)
                stats.norms, stats.total = norms, total
                out = self._decide_read(total, nonfinite)
                verdict = self._read_verdict(out)
            out["commit"]()
            self._raise_if_needed(verdict % 16, stats)
            verdict %= 8
            threshold = out["threshold"] if self.clipper is not None else math.inf
            if verdict in (OK, ZEROED) and not self._below(threshold, out["norm"], own is total):
                self.clipper.rescale(params, threshold, total, own)  # clip_to's rescaling, without a report
            result = GuardResult(out["code"], stats, threshold, verdict=verdict)
            return result
        finally:  # also when the decider raised: the scaler and the monitor always finish the step
            self._finish(verdict, scaler, overflowed)

    @torch.no_grad()
    def decide(self) -> GuardResult:
        """The read-free half of ``step()``: measure, decide and clip.

        Everything is a tensor operation on the gradients' device, so this compiles with
        ``torch.compile(guard.decide, fullgraph=True)``; then :meth:`apply` takes the step: with
        ``sync=False`` always, undone on the device if it was a skip; with ``sync=True`` after
        reading the verdict, only if it is taken. A monitor given to the guard records in
        ``step()``, not here. Not with a ``GradScaler``: the scaler reads its own flag.

        Float32 and bfloat16 gradients are measured twice (as ``torch.nn.utils`` does, and
        accumulated in float64), so that finite entries whose float32 norm overflows are
        clipped, not skipped.
        """
        self._require_no_scaler("decide")
        params, grads = self._owned_grads()
        norms, total, own = measure(grads, self.norm_type, wide=True)
        stats = GradStats(lambda: self._names_of(params), norms, total, None, self.norm_type)
        stats.count_with(lambda: nonfinite_counts(total, grads))
        nonfinite = ~torch.isfinite(total)
        if self.action == "zero":
            stats.nonfinite = count_nonfinite_entries(grads)  # before zeroing, on the device
            for g in grads:
                torch.nan_to_num_(local(g), nan=0.0, posinf=0.0, neginf=0.0)
            norms, total, own = measure(grads, self.norm_type, wide=True)
        out = self.decider.decide_arrays(total.to(torch.float64), nonfinite, ops_on(total.device))
        threshold = out["threshold"] if self.clipper is not None else math.inf
        if not (isinstance(threshold, float) and math.isinf(threshold)):
            self.clipper.rescale(params, threshold, total, own, where=out["proceed"])
        self._watch(out, norms)
        return GuardResult(out["code"], stats, threshold, guard=self)

    @torch.no_grad()
    def apply(self, result: GuardResult) -> None:
        """Take the step :meth:`decide` decided.

        ``sync=False``: ``optimizer.step()``, undone on the device if it was a skip (no read);
        every ``check_every`` steps, raise a recorded error (:meth:`check`). ``sync=True``: read
        the verdict (one integer) and call ``optimizer.step()`` only on a step taken; a skip
        reads the recorded errors at once and raises them, as ``step()`` does."""
        self._require_no_scaler("apply")
        if not isinstance(result, GuardResult):
            raise TypeError(f"result must be the GuardResult of decide(), got {type(result).__name__}")
        if result._guard is not self:
            raise ValueError("result comes from another guard's decide() (or from step()): apply() takes "
                             "what this guard's decide() returned")
        if result._applied:
            raise ValueError("result was already applied: call decide() again for the next step")
        result._applied = True
        self._groups = self.optimizer.param_groups  # load_state_dict() replaces the list
        try:
            if self.sync:
                result._verdict = int(result.code)  # the one read
                if result._verdict in (OK, ZEROED):
                    self.optimizer.step()
                else:
                    self.check()
                return
            self._step_or_undo(result.code, self._owned_grads()[0])
            self._unchecked += 1
            if self._unchecked >= self.check_every:
                self.check()
        finally:
            if self.monitor is not None:
                self.monitor.after_step()

    def _require_no_scaler(self, method: str) -> None:
        if self._scaler() is not None:
            raise ValueError(f"{method}() is for a guard without a GradScaler: under loss scaling step() "
                             "unscales, reads the scaler's flag and updates the scaler; call step() alone")

    def _overflow(self, nonfinite: bool):
        """Under loss scaling: ``"overflow"`` for an expected overflow, else None (decide as usual)."""
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if nonfinite else 0
        if nonfinite and self.consecutive_nonfinite <= self.max_consecutive_overflows:
            self.overflows += 1
            self.decider.overflow()
            return "overflow"
        return None

    #: Decide with NumPy on the host when the gradients are on the CPU (``sync=True``): reading
    #: the norm costs nothing there, and a hundred scalar NumPy operations cost less than a
    #: hundred tensor operations. On an accelerator the maths runs on the device.
    host_maths_on_cpu = True

    def _decide_read(self, total, nonfinite) -> dict:
        """The decision of a step whose verdict is read: on the host for CPU gradients, else on the device."""
        if total.device.type == "cpu" and self.host_maths_on_cpu:
            norm = float(total)  # the one read, free on the CPU
            # the norm tells whether the entries were finite, except after zeroing them (one more read)
            bad = bool(nonfinite) if self.action == "zero" else not math.isfinite(norm)
            out = NUMPY.run(self.decider.decide_arrays, np.float64(norm), np.bool_(bad), NUMPY, False)
            threshold = out["threshold"]
            out["threshold"] = threshold if isinstance(threshold, float) else float(threshold)
            return out
        return self.decider.decide_arrays(total.to(torch.float64), nonfinite, ops_on(total.device), commit=False)

    @staticmethod
    def _below(threshold, norm, same_dtype: bool) -> bool:
        """Whether clipping is a multiplication by exactly 1, known on the host without a read: no
        threshold, or a norm read (CPU gradients) clearly below it (a margin far wider than the
        rounding of ``min(1, threshold / (norm + 1e-6))``). Then the pass over the gradients is
        left out; the result is bit-identical."""
        if not isinstance(threshold, float):
            return False
        if math.isinf(threshold):
            return True
        if not same_dtype or isinstance(norm, torch.Tensor):
            return False
        return float(norm) * (1.0 + 1e-4) + 1e-6 < threshold

    @staticmethod
    def _read_verdict(out) -> int:
        """The decision as one integer read: the code, +8 if too many skips, +16 if the norm is not finite."""
        if isinstance(out["code"], torch.Tensor):
            return int(out["code"] + 8 * out["too_many"].to(torch.int64)
                       + 16 * (~torch.isfinite(out["norm"])).to(torch.int64))
        return int(out["code"]) + 8 * bool(out["too_many"]) + 16 * (not math.isfinite(out["norm"]))

    def _raise_if_needed(self, packed: int, stats) -> None:
        """Raise what a decision read on the host calls for (reading more, to say what went wrong)."""
        code, too_many = packed % 8, packed >= 8
        if (code == NONFINITE and self.action == "raise") or too_many:
            note = ""
            if self._scaler() is not None:
                note = f" for {self.consecutive_nonfinite} consecutive steps under loss scaling"
            bad = stats.first_nonfinite() if code == NONFINITE else None
            count = int(stats.nonfinite.sum()) if code == NONFINITE else None
            self.decider.raise_for(code, too_many, bad, count, note)

    # ------------------------------------------------------------------ sync=False: no reads
    def _place(self, device) -> None:
        """Move the decision's state to ``device`` and make the alarm there (once, or when the model moved)."""
        ops = ops_on(device)
        self.decider.arrays(ops)
        if self.decider.spike is not None:
            self.decider.spike.arrays(ops)
        if self.decider.policy is not None and self.decider.policy.on_device():
            self.decider.policy.arrays(ops)
        self._alarm = torch.zeros(3, dtype=torch.int64, device=device)

    def _watch(self, out, norms) -> None:
        """Remember, on the device, the first step that calls for an error; check every ``check_every``.

        The parameter is recorded by its place among all the optimizer's parameters, which does
        not change when some of them have no gradient (a frozen layer, an idle expert)."""
        alarm = (out["code"] == NONFINITE) & (self.action == "raise")
        kind = torch.where(alarm, 1, torch.where(out["too_many"], 2, 0))
        if self._alarm is None or self._alarm.device != norms.device:
            self._place(norms.device)
        first = (self._alarm[0] == 0) & (kind != 0)
        bad = ~torch.isfinite(norms)
        everyone = self._params()
        if len(everyone) != len(norms):  # some have no gradient: place the flags among all
            flags, none = iter(bad.unbind()), torch.zeros((), dtype=torch.bool, device=norms.device)
            bad = torch.stack([next(flags) if p.grad is not None else none for p in everyone])
        row = torch.stack([kind, self.decider.arrays(ops_on(norms.device))["steps"],
                           torch.argmax(bad.to(torch.int64))])
        self._alarm.copy_(torch.where(first, row, self._alarm))

    def check(self) -> None:
        """Raise the first error a step without host reads (``sync=False``) has recorded, if any.

        Reads three integers. Called every ``check_every`` steps and at the first read of a
        :class:`GuardResult` field; call it yourself, e.g. at a logging step.
        """
        self._unchecked = 0
        if self._alarm is None:
            return
        kind, step, index = (int(v) for v in self._alarm.tolist())
        if kind == 0:
            return
        self._alarm.zero_()
        if kind == 1:
            params = self._params()
            where = repr(self._names_of([params[index]])[0]) if index < len(params) else f"number {index}"
            raise NonFiniteGradientError(f"non-finite gradient at step {step}: first in parameter {where} "
                                         "(action='raise'; the step was not taken)")
        limit = self.decider.max_consecutive_skips
        raise TooManySkipsError(f"skipped {limit} consecutive steps (the last at step {step}); "
                                f"max_consecutive_skips={limit}. Lower the learning rate or inspect the data.")

    def _state(self, params) -> tuple[list, list]:
        """What ``optimizer.step()`` changes: the parameters and their state tensors; and the
        state's other entries (``(state, key, value)``), kept on the host."""
        tensors, others = list(params), []
        for p in params:
            state = self.optimizer.state.get(p)
            for k, v in (state or {}).items():
                if isinstance(v, torch.Tensor):
                    tensors.append(v)
                else:
                    others.append((state, k, v))
        return tensors, others

    def _step_or_undo(self, code, params) -> None:
        """``optimizer.step()``, undone on the device where ``code`` says skip (no read).

        The copies are allocated once and refilled every step. State the optimizer creates in
        this step, or keeps on the host, costs one read of the decision (see the module's notes)."""
        tensors, others = self._state(params)
        state = self.optimizer.state
        sizes = [len(state[p]) if p in state else -1 for p in params]
        key = tuple(id(t) for t in tensors)
        if self._copies is None or self._copies[0] != key:
            self._copies = (key, [torch.empty_like(local(t)) for t in tensors])
        copies = self._copies[1]
        torch._foreach_copy_(copies, [local(t) for t in tensors])
        self.optimizer.step()
        take = (code == OK) | (code == ZEROED)
        on = {take.device: take}
        for t, copy in zip(tensors, copies):
            t = local(t)
            if t.device not in on:  # host state next to device gradients: the decision must come over
                on[t.device] = take.to(t.device)
            torch.where(on[t.device], t, copy, out=t)  # in place: no temporary the size of the model
        grown = [(p, n) for p, n in zip(params, sizes) if (len(state[p]) if p in state else -1) != n]
        changed = [(held, k, v) for held, k, v in others if held.get(k) is not v]
        if (grown or changed) and not bool(take):  # the one read, on a step that made state
            for held, k, v in changed:
                held[k] = v
            for p, n in grown:
                if n < 0:
                    del state[p]
                else:
                    for k in list(state[p])[n:]:  # the entries it added last
                        del state[p][k]

    def _finish(self, verdict, scaler, overflowed: bool) -> None:
        """Step or not; leave the scaler as ``scaler.step(); scaler.update()`` would, or untouched on a skip."""
        stepped = verdict in (OK, ZEROED)
        if scaler is None:
            if stepped:
                self.optimizer.step()
        elif overflowed:  # unscale_ found inf/nan: the scaler lowers its scale, as in the plain loop
            if stepped:
                self.optimizer.step()  # action "zero": the entries were zeroed; scaler.step would skip
            else:
                scaler.step(self.optimizer)  # skips the step
            scaler.update()
        elif stepped:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            # A skip that is no overflow (a spike) or an error: end the scaler's step, keep its scale.
            scaler.update(scaler.get_scale())
        if self.monitor is not None:
            self.monitor.after_step()
