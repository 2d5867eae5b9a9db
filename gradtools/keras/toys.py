"""Small Keras experiments matching :mod:`gradtools.torch.toys`."""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["sgd_on_quadratic", "rnn", "rnn_input_gradients", "activation_gradients"]


def sgd_on_quadratic(A, x0, lr: float, steps: int = 300, momentum: float = 0.0, nesterov: bool = False) -> float:
    """Run ``keras.optimizers.SGD`` on ``x^T A x / 2``; return ``||x_T|| / ||x_0||`` (inf if it overflowed)."""
    lr = _checks.positive("lr", lr)
    A = tf.constant(np.asarray(A, dtype=np.float64))
    x = tf.Variable(np.asarray(x0, dtype=np.float64))
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum, nesterov=nesterov)
    opt.build([x])

    @tf.function
    def run():
        for _ in tf.range(steps):
            g = tf.linalg.matvec(A, x)  # the gradient of x^T A x / 2
            opt.apply([g], [x])

    run()
    ratio = float(tf.norm(x) / np.linalg.norm(x0))
    return ratio if np.isfinite(ratio) else float("inf")


def rnn(weights):
    """A Keras ``SimpleRNN`` (tanh) with a Dense read-out, from ``gradtools.models.init_rnn``."""
    inp = keras.Input(shape=(None, weights["W_in"].shape[0]))
    cell = keras.layers.SimpleRNN(weights["W_rec"].shape[0], activation="tanh", name="rnn")
    out = keras.layers.Dense(1, name="out")
    model = keras.Model(inp, out(cell(inp)))
    cell.set_weights([weights["W_in"], weights["W_rec"], weights["b"]])
    out.set_weights([weights["W_out"], weights["b_out"]])
    return model


def rnn_input_gradients(weights, x, y) -> np.ndarray:
    """``||dL/dx_t||`` for every time step t (mean over the batch); see the PyTorch twin."""
    model = rnn(weights)
    xt = tf.constant(np.asarray(x))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = keras.losses.MeanSquaredError()(np.asarray(y), model(xt))
    g = tape.gradient(loss, xt)
    return tf.reduce_mean(tf.norm(g, axis=2), axis=0).numpy().astype(np.float64)


def activation_gradients(model, x, y, loss: str = "mse") -> np.ndarray:
    """``||dL/dh_l||`` for every hidden activation output of an MLP from ``gradtools.keras.mlp``."""
    _checks.choice("loss", loss, {"mse", "crossentropy"})
    acts = [layer for layer in model.layers if isinstance(layer, (keras.layers.Activation, keras.layers.LeakyReLU))]
    probe = keras.Model(model.inputs[0], [a.output for a in acts] + [model.outputs[0]])
    fn = keras.losses.MeanSquaredError() if loss == "mse" else \
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        outs = probe(np.asarray(x), training=True)
        value = fn(np.asarray(y), outs[-1])
    grads = tape.gradient(value, outs[:-1])
    return np.array([float(tf.norm(g)) for g in grads])
