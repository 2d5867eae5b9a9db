"""Spike defences for Keras 3: per-tensor clipping, AdaGC, SPAM, and a runner that compares them all.

The twin of :mod:`gradtools.torch.spikes`, with the same names and the same
decisions on the same gradients: the maths is :mod:`gradtools.spikes`', run
here with TensorFlow operations (eagerly, inside a ``tf.function``, or under
XLA). Keras gradients are values, so the clipping functions return the clipped
list where PyTorch's clip in place.

* :func:`clip_grad_norm_per_tensor`: each tensor to a norm of at most
  ``max_norm``, what ``keras.optimizers.Adam(clipnorm=...)`` does;
* :class:`AdaGC`: each tensor against the EMA of its own clipped norms (custom loops);
* :class:`SPAM`: a :class:`~gradtools.keras.GradOptimizer` around ``keras.optimizers.Adam``
  or ``AdamW`` that clips gradient entries against the optimizer's own second moment
  and resets its moments periodically; it trains with ``model.fit()``;
* :func:`compare_defences`: every defence on the same seeded scenarios.
"""

from __future__ import annotations

import time

import numpy as np

from gradtools import _checks
from gradtools import spikes as _spikes
from gradtools.keras._ops import TENSORFLOW
from gradtools.keras.clip import adaptive_clip_grad
from gradtools.keras.norms import _norms
from gradtools.keras.optimizer import GradOptimizer
from gradtools.policies import AutoClip, SpikeDetector, ZClip
from gradtools.runtime import import_keras
from gradtools.spikes import SPAMSchedule, clipnorm_factors, spam_clip

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["clip_grad_norm_per_tensor", "AdaGC", "SPAM", "compare_defences"]


def _dense(grads) -> list:
    if hasattr(grads, "shape"):  # one tensor, not a list of them: iterating would split its rows
        grads = [grads]
    grads = list(grads)
    if not grads or any(g is None for g in grads):
        raise ValueError(f"grads must be a non-empty list of gradient tensors without None, got {len(grads)} "
                         f"entries, {sum(g is None for g in grads)} of them None")
    return [tf.convert_to_tensor(g) for g in grads]


def _norms64(grads) -> tf.Tensor:
    """Per-tensor norms, float64 (the guard's measurement: overflow-safe)."""
    return tf.cast(_norms(grads)[0], tf.float64)


def clip_grad_norm_per_tensor(grads, max_norm: float):
    """Clip each gradient tensor on its own to a norm of at most ``max_norm``: ``(clipped, norms)``.

    ``g_i <- g_i * max_norm / max(||g_i||, max_norm)``, what Keras' ``clipnorm`` does
    (``keras.optimizers.Adam(clipnorm=max_norm)``; the tests train both ways and
    compare), and the same factors as ``gradtools.torch.clip_grad_norm_per_tensor_``.
    A tensor below ``max_norm`` is left exactly as it is. ``norms`` are the norms
    before clipping (float64). Sparse gradients are clipped as dense ones.

    Example:
        >>> import numpy as np
        >>> grads = [np.full((2, 2), 3.0, np.float32), np.full(2, 0.25, np.float32)]
        >>> clipped, norms = clip_grad_norm_per_tensor(grads, 1.0)
        >>> norms.numpy().round(4).tolist()
        [6.0, 0.3536]
        >>> [round(float(tf.norm(g)), 4) for g in clipped]
        [1.0, 0.3536]
    """
    max_norm = _checks.positive("max_norm", max_norm)
    grads = _dense(grads)
    norms = _norms64(grads)
    factors = clipnorm_factors(norms, max_norm, TENSORFLOW)
    return [g * tf.cast(factors[i], g.dtype) for i, g in enumerate(grads)], norms


