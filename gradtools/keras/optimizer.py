"""``GradOptimizer``: gradient statistics, clipping policies, a guard and accumulation for any Keras optimizer.

Wrap any Keras 3 optimizer and train with plain ``model.fit()``: no custom
``train_step``. Inside the compiled train step, at every optimizer step, the
wrapper

1. measures the global and per-variable gradient norms and the non-finite
   entries per variable (in the graph);
2. asks the same framework-free objects as ``gradtools.torch`` what to do: a
   :class:`gradtools.guard.StepDecider` (skip, raise, or zero; spike detection)
   and a clipping policy from :mod:`gradtools.policies` (fixed, AutoClip,
   ZClip). They are called once per step through ``tf.py_function``, so the
   maths exists once and both frameworks take identical decisions;
3. clips to the policy's global-norm threshold (like ``torch.nn.utils.clip_grad_norm_``)
   and, optionally, unit-wise (AGC);
4. applies the inner optimizer, or skips inside ``ops.cond``: on a skipped step
   neither the weights nor the inner optimizer's variables (moments, iteration
   counter) change.

With ``action="raise"`` (or after too many skips) training stops before the
update. Inside ``fit()`` the error crosses the graph, so it reaches the caller as
a ``tf.errors.UnknownError`` carrying the guard's message; the original
``NonFiniteGradientError`` / ``TooManySkipsError`` is kept in ``last_error``.

The statistics live in the wrapper's variables; :class:`GradientLogger` puts
them into the batch and epoch ``logs`` (so ``History``, ``CSVLogger`` and
TensorBoard see them) and, through an in-graph buffer written once per step,
into a per-step history without a host transfer per batch.

Accumulation (``accumulation_steps``) happens in the wrapper: micro-batch
gradients are averaged, and everything above runs once per window, on the
accumulated gradient. The inner optimizer's ``iterations`` therefore counts
optimizer steps, so a learning-rate schedule (warm-up!) sees the right step,
unlike Keras' own ``gradient_accumulation_steps``, whose schedules count
micro-batches (see :func:`accumulation_aware`). The optimizer never sees batch
sizes, so every micro-batch weighs the same: a smaller last batch (a dataset
size that is not a multiple of the batch size) counts as much as a full one.
A partial window at an epoch's end carries over into the next epoch, unless
:meth:`GradOptimizer.flush` applies it.

Requirements: a non-XLA train function (``jit_compile=False``; automatic when
``gradtools.runtime.setup`` turned on determinism). The policy's and the guard's
running state (AutoClip history, ZClip statistics, spike window, skip counters)
is written into ``.keras`` and ``.weights.h5`` files with the optimizer's
variables, so a resumed run takes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np

from gradtools import _checks
from gradtools.guard import NonFiniteGradientError, StepDecider, TooManySkipsError
from gradtools.policies import Policy, SpikeDetector, get_policy
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

__all__ = ["GradOptimizer", "accumulation_aware"]

# The global statistics, in the order of fit()'s logs and of the recording buffer's first columns.
GLOBAL_KEYS = ("grad_norm", "grad_norm_clipped", "grad_norm_mean", "grad_norm_clipped_mean", "clip_threshold",
               "skipped_steps", "nonfinite")


def _policy_config(policy):
    if policy is None or isinstance(policy, (int, float, str)):
        return policy
    if isinstance(policy, Policy):
        return {"type": type(policy).__name__, "config": policy.get_config()}
    raise TypeError(f"clip must be None, a positive number, 'autoclip', 'zclip' or a Policy, got {policy!r}")


def _policy_from_config(config):
    if isinstance(config, dict):
        from gradtools import policies

        cls = getattr(policies, config["type"])
        return cls.from_config(config["config"])
    return config


@keras.saving.register_keras_serializable(package="gradtools")
class GradOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras optimizer with gradient statistics, clipping, a guard and accumulation.

    Args:
        inner_optimizer (keras.optimizers.Optimizer): the optimizer that updates the weights.
        clip: None (no clipping), a positive number (fixed global-norm threshold),
            ``"autoclip"``, ``"zclip"``, or a :mod:`gradtools.policies` policy.
        agc (float or None): AGC clip factor (unit-wise clipping, Brock et al. 2021), default None.
        agc_eps (float): AGC floor on weight norms, default 1e-3.
        action (str): on a non-finite gradient: ``"skip"`` (default), ``"raise"`` or ``"zero"``.
        spike (SpikeDetector or None): also skip steps whose global norm is a spike.
        max_consecutive_skips (int): stop training with an error after this many skips in a row.
        accumulation_steps (int): micro-batches per optimizer step, default 1.

    Example:
        >>> import keras, gradtools.keras as gk
        >>> opt = gk.GradOptimizer(keras.optimizers.Adam(1e-3), clip="zclip")
        >>> opt.inner_optimizer.__class__.__name__
        'Adam'
    """

    def __init__(self, inner_optimizer, clip=None, agc=None, agc_eps=1e-3, action="skip", spike=None,
                 max_consecutive_skips=10, accumulation_steps=1, name=None, **kwargs):
        if kwargs:
            raise ValueError(f"GradOptimizer does not take {sorted(kwargs)}: set them on the inner_optimizer")
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"inner_optimizer must be a keras.optimizers.Optimizer, got "
                            f"{type(inner_optimizer).__name__}")
        if getattr(inner_optimizer, "gradient_accumulation_steps", None):
            raise ValueError("inner_optimizer has gradient_accumulation_steps set: use "
                             "GradOptimizer(accumulation_steps=...) instead, so that clipping, statistics and "
                             "learning-rate schedules see whole optimizer steps")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.clip = _policy_config(clip)
        self.policy = None if clip is None else get_policy(clip)
        self.agc = None if agc is None else _checks.positive("agc", agc)
        self.agc_eps = _checks.positive("agc_eps", agc_eps)
        if isinstance(spike, dict):
            spike = SpikeDetector.from_config(spike)
        self.decider = StepDecider(action, spike, max_consecutive_skips, self.policy, kind="variable")
        self.accumulation_steps = _checks.integer("accumulation_steps", accumulation_steps, minimum=1)
        self._var_names: list[str] = []
        #: The guard's last error (NonFiniteGradientError or TooManySkipsError) as Python raised it;
        #: inside fit() it reaches the caller wrapped in a tf.errors.UnknownError.
        self.last_error = None

    # ------------------------------------------------------------------ state
    def build(self, var_list):
        self._var_names = [v.path for v in var_list]
        n = len(var_list)
        zeros = keras.initializers.Zeros()
        with keras.name_scope(self.name, caller=self):
            self.norm_before = self.add_variable((), initializer=zeros, dtype="float32", name="grad_norm")
            self.norm_after = self.add_variable((), initializer=zeros, dtype="float32", name="grad_norm_clipped")
            self.threshold = self.add_variable((), initializer=keras.initializers.Constant(math.inf), dtype="float32", name="clip_threshold")
            self.layer_norms = self.add_variable((n,), initializer=zeros, dtype="float32", name="layer_grad_norms")
            self.nonfinite = self.add_variable((n,), initializer=zeros, dtype="float32", name="nonfinite_counts")
            self.skipped = self.add_variable((), initializer=zeros, dtype="float32", name="skipped_steps")
            self.last_skipped = self.add_variable((), initializer=zeros, dtype="float32", name="last_step_skipped")
            self.micro_step = self.add_variable((), initializer=zeros, dtype="int64", name="micro_step")
            # Running sums over the applied steps of the current epoch (reset by GradientStats.reset_state).
            self.sum_norm = self.add_variable((), initializer=zeros, dtype="float32", name="epoch_grad_norm_sum")
            self.sum_norm_after = self.add_variable((), initializer=zeros, dtype="float32", name="epoch_clipped_sum")
            self.applied_count = self.add_variable((), initializer=zeros, dtype="float32", name="epoch_applied_steps")
            # Per-variable sums, reset by GradientLogger at each epoch's start (evaluate() resets metrics
            # before on_epoch_end, so these cannot live with the metric's).
            self.sum_layer_norms = self.add_variable((n,), initializer=zeros, dtype="float32",
                                                     name="epoch_layer_grad_norm_sum")
            self.layer_applied_count = self.add_variable((), initializer=zeros, dtype="float32",
                                                         name="epoch_layer_applied_steps")
            self.accumulators = ([self.add_variable_from_reference(v, name="accumulator") for v in var_list]
                                 if self.accumulation_steps > 1 else [])
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        if hasattr(self, "inner_optimizer"):
            self.inner_optimizer.learning_rate = value

    def _get_current_learning_rate(self):
        return self.inner_optimizer._get_current_learning_rate()

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def variable_names(self) -> list:
        """Keras variable paths, in the order of ``layer_grad_norms`` (e.g. ``"sequential/dense_0/kernel"``)."""
        return list(self._var_names)

    # ------------------------------------------------------------------ statistics
    def statistics(self, per_layer: bool = False) -> dict:
        """The statistics of the last optimizer step as tensors, keyed as in ``fit()``'s logs.

        ``grad_norm`` and ``grad_norm_clipped`` (0 on a skipped step), ``grad_norm_mean`` and
        ``grad_norm_clipped_mean`` (over the epoch's applied steps so far), ``clip_threshold``,
        ``skipped_steps`` (cumulative), ``nonfinite`` and, with ``per_layer``, ``grad_norm/<variable path>``.
        """
        applied = ops.maximum(self.applied_count, 1.0)
        values = (self.norm_before, self.norm_after, self.sum_norm / applied, self.sum_norm_after / applied,
                  self.threshold, self.skipped, ops.sum(self.nonfinite))
        out = {k: tf.convert_to_tensor(v) for k, v in zip(GLOBAL_KEYS, values)}
        if per_layer:
            out.update(zip(self._layer_keys(), ops.unstack(self.layer_norms)))
        return out

    def _layer_keys(self) -> list:
        return [f"grad_norm/{n}" for n in self._var_names]

    def epoch_layer_means(self) -> dict:
        """Mean per-variable gradient norm over the epoch's applied steps so far: ``{path: float}``."""
        applied = max(float(self.layer_applied_count.numpy()), 1.0)
        return dict(zip(self._var_names, (self.sum_layer_norms.numpy() / applied).tolist()))

    def reset_epoch_layer_means(self):
        """Restart the per-variable running means (``GradientLogger`` does it at each epoch's start)."""
        self.sum_layer_norms.assign(ops.zeros_like(self.sum_layer_norms))
        self.layer_applied_count.assign(0.0)

    def start_recording(self, capacity: int, per_layer: bool = True) -> bool:
        """Record every optimizer step's statistics into a buffer inside the graph.

        One row per step, written by the train step itself, so recording needs no
        per-batch host transfer; :meth:`read_recording` fetches the rows at once.
        The buffer is a ring of ``capacity`` rows and is not saved with the model.
        Returns True when the train function must be traced again (new buffer).
        """
        capacity = _checks.integer("capacity", capacity, minimum=1)
        if not self.built:
            raise RuntimeError("start_recording needs a built optimizer: call optimizer.build(model.trainable_variables)")
        current = getattr(self, "_recorder", None)
        if current is not None and current["capacity"] >= capacity and current["per_layer"] == per_layer:
            current["count"].assign(0)
            return False
        width = len(GLOBAL_KEYS) + (len(self._var_names) if per_layer else 0)
        # Plain tf.Variables: outside self.variables, so never written into .keras files.
        self._recorder = {"buffer": tf.Variable(tf.zeros((capacity, width)), trainable=False, name="gradtools_record"),
                          "count": tf.Variable(0, dtype=tf.int64, trainable=False, name="gradtools_record_count"),
                          "capacity": capacity, "per_layer": per_layer}
        return True

    def stop_recording(self) -> bool:
        """Stop writing rows; returns True when the train function must be traced again."""
        had = getattr(self, "_recorder", None) is not None
        self._recorder = None
        return had

    def read_recording(self) -> tuple[dict, int]:
        """The rows recorded since the last read, oldest first, as ``{key: [floats]}``; and how many were lost.

        Rows are lost only when more steps ran than the buffer holds between two reads.
        """
        rec = getattr(self, "_recorder", None)
        if rec is None:
            return {}, 0
        count = int(rec["count"].numpy())
        cap = rec["capacity"]
        rows = rec["buffer"].numpy()
        if count > cap:
            start = count % cap
            rows = np.concatenate([rows[start:], rows[:start]])
        else:
            rows = rows[:count]
        rec["count"].assign(0)
        names = list(GLOBAL_KEYS) + (self._layer_keys() if rec["per_layer"] else [])
        return {name: rows[:, j].tolist() for j, name in enumerate(names)}, max(count - cap, 0)

    def _record_step(self):
        rec = getattr(self, "_recorder", None)
        if rec is None:
            return
        stats = self.statistics(per_layer=False)
        head = ops.stack([stats[k] for k in GLOBAL_KEYS])
        row = ops.concatenate([head, self.layer_norms]) if rec["per_layer"] else head
        index = rec["count"] % rec["capacity"]
        rec["buffer"].scatter_nd_update(ops.reshape(index, (1, 1)), ops.expand_dims(row, 0))
        rec["count"].assign_add(1)

    # ------------------------------------------------------------------ saving
    _STATE_KEY = "gradtools_state"

    def save_own_variables(self, store):
        """Variables as Keras saves them, plus the guard's and policy's running state (JSON, as bytes)."""
        super().save_own_variables(store)
        state = json.dumps(self.decider.state_dict()).encode()
        store[self._STATE_KEY] = np.frombuffer(state, dtype=np.uint8)

    def load_own_variables(self, store):
        keys = [k for k in store.keys() if k != self._STATE_KEY]
        if len(keys) != len(self.variables):
            warnings.warn(f"Skipping variable loading for optimizer {self.name!r}: it has {len(self.variables)} "
                          f"variables, the saved one {len(keys)}", stacklevel=2)
            return
        for i, variable in enumerate(self.variables):
            variable.assign(store[str(i)])
        if self._STATE_KEY in store.keys():  # absent in files that an older gradtools wrote
            raw = np.asarray(store[self._STATE_KEY], dtype=np.uint8).tobytes()
            self.decider.load_state_dict(json.loads(raw.decode()))

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        spike = self.decider.spike
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "clip": self.clip,
            "agc": self.agc,
            "agc_eps": self.agc_eps,
            "action": self.decider.action,
            "spike": None if spike is None else spike.get_config(),
            "max_consecutive_skips": self.decider.max_consecutive_skips,
            "accumulation_steps": self.accumulation_steps,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        config["clip"] = _policy_from_config(config.get("clip"))
        return cls(inner, **config)

    # ------------------------------------------------------------------ the step
    def _decide(self, total, counts):
        """Host side, once per optimizer step: the shared guard and policy."""
        counts = np.asarray(counts)
        bad = np.flatnonzero(counts)
        first = self._var_names[bad[0]] if len(bad) else None
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
    def _norms(grads):
        # One fused op per variable (L2Loss = sum(g**2) / 2), then one sqrt: on CPU each graph op costs
        # ~10 us, so this halves the cost of the usual square-then-sum.
        squares = 2.0 * ops.stack([tf.nn.l2_loss(g if g.dtype == "float32" else ops.cast(g, "float32"))
                                   for g in grads])
        return ops.sqrt(squares), ops.sqrt(ops.sum(squares))

    @staticmethod
    def _counts(grads, total):
        # A finite global norm proves every entry finite: count only when it is not.
        def count():
            return ops.stack([ops.sum(ops.cast(ops.logical_not(ops.isfinite(g)), "float32")) for g in grads])

        return tf.cond(tf.math.is_finite(total), lambda: tf.zeros([len(grads)], tf.float32), count)

    def _agc(self, grads, variables):
        out = []
        for g, v in zip(grads, variables):
            w = ops.cast(v, g.dtype)
            if len(g.shape) <= 1:
                axes, keep = None, False
            else:  # Keras kernels are (..., fan_in, fan_out): one unit per output column
                axes, keep = tuple(range(len(g.shape) - 1)), True
            w_norm = ops.maximum(ops.sqrt(ops.sum(ops.square(w), axis=axes, keepdims=keep)), self.agc_eps)
            g_norm = ops.maximum(ops.sqrt(ops.sum(ops.square(g), axis=axes, keepdims=keep)), 1e-6)
            out.append(g * ops.minimum(1.0, self.agc * w_norm / g_norm))
        return out

    def _apply_window(self, grads, trainable_variables):
        norms, total = self._norms(grads)
        counts = self._counts(grads, total)
        self.norm_before.assign(total)
        self.layer_norms.assign(norms)
        self.nonfinite.assign(counts)
        threshold, verdict = tf.py_function(self._decide, [total, counts], [tf.float32, tf.int32])
        threshold.set_shape(())
        verdict.set_shape(())

        def zero_then_decide():
            zeroed = [ops.where(ops.isfinite(g), g, ops.zeros_like(g)) for g in grads]
            _, t = self._norms(zeroed)
            thr, ok = tf.py_function(self._after_zeroing, [t], [tf.float32, tf.int32])
            thr.set_shape(())
            ok.set_shape(())
            return zeroed, thr, ok, t

        if self.decider.action == "zero":
            grads, threshold, verdict, total = tf.cond(verdict == 2, zero_then_decide,
                                                       lambda: (list(grads), threshold, verdict, total))
        self.threshold.assign(threshold)

        def step():
            if self.policy is None:
                clipped, after = grads, total  # no threshold: nothing to rescale
            else:
                coef = ops.minimum(1.0, threshold / (total + 1e-6))
                clipped = [g * ops.cast(coef, g.dtype) for g in grads]
                after = total * coef  # the norm scales linearly: no second pass
            if self.agc is not None:
                clipped = self._agc(clipped, trainable_variables)
                after = self._norms(clipped)[1]
            self.norm_after.assign(after)
            self.sum_norm.assign_add(ops.where(ops.isfinite(total), total, 0.0))
            self.applied_count.assign_add(1.0)
            self.sum_layer_norms.assign_add(ops.where(ops.isfinite(norms), norms, 0.0))
            self.layer_applied_count.assign_add(1.0)
            self.sum_norm_after.assign_add(after)
            self.last_skipped.assign(0.0)
            self.inner_optimizer.apply(clipped, trainable_variables)
            return tf.constant(True)

        def skip():
            self.norm_after.assign(0.0)
            self.last_skipped.assign(1.0)
            self.skipped.assign_add(1.0)
            return tf.constant(False)

        applied = tf.cond(verdict == 1, step, skip)
        self._record_step()
        return applied

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        grads = list(grads)
        if self.accumulation_steps == 1:
            self._apply_window(grads, trainable_variables)
            return
        for acc, g in zip(self.accumulators, grads):
            acc.assign_add(ops.cast(g, acc.dtype))
        self.micro_step.assign_add(1)

        def boundary():
            averaged = [acc / float(self.accumulation_steps) for acc in self.accumulators]
            self._apply_window(averaged, trainable_variables)
            for acc in self.accumulators:
                acc.assign(ops.zeros_like(acc))
            return tf.constant(True)

        tf.cond(self.micro_step % self.accumulation_steps == 0, boundary, lambda: tf.constant(False))

    def flush(self) -> bool:
        """Apply a partial accumulation window now (eagerly), e.g. at an epoch's end.

        The window's gradient is the mean over the micro-batches it holds, so the
        step equals one on their concatenation when they have the same size. Returns
        True if a step was taken (or skipped by the guard), False if the window was empty.
        Without it, a partial window carries over into the next epoch's first window::

            keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: opt.flush())
        """
        if self.accumulation_steps == 1 or not self.built:
            return False
        held = int(self.micro_step.numpy()) % self.accumulation_steps
        if held == 0:
            return False
        averaged = [ops.convert_to_tensor(acc) / float(held) for acc in self.accumulators]
        self._apply_window(averaged, list(self._trainable_variables))
        for acc in self.accumulators:
            acc.assign(ops.zeros_like(acc))
        self.micro_step.assign_add(self.accumulation_steps - held)
        return True

    def apply_gradients(self, grads_and_vars):
        grads, variables = zip(*grads_and_vars)
        self.apply(list(grads), list(variables))
        return self.iterations


class _AccumulationAware(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, schedule, steps):
        self.schedule = schedule
        self.steps = steps

    def __call__(self, step):
        return self.schedule(step // self.steps)

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "steps": self.steps}


def accumulation_aware(schedule, accumulation_steps: int):
    """Make a schedule count optimizer steps under Keras' own ``gradient_accumulation_steps``.

    Keras increments ``optimizer.iterations`` on every micro-batch, so a schedule
    with a 100-step warm-up finishes it after 100 / k real updates. This wrapper
    evaluates ``schedule(iterations // k)`` instead. Not needed with
    :class:`GradOptimizer`'s own ``accumulation_steps``.
    """
    accumulation_steps = _checks.integer("accumulation_steps", accumulation_steps, minimum=1)
    if not callable(schedule):
        raise TypeError(f"schedule must be a LearningRateSchedule or callable, got {type(schedule).__name__}")
    return _AccumulationAware(schedule, accumulation_steps)
