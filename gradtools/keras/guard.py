"""The guard for Keras 3: skip, raise or zero on a bad gradient, inside the graph.

The twin of :mod:`gradtools.torch.guard`. The decision is the same Python object
as in PyTorch, a :class:`gradtools.guard.StepDecider` fed the clipper's policy:
:meth:`GradGuard.check` measures the gradients in the graph and calls the
decider once per step through ``tf.py_function``, so both frameworks take
identical decisions on the same norms. A skipped step runs inside ``tf.cond``:
neither the weights nor the optimizer's variables (moments, iteration count)
change. :class:`gradtools.keras.GradOptimizer` uses a guard inside ``fit()``;
:meth:`GradGuard.apply` does the same in a custom training loop.

Running Python once per step means the step cannot be XLA-compiled: compile the
model with ``jit_compile=False`` (``GradGuard`` raises a clear error otherwise).
With ``action="raise"`` (or after too many skips) training stops before the
update; inside ``fit()`` the error reaches the caller as a
``tf.errors.UnknownError`` carrying the guard's message, and the original
``NonFiniteGradientError`` / ``TooManySkipsError`` is kept in ``last_error``.

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

from gradtools.guard import GuardBase, NonFiniteGradientError, TooManySkipsError
from gradtools.keras.clip import clip_grads_with_norm
from gradtools.keras.norms import _check_grads, _norms, _path, _zero_nonfinite, count_nonfinite_entries
from gradtools.policies import SpikeDetector
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

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

    # ------------------------------------------------------------------ host side, once per step
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

    # ------------------------------------------------------------------ in the graph
    def check(self, grads, names=None) -> GuardCheck:
        """Measure ``grads`` and decide, once, through the shared decider.

        ``names`` (variable paths) name the culprit in errors. Works eagerly and in a
        ``tf.function``, but not under XLA.
        """
        if in_xla_context():
            raise ValueError("the gradtools guard and clipping policies run on the host once per step, which XLA "
                             "cannot compile: use model.compile(..., jit_compile=False) (or tf.function without "
                             "jit_compile)")
        if names is not None:
            self._names = list(names)
        grads = _check_grads(grads)
        norms, total = _norms(grads, self.norm_type)
        # A finite global norm proves every entry finite: count only when it is not.
        counts = tf.cond(tf.math.is_finite(total), lambda: tf.zeros([len(grads)], tf.int64),
                         lambda: count_nonfinite_entries(grads))
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

    def clip(self, check: GuardCheck):
        """The checked gradients clipped to the decider's threshold, and their norm after."""
        total = check.checked_total
        if self.clipper is None:
            return check.grads, total
        after = total * tf.minimum(1.0, check.threshold / (total + 1e-6))  # the norm scales linearly
        return clip_grads_with_norm(check.grads, check.threshold, total), after

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