class AdaGC(_spikes.AdaGCBase):
    """AdaGC (Wang et al. 2025, arXiv 2502.11034): clip each tensor against the EMA of its own clipped norms.

    The rule and its defaults are :class:`gradtools.spikes.AdaGC`'s, run with
    TensorFlow operations on state held in variables (created at the first call, also
    while a ``tf.function`` traces it), so it works eagerly, in a ``tf.function`` and
    under XLA. Call it on every step's gradients, in the same order, before
    ``optimizer.apply``: ``clipped, factors = adagc(grads)``.

    Args:
        policy (gradtools.spikes.AdaGC or None): the state and settings; default a new one
            built from ``**settings``.
        **settings: ``lambda_rel``, ``beta``, ``warmup_steps``, ``lambda_abs``, ``eps``.

    Example:
        >>> import numpy as np
        >>> adagc = AdaGC(warmup_steps=1)
        >>> g = [np.ones((2, 2), np.float32), np.ones(2, np.float32)]
        >>> adagc(g)[1].numpy().tolist()  # the first step sets each tensor's reference
        [1.0, 1.0]
        >>> [round(f, 3) for f in adagc([g[0] * 10, g[1]])[1].numpy().tolist()]
        [0.105, 1.0]
    """

    def __call__(self, grads):
        """``(clipped, factors)`` for this step's gradients; the state moves on."""
        grads = _dense(grads)
        if self.policy._xp is not TENSORFLOW:
            self.policy.resize(len(grads))
        elif self.policy.size != len(grads):
            raise ValueError(f"this AdaGC clips {self.policy.size} tensors, got {len(grads)} gradients: give each "
                             "model an AdaGC of its own")
        state = self.policy.arrays(TENSORFLOW)
        factors, new = self.policy.update(state, _norms64(grads), TENSORFLOW)
        TENSORFLOW.assign(state, new)
        return [g * tf.cast(factors[i], g.dtype) for i, g in enumerate(grads)], factors



@keras.saving.register_keras_serializable(package="gradtools")
class SPAM(GradOptimizer):
    """SPAM (Huang et al. 2025, arXiv 2501.06842) around a ``keras.optimizers.Adam`` or ``AdamW``.

    A :class:`~gradtools.keras.GradOptimizer` (so ``model.fit()``, saving, the guard's
    non-finite skip and XLA all work) whose step follows
    :class:`gradtools.spikes.SPAMSchedule` at applied step ``s`` (the inner optimizer's
    ``iterations + 1``): on a reset step it zeroes the inner optimizer's own moments
    (momentums, velocities, and velocity hats with ``amsgrad``); on a clipping step it
    replaces every gradient entry with ``g**2 > threshold * v`` (``v``: the inner
    optimizer's velocity) by ``sign(g) * sqrt(threshold * v)``; during the warm-up
    after a reset it scales that step's update (``lr``-proportional, weight decay
    included) by the warm-up factor. Decisions are those of ``gradtools.torch.SPAM``.
    The schedule lives in the inner optimizer's ``iterations``, which Keras saves.

    Args:
        inner_optimizer (keras.optimizers.Adam or AdamW): the optimizer whose moments SPAM uses.
        threshold (float): theta, default 5000.
        reset_interval (int): Delta T, steps between momentum resets, default 500.
        warmup_steps (int): learning-rate warm-up after each reset, default 150.
        settle_steps (int): steps after a reset (and at the start) with no clipping, >= 2, default 20.
        **kwargs: :class:`~gradtools.keras.GradOptimizer`'s (``clip``, ``action``, ``spike``, ...).

    Example:
        >>> import keras, numpy as np
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> adam = keras.optimizers.Adam(1e-2)
        >>> opt = SPAM(adam, reset_interval=4, warmup_steps=2, settle_steps=2)
        >>> model.compile(optimizer=opt, loss="mse")
        >>> _ = model.fit(np.ones((16, 3)), np.zeros((16, 1)), batch_size=4, verbose=0)
        >>> int(opt.iterations), opt.resets
        (4, 1)
    """

    def __init__(self, inner_optimizer, threshold: float = 5000.0, reset_interval: int = 500,
                 warmup_steps: int = 150, settle_steps: int = 20, **kwargs):
        if not isinstance(inner_optimizer, keras.optimizers.Adam):
            raise TypeError("inner_optimizer must be a keras.optimizers.Adam or AdamW (SPAM acts on their "
                            f"moments), got {type(inner_optimizer).__name__}")
        schedule = SPAMSchedule(float(_checks.positive("threshold", threshold)), reset_interval, warmup_steps,
                                settle_steps)
        super().__init__(inner_optimizer, **kwargs)
        self.schedule = schedule

    @property
    def resets(self) -> int:
        """Momentum resets so far (from the inner optimizer's step count)."""
        return int(self.inner_optimizer.iterations.numpy()) // self.schedule.reset_interval

    def get_config(self):
        return {**super().get_config(), **self.schedule.get_config()}

    def _inner_apply(self, grads, variables, strategy):
        inner = self.inner_optimizer
        step = tf.cast(tf.convert_to_tensor(inner.iterations), tf.int64) + 1
        reset, clip, factor = self.schedule.at(step, TENSORFLOW)
        index = [inner._get_variable_index(v) for v in variables]
        slots = [inner._momentums, inner._velocities] + ([inner._velocity_hats] if inner.amsgrad else [])

        def zero_moments():
            for kind in slots:
                for i in index:
                    kind[i].assign(tf.zeros_like(kind[i]))
            return tf.constant(True)

        tf.cond(reset, zero_moments, lambda: tf.constant(False))  # a pass over the moments on reset steps only
        clipped = []
        for g, i in zip(grads, index):
            g = tf.convert_to_tensor(g)
            v = tf.cast(tf.convert_to_tensor(inner._velocities[i]), g.dtype)
            clipped.append(tf.where(clip, spam_clip(g, v, self.schedule.threshold, TENSORFLOW)[0], g))
        apply = super()._inner_apply

        def warming():  # the update is linear in the learning rate: scale the step the inner optimizer took
            before = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
            apply(clipped, variables, strategy)
            for v, old in zip(variables, before):
                v.assign(old + tf.cast(factor, old.dtype) * (tf.convert_to_tensor(v) - old))
            return tf.constant(True)

        def plain():  # no copy of the weights outside the warm-up
            apply(clipped, variables, strategy)
            return tf.constant(True)

        tf.cond(factor < 1.0, warming, plain)


