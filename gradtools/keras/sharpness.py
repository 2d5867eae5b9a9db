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
        grads = inner.gradient(loss, variables)
        dot = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype)) for g, v in zip(grads, vector)])
    return outer.gradient(dot, variables)


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
        return hessian_vector_product(lambda: loss_fn(model), params, vectors)

    def matvec(vectors):
        return [h.numpy().astype(np.float64) for h in hvp([tf.constant(v, tf.float32) for v in vectors])]

    return power_iteration(matvec, [tuple(p.shape) for p in params], iters, tol, seed)
