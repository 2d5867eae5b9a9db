"""Optimisers for Keras under the shared settings; update sizes; a traced training run.

The twins of :mod:`gradtools.torch.optim`: :func:`make_optimizer` gives the
update rule ``gradtools.torch.make_optimizer`` gives under the same name,
:func:`update_sizes` and :func:`train` measure the same quantities.
"""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.keras.models import _as_inputs, _as_targets, _loss, regularization
from gradtools.keras.norms import get_total_norm
from gradtools.optim import TrainTrace, check_run, settings
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
          spike_factor: float = 1000.0, normalize: bool = False, l1: float = 0.0, l2: float = 0.0) -> TrainTrace:
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
    in ``gradtools.torch.train``.

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
    fn = _loss(loss)
    xt, yt = _as_inputs(model, x), _as_targets(model, y)
    if not model.built:
        model(xt)
    variables = model.trainable_variables
    if not variables:
        raise ValueError("model has no trainable variables")
    optimizer.build(variables)

    @tf.function
    def step(factor):
        with tf.GradientTape() as tape:
            value = fn(yt, model(xt, training=True))
            value = value + regularization(model, l1, l2, dtype=value.dtype)
        pairs = [(g, v) for g, v in zip(tape.gradient(value, variables), variables) if g is not None]
        if not pairs:
            raise ValueError("the loss reaches none of the model's trainable variables")
        grads = [g * tf.cast(factor, g.dtype) for g, _ in pairs]
        used = [v for _, v in pairs]
        norm = get_total_norm(grads)
        if normalize:
            grads = [g / tf.cast(norm, g.dtype) for g in grads]
        before = [tf.identity(v) for v in used]
        weight_norm = get_total_norm([tf.identity(v) for v in variables])  # all of them, as in PyTorch
        lr = tf.identity(optimizer.learning_rate)
        optimizer.apply(grads, used)
        update = get_total_norm([v - b for v, b in zip(used, before)])
        return value, norm, update, lr, weight_norm

    rows = [step(tf.constant(spike_factor if s == spike_at else 1.0)) for s in range(steps)]
    return TrainTrace.from_rows(rows)
