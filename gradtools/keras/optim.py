"""Optimisers for Keras under the shared settings; update sizes; a traced training run.

The twins of :mod:`gradtools.torch.optim`: :func:`make_optimizer` gives the
update rule ``gradtools.torch.make_optimizer`` gives under the same name,
:func:`update_sizes` and :func:`train` measure the same quantities.
"""

from __future__ import annotations

import math

import numpy as np

from gradtools import _checks
from gradtools.keras.clip import Clipper, adaptive_clip_grad, clip_grads_with_norm
from gradtools.keras.models import _as_inputs, _as_targets, _loss, regularization
from gradtools.keras.norms import get_total_norm
from gradtools.optim import TrainTrace, check_clipping, check_run, settings
from gradtools.policies import FixedThreshold
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["make_optimizer", "update_sizes", "train"]


def make_optimizer(name: str, lr, **overrides):
    """A Keras optimiser by name, with the book's shared settings (see :mod:`gradtools.optim`).

    Args:
        name (str): ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adagrad"``,
            ``"rmsprop"``, ``"adam"``, ``"adamw"`` or ``"nadam"``.
        lr (float or LearningRateSchedule): the learning rate.
        **overrides: settings to change, named as in ``gradtools.optim.SETTINGS``.

    Example:
        >>> import gradtools.keras as gk
        >>> opt = gk.make_optimizer("rmsprop", 0.01)
        >>> opt.rho, opt.epsilon == 1e-8 ** 2  # epsilon inside the root: eps ** 2
        (0.99, True)
    """
    s = settings(name, overrides)
    if not callable(lr):
        lr = _checks.positive("lr", lr)
    opts = keras.optimizers
    if name in ("sgd", "momentum", "nesterov"):
        return opts.SGD(lr, momentum=s.get("momentum", 0.0), nesterov=name == "nesterov")
    if name == "adagrad":
        # Keras divides by sqrt(v + epsilon), PyTorch by sqrt(v) + eps: eps ** 2 inside the
        # root keeps the two within a factor sqrt(2) of each other when sqrt(v) is near eps,
        # and equal elsewhere.
        return opts.Adagrad(lr, initial_accumulator_value=s["initial_accumulator_value"], epsilon=s["eps"] ** 2)
    if name == "rmsprop":
        return opts.RMSprop(lr, rho=s["rho"], epsilon=s["eps"] ** 2)
    kwargs = {"beta_1": s["beta_1"], "beta_2": s["beta_2"], "epsilon": s["eps"]}
    if name == "adam":
        return opts.Adam(lr, **kwargs)
    if name == "adamw":
        return opts.AdamW(lr, weight_decay=s["weight_decay"], **kwargs)
    if s["momentum_decay"] != 1.0:
        raise ValueError(f"Keras' Nadam ramps its momentum as 0.96**t (momentum_decay 1.0) and has no "
                         f"setting for it, got momentum_decay={s['momentum_decay']!r}")
    return opts.Nadam(lr, **kwargs)


def update_sizes(name: str, grads, lr: float = 0.01, normalize: bool = False, **overrides) -> np.ndarray:
    """``||Δw||`` at each step when optimiser ``name`` is fed ``grads`` (shape (steps, dim)).

    The twin of ``gradtools.torch.update_sizes``; the steps run in one ``tf.function``.
    """
    grads = np.asarray(grads, dtype=np.float64)  # float64, as in PyTorch's twin
    if grads.ndim != 2:
        raise ValueError(f"grads must have shape (steps, dim), got {grads.shape}")
    w = tf.Variable(tf.zeros(grads.shape[1], dtype=tf.float64))
    opt = make_optimizer(name, lr, **overrides)
    opt.build([w])

    @tf.function
    def run(gs):
        sizes = tf.TensorArray(tf.float64, size=gs.shape[0])
        for i in tf.range(gs.shape[0]):
            g = gs[i] / tf.norm(gs[i]) if normalize else gs[i]
            before = tf.identity(w)
            opt.apply([g], [w])
            sizes = sizes.write(i, tf.norm(w - before))
        return sizes.stack()

    return run(tf.constant(grads)).numpy()