# ---------------------------------------------------------------------- the comparison
def _second_moments(adam, variables) -> list:
    return [np.array(adam._velocities[adam._get_variable_index(v)].numpy()) for v in variables]


def _run_one(model_fn, init, batches, loss_fn, steps, lr, settings, defence, scenario, limits):
    model = model_fn()
    x0, _ = _spikes.batch_at(batches, 0)
    if not model.built:
        model(x0[:1])
    model.set_weights(init)
    variables = list(model.trainable_variables)
    if scenario.spike_tensor >= len(variables):
        raise ValueError(f"scenario {scenario.name!r} has spike_tensor={scenario.spike_tensor}, but the model has "
                         f"{len(variables)} trainable tensors")
    own = {"global_norm": {"global_clipnorm": limits.get("global_norm")},
           "clipnorm": {"clipnorm": limits.get("clipnorm")}, "value": {"clipvalue": limits.get("value")}}
    adam = keras.optimizers.Adam(lr, **own.get(defence, {}))
    optimizer, transform = adam, None
    if defence in ("autoclip", "zclip"):
        optimizer = GradOptimizer(adam, clip=AutoClip() if defence == "autoclip"
                                  else ZClip(warmup_steps=settings["zclip_warmup"]))
    elif defence == "zskip":
        optimizer = GradOptimizer(adam, spike=SpikeDetector(window=settings["zskip_window"],
                                                            min_history=settings["zskip_min_history"]),
                                  max_consecutive_skips=steps)
    elif defence == "spam":
        optimizer = SPAM(adam, **settings["spam"].get_config())
    elif defence == "agc":
        transform = lambda grads: adaptive_clip_grad(grads, variables)[0]  # noqa: E731
    elif defence == "adagc":
        adagc = AdaGC(warmup_steps=settings["adagc_warmup"])
        transform = lambda grads: adagc(grads)[0]  # noqa: E731
    optimizer.build(variables)
    k = scenario.spike_tensor
    calibrating = defence == "none" and not scenario.disturbed

    @tf.function
    def train(x, y, spike):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        stats = tf.zeros(3)
        if calibrating:  # the clean run without a defence: the statistics the thresholds come from
            norms, total = _norms(grads)
            stats = tf.stack([total, tf.reduce_max(norms),
                              tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in grads]))])
        grads = [g * spike if i == k else g for i, g in enumerate(grads)]
        if transform is not None:
            grads = transform(grads)
        optimizer.apply(grads, variables)
        return loss, stats

    losses = np.full(steps, np.nan)
    times, stats, lr_now = [], [], lr
    disturbed = scenario.disturbed
    v_before = v_after = None
    for t in range(steps):
        start = time.perf_counter()
        if lr * scenario.lr_at(t) != lr_now:
            lr_now = lr * scenario.lr_at(t)
            adam.learning_rate = lr_now
        x, y = _spikes.batch_at(batches, t)
        c = scenario.corrupt_at(t)
        if disturbed and t == disturbed[0]:
            v_before = _second_moments(adam, variables)
        loss, st = train(x * c if c != 1.0 else x, y, tf.constant(scenario.spike_at(t), tf.float32))
        if c != 1.0:  # the clean batch's loss, eagerly: a few steps, no retracing
            loss = loss_fn(y, model(x, training=False))
        value = float(loss)  # the curve is the point: one read per step, in every run alike
        losses[t] = value
        if disturbed and t == disturbed[-1]:
            v_after = _second_moments(adam, variables)
        times.append(time.perf_counter() - start)
        if not np.isfinite(value):
            break
        if calibrating:
            stats.append(st.numpy())
    skipped = int(optimizer.skipped.numpy()) if isinstance(optimizer, GradOptimizer) else 0
    step_time = float(np.median(times[3:])) if len(times) > 3 else float("nan")
    return _spikes.Run(losses, v_before, v_after, step_time, skipped, np.asarray(stats) if stats else None)


