"""The guard for Keras 3: skip, raise or zero on a bad gradient, inside the graph.

The twin of :mod:`gradtools.torch.guard`. The decision is the same Python code
as in PyTorch, :meth:`gradtools.guard.StepDecider.decide_arrays` fed the
clipper's policy, run with TensorFlow operations (:mod:`gradtools.keras._ops`)
inside the train step: both frameworks take identical decisions on the same
norms, nothing is read back to the host, and the step compiles with XLA
(``jit_compile=True``, what Keras picks on a GPU). The decider's, the spike
detector's and the policy's state live in TensorFlow variables from the first
traced step on (eagerly, until then, a guard decides with NumPy). A skipped
step runs inside ``tf.cond``: neither the weights nor the optimizer's variables
(moments, iteration count) change. :class:`gradtools.keras.GradOptimizer` uses
a guard inside ``fit()``; :meth:`GradGuard.apply` does the same in a custom
training loop.

With ``action="raise"`` (or after too many skips) the step is not taken, and:

* eagerly, the error is raised at once;
* in a ``tf.function`` without XLA, it is raised in the graph, through
  ``tf.py_function`` on that path only: inside ``fit()`` it reaches the caller as
  a ``tf.errors.UnknownError`` carrying the guard's message;
* under XLA, which cannot call Python, the step records it on the device and
  :meth:`GradGuard.check_recorded` raises it on the host: ``GradOptimizer``
  does that after each batch of ``fit()`` (see :mod:`gradtools.keras.optimizer`).

The original ``NonFiniteGradientError`` / ``TooManySkipsError`` is kept in
``last_error``. A policy of your own with only ``step()`` runs on the host, through
``tf.py_function``: not under XLA.

Example:
    >>> import keras, numpy as np, gradtools.keras as gk
    >>> w = keras.Variable(np.ones(2, np.float32))
    >>> opt = keras.optimizers.SGD(0.1)
    >>> guard = gk.GradGuard(opt, action="skip")
    >>> bool(guard.apply([np.array([np.nan, 1.0], np.float32)], [w]))
    False
    >>> w.numpy().tolist(), guard.skipped
    ([1.0, 1.0], 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradtools.guard import NONFINITE, GuardBase, NonFiniteGradientError, TooManySkipsError
from gradtools.keras._ops import TENSORFLOW
from gradtools.keras.clip import clip_grads_with_norm
from gradtools.keras.norms import _check_grads, _norms, _path, _zero_nonfinite, count_nonfinite_entries
from gradtools.policies import SpikeDetector
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

# Called from a user's tf.function, AutoGraph would rewrite this code (its loops and ifs are plain
# Python over Python values; the branches on tensors are tf.cond already): run it as written.
_plain_python = tf.autograph.experimental.do_not_convert

__all__ = ["GradGuard", "GuardCheck", "NonFiniteGradientError", "TooManySkipsError", "in_xla_context"]


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (``jit_compile=True``)."""
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - TensorFlow moved its internals
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))


@dataclass
class GuardCheck:
    """What :meth:`GradGuard.check` found: tensors, valid inside the graph.

    ``grads`` (zeroed where non-finite under ``action="zero"``), ``norms`` and ``total``
    (before zeroing), ``nonfinite`` counts per variable, ``threshold`` (the policy's; inf
    without one), ``proceed`` (a boolean tensor) and ``checked_total``, the global norm
    of ``grads`` (``total`` unless entries were zeroed).
    """

    grads: list
    norms: object
    total: object
    nonfinite: object
    threshold: object
    proceed: object
    checked_total: object