def train(model, optimizer, x, y, steps: int, loss: str = "mse", spike_at: int | None = None,
          spike_factor: float = 1000.0, normalize: bool = False, l1: float = 0.0, l2: float = 0.0,
          clip=None, agc: float | None = None) -> TrainTrace:
    """Full-batch training, step by step, with an optional gradient spike: the twin of ``gradtools.torch.train``.

    Unlike ``gradtools.torch.train`` there is no ``scheduler`` argument: a
    learning-rate schedule goes into the optimizer (``learning_rate=schedule``),
    the Keras way; each step's rate is read from it. The step is one compiled
    ``tf.function``; the spike factor is passed in as a tensor, so the spike
    step runs the same graph. An unbuilt model is built on ``x``; variables the
    loss does not reach get no gradient and are left out, as in ``fit()``. The
    loss is not scaled, so a ``LossScaleOptimizer`` is refused: pass the
    optimizer it wraps. As in ``fit()``, ``model.losses`` (kernel regularizers)
    join the loss; ``l1``/``l2`` add :func:`gradtools.keras.weight_penalty`, as
    in ``gradtools.torch.train``. ``clip`` (a threshold, a policy name or a
    :mod:`gradtools.policies` policy, whose state advances with the run) clips
    the global norm with a :class:`~gradtools.keras.Clipper` and ``agc`` then
    clips unit-wise (:func:`~gradtools.keras.adaptive_clip_grad`), as in
    ``gradtools.torch.train``. A fixed threshold and AGC clip inside the step's
    graph; an adaptive policy (AutoClip, ZClip) needs each step's norm on the
    host, so the step is then two graphs with the clipping run eagerly between
    them.

    Returns:
        :class:`gradtools.optim.TrainTrace`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"optimizer must be a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise TypeError("train does not scale the loss: pass the optimizer a LossScaleOptimizer wraps "
                        "(optimizer.inner_optimizer), not the wrapper")
    steps, spike_at, spike_factor = check_run(steps, spike_at, spike_factor)
    l1, l2 = _checks.non_negative("l1", l1), _checks.non_negative("l2", l2)
    policy, agc = check_clipping(clip, agc, normalize)
    fn = _loss(loss)
    xt, yt = _as_inputs(model, x), _as_targets(model, y)
    if not model.built:
        model(xt)
    variables = model.trainable_variables
    if not variables:
        raise ValueError("model has no trainable variables")
    optimizer.build(variables)

    used = []  # the indices of the variables the loss reaches, found when the gradient is traced

    def gradients(factor):
        with tf.GradientTape() as tape:
            value = fn(yt, model(xt, training=True))
            value = value + regularization(model, l1, l2, dtype=value.dtype)
        raw = tape.gradient(value, variables)
        used[:] = [i for i, g in enumerate(raw) if g is not None]
        if not used:
            raise ValueError("the loss reaches none of the model's trainable variables")
        grads = [raw[i] * tf.cast(factor, raw[i].dtype) for i in used]
        norm = get_total_norm(grads)
        if normalize:
            grads = [g / tf.cast(norm, g.dtype) for g in grads]
        return value, grads, norm

    def apply(grads):
        vs = [variables[i] for i in used]
        before = [tf.identity(v) for v in vs]
        weight_norm = get_total_norm([tf.identity(v) for v in variables])  # all of them, as in PyTorch
        lr = tf.identity(optimizer.learning_rate)
        optimizer.apply(grads, vs)
        update = get_total_norm([v - b for v, b in zip(vs, before)])
        return update, lr, weight_norm

    factors = [tf.constant(spike_factor if s == spike_at else 1.0) for s in range(steps)]
    if policy is None or type(policy) is FixedThreshold:
        # No policy to ask, or a constant one (not a subclass, whose step() may vary): in the one graph.
        @tf.function
        def step(factor):
            value, grads, norm = gradients(factor)
            clipped = tf.constant(False)
            if policy is not None:
                grads = clip_grads_with_norm(grads, policy.max_norm, norm)
                clipped = tf.cast(norm, tf.float64) > policy.max_norm  # as float(norm) > threshold
            if agc is not None:
                grads, count = adaptive_clip_grad(grads, [variables[i] for i in used], agc)
                clipped = tf.logical_or(clipped, count > 0)
            return (value, norm, *apply(grads)), clipped

        rows, flags = zip(*[step(f) for f in factors])
        trace = TrainTrace.from_rows(rows)
        trace.thresholds = [math.inf if policy is None else policy.step(n) for n in trace.grad_norms]
        trace.clipped = [bool(c) for c in flags]
        return trace
    # An adaptive policy needs each step's norm as a number: two graphs with the clipping between them.
    gradients_fn, apply_fn = tf.function(gradients), tf.function(apply)
    clipper = None if policy is None else Clipper(policy)
    rows, clips = [], []
    for f in factors:
        value, grads, norm = gradients_fn(f)
        threshold, clipped = math.inf, False
        if clipper is not None:
            grads, result = clipper(grads)
            threshold, clipped = result.threshold, float(result.norm_before) > result.threshold
        if agc is not None:
            grads, count = adaptive_clip_grad(grads, [variables[i] for i in used], agc)
            clipped = clipped or int(count) > 0
        rows.append((value, norm, *apply_fn(grads)))
        clips.append((threshold, clipped))
    trace = TrainTrace.from_rows(rows)
    trace.thresholds, trace.clipped = [t for t, _ in clips], [c for _, c in clips]
    return trace