def compare_defences(model_fn, batches, loss_fn, *, steps: int = 200, lr: float = 1e-3, scenarios=None,
                     defences=_spikes.DEFENCES, thresholds=None, seed: int = 0, spike_tensor: int = 0,
                     return_curves: bool = False, progress=None):
    """Train once per defence and scenario from the same weights and batches; judge each run.

    The twin of :func:`gradtools.torch.compare_defences` (same arguments, scenarios,
    defences and records, ``framework="keras"``), with Keras' own options where Keras has
    them: ``global_norm`` is ``Adam(global_clipnorm=...)``, ``clipnorm`` is
    ``Adam(clipnorm=...)``, ``value`` is ``Adam(clipvalue=...)``; ``autoclip``, ``zclip``
    and ``zskip`` run in a :class:`~gradtools.keras.GradOptimizer`, ``spam`` is
    :class:`SPAM`, ``agc`` and ``adagc`` transform the gradients in the step. Each run
    trains in a ``tf.function`` from the weights ``model_fn()`` had under
    ``keras.utils.set_random_seed(seed)``.

    Args:
        model_fn: builds a fresh Keras model.
        batches: ``batches(step) -> (x, y)``, or a sequence of ``(x, y)`` used in turn.
        loss_fn: ``loss_fn(y, outputs) -> scalar`` (Keras' order, e.g. ``keras.losses.mean_squared_error``
            reduced to a mean).
        steps, lr, scenarios, defences, thresholds, seed, spike_tensor, return_curves, progress:
            as in :func:`gradtools.torch.compare_defences`.

    Returns:
        The records of :func:`gradtools.torch.compare_defences` (a pandas DataFrame when pandas
        is installed).
    """
    if isinstance(model_fn, keras.Model):
        raise TypeError(f"model_fn must build a fresh model each call (e.g. lambda: make_model()), got a "
                        f"{type(model_fn).__name__} instance: every run starts from the same weights")
    steps, lr, seed = _spikes.comparison_arguments(model_fn, batches, loss_fn, steps, lr, seed,
                                                   "loss_fn(y, outputs)")
    keras.utils.set_random_seed(seed)
    model = model_fn()
    if not model.built:
        model(_spikes.batch_at(batches, 0)[0][:1])
    init = model.get_weights()
    settings = _spikes.scaled_settings(steps)

    def run_one(defence, scenario, limits):
        return _run_one(model_fn, init, batches, loss_fn, steps, lr, settings, defence, scenario, limits)

    return _spikes.compare(run_one, "keras", steps, scenarios, defences, thresholds, return_curves, spike_tensor,
                           progress)
