"""Keras models built from :mod:`gradtools.models` weights, and a full-batch trainer."""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.runtime import import_keras

keras = import_keras()

__all__ = ["mlp", "train_full_batch", "loss_gradients"]

_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "linear": None, "leaky_relu": "leaky_relu"}


def mlp(weights, activation: str = "relu", batchnorm: bool = False, dropout: float = 0.0) -> "keras.Sequential":
    """A Keras MLP whose Dense layers hold ``weights`` (from ``gradtools.models.init_mlp``).

    Hidden layers use ``activation``; the last layer is linear. Dense layers are
    named ``dense_0``, ``dense_1``, ... so variable paths are stable. ``batchnorm``
    inserts ``BatchNormalization`` before each hidden activation; ``dropout`` adds
    ``Dropout(rate)`` after it (the same layout as ``gradtools.torch.mlp``).
    """
    _checks.choice("activation", activation, set(_ACTIVATIONS))
    dropout = _checks.in_range("dropout", dropout, 0.0, 1.0, high_open=True)
    first = np.asarray(weights[0][0])
    layers = [keras.Input(shape=(first.shape[0],))]
    for i, (kernel, _) in enumerate(weights):
        hidden = i < len(weights) - 1
        layers.append(keras.layers.Dense(np.shape(kernel)[1], name=f"dense_{i}"))
        if not hidden:
            break
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(epsilon=1e-3, name=f"batchnorm_{i}"))
        if activation == "leaky_relu":
            layers.append(keras.layers.LeakyReLU(negative_slope=0.01, name=f"leaky_relu_{i}"))
        elif _ACTIVATIONS[activation] is not None:
            layers.append(keras.layers.Activation(_ACTIVATIONS[activation], name=f"{activation}_{i}"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, name=f"dropout_{i}"))
    model = keras.Sequential(layers)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for layer, (kernel, bias) in zip(dense, weights):
        layer.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])
    return model


def _loss(loss: str):
    _checks.choice("loss", loss, {"mse", "crossentropy"})
    if loss == "mse":
        return keras.losses.MeanSquaredError()
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train_full_batch(model, x, y, lr: float, steps: int, loss: str = "mse", clip_norm: float | None = None,
                     momentum: float = 0.0):
    """Full-batch SGD; returns the loss before each step (floats), like ``gradtools.torch.train_full_batch``.

    ``clip_norm`` uses the optimizer's ``global_clipnorm`` (the same global-norm
    clipping as ``torch.nn.utils.clip_grad_norm_``, not Keras' per-variable
    ``clipnorm``). The step is one compiled ``tf.function`` (GradientTape, then
    ``optimizer.apply``), which is what ``fit()`` runs per batch without its
    per-epoch overhead.
    """
    import tensorflow as tf

    lr = _checks.positive("lr", lr)
    steps = _checks.integer("steps", steps, minimum=1)
    kwargs = {} if clip_norm is None else {"global_clipnorm": _checks.positive("clip_norm", clip_norm)}
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum, **kwargs)
    fn = _loss(loss)
    xt, yt = tf.constant(x), tf.constant(y)
    variables = model.trainable_variables
    opt.build(variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = fn(yt, model(xt, training=True))
        opt.apply(tape.gradient(value, variables), variables)
        return value

    return [float(v) for v in [step() for _ in range(steps)]]


def loss_gradients(model, x, y, loss: str = "mse") -> list:
    """Gradients of ``loss`` on one batch for ``model.trainable_variables`` (eager).

    The Keras analogue of ``loss.backward()``: feed the result to
    :func:`gradtools.keras.grad_stats` as ``grad_stats(grads, model)``.
    ``loss`` is ``"mse"`` or ``"crossentropy"`` (integer labels, logits), as in
    :func:`train_full_batch`.
    """
    import tensorflow as tf

    fn = _loss(loss)
    with tf.GradientTape() as tape:
        value = fn(y, model(x, training=True))
    return tape.gradient(value, model.trainable_variables)
