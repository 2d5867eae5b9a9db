"""Keras models built from :mod:`gradtools.models` weights, and a full-batch trainer."""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.runtime import import_keras

keras = import_keras()

__all__ = ["mlp", "train_full_batch"]

_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "linear": None, "leaky_relu": "leaky_relu"}


def mlp(weights, activation: str = "relu") -> "keras.Sequential":
    """A Keras MLP whose Dense layers hold ``weights`` (from ``gradtools.models.init_mlp``).

    Hidden layers use ``activation``; the last layer is linear. Dense layers are
    named ``dense_0``, ``dense_1``, ... so variable paths are stable.
    """
    _checks.choice("activation", activation, set(_ACTIVATIONS))
    first = np.asarray(weights[0][0])
    layers = [keras.Input(shape=(first.shape[0],))]
    for i, (kernel, _) in enumerate(weights):
        act = _ACTIVATIONS[activation] if i < len(weights) - 1 else None
        if act == "leaky_relu":
            layers.append(keras.layers.Dense(np.shape(kernel)[1], name=f"dense_{i}"))
            layers.append(keras.layers.LeakyReLU(negative_slope=0.01, name=f"leaky_relu_{i}"))
        else:
            layers.append(keras.layers.Dense(np.shape(kernel)[1], activation=act, name=f"dense_{i}"))
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
    """Full-batch SGD with ``model.fit``; returns the loss before each step (floats).

    ``clip_norm`` uses the optimizer's ``global_clipnorm`` (the same global-norm
    clipping as ``torch.nn.utils.clip_grad_norm_``, not Keras' per-variable ``clipnorm``).
    """
    lr = _checks.positive("lr", lr)
    steps = _checks.integer("steps", steps, minimum=1)
    kwargs = {} if clip_norm is None else {"global_clipnorm": _checks.positive("clip_norm", clip_norm)}
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum, **kwargs)
    model.compile(optimizer=opt, loss=_loss(loss))
    hist = model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    return [float(v) for v in hist.history["loss"]]


def grad_stats(model, x, y, loss: str = "mse") -> dict:
    """Per-variable and global gradient norms of ``loss`` on one batch (eager, for inspection).

    Returns ``{"names": [variable paths], "norms": array, "total_norm": float}``,
    the same quantities as ``gradtools.torch.grad_stats``.
    """
    import tensorflow as tf

    fn = _loss(loss)
    with tf.GradientTape() as tape:
        value = fn(y, model(x, training=True))
    grads = tape.gradient(value, model.trainable_variables)
    norms = np.array([float(tf.norm(tf.cast(g, tf.float32))) for g in grads])
    return {"names": [v.path for v in model.trainable_variables], "norms": norms,
            "total_norm": float(np.sqrt((norms**2).sum())), "grads": [g.numpy() for g in grads]}