class GradGuard(GuardBase):
    """Guard an optimizer step against non-finite or spiking gradients, in the graph.

    Args:
        optimizer (keras.optimizers.Optimizer or None): what :meth:`apply` steps
            (``GradOptimizer`` passes None and applies its inner optimizer itself).
        action (str): on a non-finite gradient: ``"skip"`` (default), ``"raise"`` or
            ``"zero"`` (replace inf/nan entries with 0, then step).
        spike (SpikeDetector or None): also skip steps whose global norm is a spike.
        max_consecutive_skips (int): raise ``TooManySkipsError`` after this many skips
            in a row, default 10.
        clipper (gradtools.keras.clip.Clipper or None): clip after checking; its policy
            is the decider's, as in ``gradtools.torch.GradGuard``.
    """

    def __init__(self, optimizer=None, action: str = "skip", spike: SpikeDetector | None = None,
                 max_consecutive_skips: int = 10, clipper=None):
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"optimizer must be a keras.optimizers.Optimizer or None, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        super().__init__(action, spike, max_consecutive_skips, clipper, kind="variable")
        #: The guard's last error as Python raised it (inside fit() it arrives wrapped).
        self.last_error = None
        self._names: list = []

    # ------------------------------------------------------------------ where the state lives
    @property
    def on_device(self) -> bool:
        """Whether the decision runs as TensorFlow operations (every policy but a host-only one)."""
        policy = self.decider.policy
        return policy is None or policy.on_device()

    @property
    def placed(self) -> bool:
        """Whether the state lives in TensorFlow variables (from the first traced step on)."""
        return self.decider._xp is TENSORFLOW

    @_plain_python
    def place(self) -> None:
        """Move the decision's state into TensorFlow variables, once, eagerly (also while tracing).

        ``GradOptimizer`` calls it when it is built; a guard of a custom loop at its first
        traced step. Then ``state_dict()`` reads the variables and ``load_state_dict()``
        writes into them, so a step traced before a load sees the loaded state.
        """
        if self.placed or not self.on_device:
            return
        self.decider.arrays(TENSORFLOW)
        if self.decider.spike is not None:
            self.decider.spike.arrays(TENSORFLOW)
        if self.decider.policy is not None:
            self.decider.policy.arrays(TENSORFLOW)
        with tf.init_scope():
            # kind (0 none, 1 non-finite, 2 too many skips), step, index, entries, reason, skips in a row
            self._alarm = tf.Variable(tf.zeros([6], tf.int64), trainable=False, name="gradtools_alarm")

    # ------------------------------------------------------------------ raising, on the host
    def _raise_row(self, row):
        """Raise what a recorded decision calls for: ``row`` as :meth:`_alarm_row` makes it."""
        kind, step, index, count, code, consecutive = (int(v) for v in np.asarray(row))
        if kind == 0:
            return np.int64(0)
        first = None
        if kind == 1:
            first = self._names[index] if index < len(self._names) else str(index)
        try:
            self.decider.raise_for(code, kind == 2, first, count if kind == 1 else None, steps=step,
                                   consecutive=consecutive)
        except (NonFiniteGradientError, TooManySkipsError) as exc:
            self.last_error = exc  # fit() re-raises it wrapped in a tf.errors.UnknownError
            raise
        return np.int64(0)  # pragma: no cover - kind 1 or 2 always raises

    def check_recorded(self) -> None:
        """Raise the first error that a step compiled with XLA recorded, if any (reads six integers).

        ``GradOptimizer`` calls it after each batch of ``fit()`` (and :meth:`GradOptimizer.check`);
        call it in a custom loop whose step is XLA-compiled. Without XLA the error was raised
        in the step itself.
        """
        alarm = getattr(self, "_alarm", None)
        if alarm is None:
            return
        row = alarm.numpy()
        if row[0] != 0:
            alarm.assign(tf.zeros_like(alarm))
            self._raise_row(row)

    def _alarm_row(self, out, counts):
        s = self.decider.arrays(TENSORFLOW)  # read after the decision's update
        kind = TENSORFLOW.where((out["code"] == NONFINITE) & (self.action == "raise"), 1,
                                TENSORFLOW.where(out["too_many"], 2, 0))
        return tf.stack([kind, tf.convert_to_tensor(s["steps"]), tf.argmax(counts > 0, output_type=tf.int64),
                         tf.reduce_sum(counts), tf.cast(out["code"], tf.int64),
                         tf.convert_to_tensor(s["consecutive_skips"])])

    def _raise_if_needed(self, out, counts) -> None:
        row = self._alarm_row(out, counts)
        if tf.executing_eagerly():
            self._raise_row(row)
        elif in_xla_context():  # XLA cannot call Python: record the first, for check_recorded()
            alarm = self._alarm
            alarm.assign(tf.where((alarm[0] == 0) & (row[0] != 0), row, alarm))
        else:
            tf.cond(row[0] != 0, lambda: tf.py_function(self._raise_row, [row], tf.int64),
                    lambda: tf.constant(0, tf.int64))

    # ------------------------------------------------------------------ a host-only policy
    def _decide(self, total, counts):
        counts = np.asarray(counts)
        bad = np.flatnonzero(counts)
        first = (self._names[bad[0]] if bad[0] < len(self._names) else str(bad[0])) if len(bad) else None
        try:
            d = self.decider.decide(float(total), first, int(counts.sum()))
        except (NonFiniteGradientError, TooManySkipsError) as exc:
            self.last_error = exc  # fit() re-raises it wrapped in a tf.errors.UnknownError
            raise
        if d.reason == "zero":
            return np.float32(math.inf), np.int32(2)
        return np.float32(d.threshold), np.int32(1 if d.proceed else 0)

    def _after_zeroing(self, total):
        try:
            d = self.decider.after_zeroing(float(total))
        except TooManySkipsError as exc:
            self.last_error = exc
            raise
        return np.float32(d.threshold), np.int32(1 if d.proceed else 0)

    @staticmethod
    def _host(fn, args):
        threshold, verdict = tf.py_function(fn, args, [tf.float32, tf.int32])
        threshold.set_shape(())
        verdict.set_shape(())
        return threshold, verdict

    def _check_on_host(self, grads, norms, total, counts) -> GuardCheck:
        threshold, verdict = self._host(self._decide, [total, counts])
        checked = total
        if self.decider.action == "zero":
            def zero_then_decide():
                zeroed = [_zero_nonfinite(g) for g in grads]
                t = _norms(zeroed, self.norm_type)[1]
                thr, ok = self._host(self._after_zeroing, [t])
                return zeroed, thr, ok, t

            grads, threshold, verdict, checked = tf.cond(verdict == 2, zero_then_decide,
                                                         lambda: (list(grads), threshold, verdict, total))
        return GuardCheck(list(grads), norms, total, counts, threshold, verdict == 1, checked)

    # ------------------------------------------------------------------ in the graph
    @_plain_python
    def check(self, grads, names=None) -> GuardCheck:
        """Measure ``grads`` and decide, once, with the shared decider.

        ``names`` (variable paths) name the culprit in errors. Works eagerly, in a
        ``tf.function`` and under XLA (not with a host-only policy).
        """
        if names is not None:
            self._names = list(names)
        if not self.on_device and in_xla_context():
            raise ValueError(f"the clipping policy {type(self.decider.policy).__name__} has only step(), which runs "
                             "on the host and XLA cannot compile: define init_state() and update() (see "
                             "gradtools.policies), or use model.compile(..., jit_compile=False)")
        grads = _check_grads(grads)
        norms, total = _norms(grads, self.norm_type)
        # A finite global norm proves every entry finite: count only when it is not.
        counts = tf.cond(tf.math.is_finite(total), lambda: tf.zeros([len(grads)], tf.int64),
                         lambda: count_nonfinite_entries(grads))
        if not self.on_device or (tf.executing_eagerly() and not self.placed):
            return self._check_on_host(grads, norms, total, counts)
        self.place()
        nonfinite = tf.reduce_any(counts > 0)
        checked = total
        if self.action == "zero":
            def zeroed():
                z = [_zero_nonfinite(g) for g in grads]
                return z, _norms(z, self.norm_type)[1]

            grads, checked = tf.cond(nonfinite, zeroed, lambda: (list(grads), total))
        xla = in_xla_context()
        out = self.decider.decide_arrays(tf.cast(checked, tf.float64), nonfinite, TENSORFLOW, commit=not xla)
        proceed = tf.convert_to_tensor(out["proceed"])
        if xla:
            # An error recorded and not yet raised (several steps per call: steps_per_execution):
            # the steps after it do nothing, as if the error had stopped them, which it will.
            pending = self._alarm[0] != 0

            def commit():
                out["commit"]()
                return tf.constant(True)

            tf.cond(pending, lambda: tf.constant(False), commit)
            proceed = proceed & ~pending
        self._raise_if_needed(out, counts)
        threshold = tf.cast(out["threshold"], tf.float32)
        return GuardCheck(list(grads), norms, total, counts, threshold, proceed, checked)

    def clip(self, check: GuardCheck):
        """The checked gradients clipped to the decider's threshold, and their norm after."""
        total = check.checked_total
        if self.clipper is None:
            return check.grads, total
        after = total * tf.minimum(1.0, check.threshold / (total + 1e-6))  # the norm scales linearly
        return clip_grads_with_norm(check.grads, check.threshold, total), after

    @_plain_python
    def apply(self, grads, variables):
        """Check, clip and apply with ``self.optimizer``, or skip; returns a boolean tensor (stepped)."""
        if self.optimizer is None:
            raise ValueError("this GradGuard has no optimizer to apply: pass one, GradGuard(optimizer, ...)")
        variables = list(variables)
        c = self.check(grads, [_path(v) for v in variables])

        def step():
            self.optimizer.apply(self.clip(c)[0], variables)
            return tf.constant(True)

        if not self.optimizer.built:
            self.optimizer.build(variables)
        return tf.cond(c.proceed, step, lambda: tf.constant(False))
