"""Sharpness for Keras 3: the top Hessian eigenvalue by power iteration on HVPs.

The twin of :mod:`gradtools.torch.sharpness`, with nested ``GradientTape``
contexts for the Hessian-vector products and the shared
:func:`gradtools.maths.power_iteration`.
"""

from __future__ import annotations

import numpy as np

from gradtools.maths import power_iteration
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["hessian_vector_product", "top_hessian_eigenvalue"]


def hessian_vector_product(loss_fn, variables, vector) -> list:
    """``H v`` for the Hessian of ``loss_fn()`` with respect to ``variables`` (double back-propagation).

    ``loss_fn()`` returns the scalar loss; ``vector`` is a list shaped like ``variables``.
    """
    variables = list(variables)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn()
        # a variable the loss does not use (an auxiliary head), or a loss linear in it: zero rows
        grads = _zeros_for_none(inner.gradient(loss, variables), variables)
        dot = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype)) for g, v in zip(grads, vector)])
    return _zeros_for_none(outer.gradient(dot, variables), variables)


def _zeros_for_none(grads, variables) -> list:
    return [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]


def top_hessian_eigenvalue(model, loss_fn, iters: int = 20, tol: float = 1e-4, seed: int = 0) -> float:
    """Largest-magnitude Hessian eigenvalue of ``loss_fn(model)`` (same as ``gradtools.torch``).

    ``loss_fn(model)`` returns the scalar loss on a fixed batch. Uses nested
    ``GradientTape`` contexts for Hessian-vector products and the shared power iteration.
    """
    if not hasattr(model, "trainable_variables"):
        raise TypeError(f"model must be a Keras model or layer, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    params = list(model.trainable_variables)
    if not params:
        raise ValueError("model has no trainable variables")

    @tf.function
    def hvp(vectors):
        return hessian_vector_product(lambda: loss_fn(model), params, vectors)

    def matvec(vectors):
        return [h.numpy().astype(np.float64) for h in hvp([tf.constant(v, tf.float32) for v in vectors])]

    return power_iteration(matvec, [tuple(p.shape) for p in params], iters, tol, seed)
