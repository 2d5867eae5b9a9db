"""LR range test as a Keras callback, and sharpness by Hessian-vector products.

Both reuse the framework-free parts: :class:`gradtools.lr_range.RangeSweep`
and :func:`gradtools.maths.power_iteration`.
"""

from __future__ import annotations

import numpy as np

from gradtools.lr_range import RangeSweep
from gradtools.maths import power_iteration
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["LRRangeTest", "top_hessian_eigenvalue"]


class LRRangeTest(keras.callbacks.Callback):
    """Sweep the learning rate during ``fit()``, then restore weights and optimizer.

    Run it with enough batches (``epochs * steps_per_epoch >= num_steps``); it
    stops training when the loss diverges or the sweep ends. Afterwards the model
    weights, the optimizer's variables and its learning rate are as before, and
    ``self.result`` holds the curve and the suggested rate.

    Args:
        start_lr, end_lr (float): the sweep's ends, default 1e-7 and 10.
        num_steps (int): steps in the sweep, default 100.
        beta (float): smoothing factor, default 0.9.
        diverge_factor (float): stop when smoothed loss > factor * best, default 4.

    Example:
        >>> import gradtools.keras as gk
        >>> finder = gk.LRRangeTest(start_lr=1e-5, end_lr=1.0, num_steps=50)
    """

    def __init__(self, start_lr=1e-7, end_lr=10.0, num_steps=100, beta=0.9, diverge_factor=4.0):
        super().__init__()
        self.sweep = RangeSweep(start_lr, end_lr, num_steps, beta, diverge_factor)
        self.result = None
        self._step = 0

    def on_train_begin(self, logs=None):
        opt = self.model.optimizer
        if isinstance(opt.learning_rate, keras.optimizers.schedules.LearningRateSchedule) or not hasattr(
                opt.learning_rate, "assign"):
            raise ValueError("LRRangeTest needs an optimizer with a constant learning rate, not a schedule")
        self._weights = [w.numpy().copy() for w in self.model.weights]
        self._lr = float(opt.learning_rate.numpy())
        self._opt_values = None if not opt.built else [v.numpy().copy() for v in opt.variables]

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate.assign(self.sweep.lr(self._step))

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.sweep.record(float(logs["loss"])):
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        opt = self.model.optimizer
        for w, value in zip(self.model.weights, self._weights):
            w.assign(value)
        if self._opt_values is not None:
            for v, value in zip(opt.variables, self._opt_values):
                v.assign(value)
        else:  # built during the sweep: reset its slots to their initial zeros
            for v in opt.variables:
                v.assign(np.zeros(v.shape, dtype=v.dtype))
        opt.learning_rate.assign(self._lr)
        self.result = self.sweep.result()


def top_hessian_eigenvalue(model, loss_fn, iters: int = 20, tol: float = 1e-4, seed: int = 0) -> float:
    """Largest-magnitude Hessian eigenvalue of ``loss_fn(model)`` (same as ``gradtools.torch``).

    ``loss_fn(model)`` returns the scalar loss on a fixed batch. Uses nested
    ``GradientTape`` contexts for Hessian-vector products and the shared power iteration.
    """
    params = list(model.trainable_variables)
    if not params:
        raise ValueError("model has no trainable variables")

    @tf.function
    def hvp(vectors):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn(model)
            grads = inner.gradient(loss, params)
            dot = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype)) for g, v in zip(grads, vectors)])
        return outer.gradient(dot, params)

    def matvec(vectors):
        return [h.numpy().astype(np.float64) for h in hvp([tf.constant(v, tf.float32) for v in vectors])]

    return power_iteration(matvec, [tuple(p.shape) for p in params], iters, tol, seed)
