"""Per-layer gradient flow of any Keras 3 model: the twin of :mod:`gradtools.torch.flow`.

:func:`layer_gradients` runs one forward and backward pass (``training=True``,
as ``fit()`` does) and returns, for every trainable weight matrix (a variable
with two or more dimensions: Dense and conv kernels, embeddings; biases and norm
scales are left out), the norm of its gradient and of the matrix itself, input
side first. The loss includes ``model.losses`` (kernel regularizers, ``add_loss``),
as in ``fit()``.

Example:
    >>> import numpy as np, gradtools.keras as gk
    >>> from gradtools.models import init_mlp
    >>> model = gk.mlp(init_mlp([4, 8, 8, 2], seed=0))
    >>> x, y = np.ones((16, 4), np.float32), np.zeros((16, 2), np.float32)
    >>> flow = gk.layer_gradients(model, x, y)
    >>> [n.split("/")[-1] for n in flow.names]
    ['dense_0', 'dense_1', 'dense_2']
"""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.keras.models import _as_inputs, _as_targets, _loss, regularization
from gradtools.runtime import import_keras
from gradtools.stats import LayerGradients

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["layer_gradients", "LayerGradients"]


def layer_gradients(model, x, y, loss="mse", l1: float = 0.0, l2: float = 0.0,
                    training: bool = True) -> LayerGradients:
    """Gradient norm of every weight matrix of ``model`` on the batch ``(x, y)``.

    Args:
        model (keras.Model): any model (Sequential, functional, subclassed).
        x, y: the batch; for a model with several inputs, ``x`` is a list or
            dict of arrays, one per input.
        loss: ``"mse"``, ``"crossentropy"`` (integer labels, logits) or a callable
            ``loss(y_true, y_pred)`` (Keras' argument order) returning a scalar.
        l1, l2 (float): add :func:`gradtools.keras.weight_penalty` on top of
            ``model.losses`` (default 0: only the model's own regularizers).
        training (bool): the forward pass's mode, default True as in ``fit()``.

    Returns:
        :class:`gradtools.stats.LayerGradients` (NumPy float64 arrays, input side
        first, named by layer path, norms computed in float64). A kernel the loss
        does not reach gets 0.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    fn = _loss(loss)
    l1, l2 = _checks.non_negative("l1", l1), _checks.non_negative("l2", l2)
    xt, y = _as_inputs(model, x), _as_targets(model, y)
    with tf.GradientTape() as tape:  # watches every trainable variable the call touches, built here or before
        value = fn(y, model(xt, training=training))
        value = value + regularization(model, l1, l2, dtype=value.dtype)
    variables = [v for v in model.trainable_variables if len(v.shape) >= 2]
    if not variables:
        raise ValueError(f"model ({model.name}) has no trainable weight matrices to measure")
    grads = tape.gradient(value, variables)
    # norms in float64: no underflow to 0 for vanishing gradients, no overflow for exploding ones
    g = [0.0 if gr is None else float(tf.norm(tf.cast(gr, tf.float64))) for gr in grads]
    w = [float(tf.norm(tf.cast(v, tf.float64))) for v in variables]
    names = [v.path.rsplit("/", 1)[0] if v.path.endswith(("/kernel", "/embeddings")) else v.path for v in variables]
    return LayerGradients(names, np.array(g), np.array(w), float(value))
