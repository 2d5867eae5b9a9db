"""Keras model styles and life cycles, run with and without ``GradientLogger``.

Imported by test_keras_lifecycle.py, and run as a script for what needs a
process of its own (a global ``mixed_float16`` policy):
``python tests/keras_workflows.py mixed <style>`` prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

import numpy as np

from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

import gradtools.keras as gk  # noqa: E402

X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)
Dense = keras.layers.Dense


@keras.saving.register_keras_serializable(package="gradtools_tests")
class Net(keras.Model):
    """A subclassed model: two layers made in ``__init__``, built at the first call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = Dense(8, activation="tanh")
        self.out = Dense(1, dtype="float32")

    def call(self, x):
        return self.out(self.hidden(x))


@keras.saving.register_keras_serializable(package="gradtools_tests")
class StepNet(Net):
    """A subclassed model with its own ``train_step``, as in the Keras guide."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def _built(model):
    model(X[:1])
    return model


def _functional_shared():
    inputs = keras.Input((4,))
    shared = Dense(4, activation="tanh", name="shared")
    h1 = shared(inputs)
    h2 = shared(h1)  # the same kernel twice: one variable, two paths into its gradient
    return keras.Model(inputs, Dense(1, dtype="float32")(keras.layers.Add()([h1, h2])))


STYLES = {
    "sequential": lambda: keras.Sequential([keras.Input((4,)), Dense(8, activation="tanh"),
                                            Dense(1, dtype="float32")]),
    "sequential_no_input": lambda: keras.Sequential([Dense(8, activation="tanh"), Dense(1, dtype="float32")]),
    "functional_shared": _functional_shared,
    "subclassed": Net,
    "subclassed_built": lambda: _built(Net()),
    "custom_train_step": lambda: _built(StepNet()),
}
LIFECYCLES = ("evaluate", "recompile", "freeze")


def grad_optimizer(inner=None, clip=1.0):
    return gk.GradOptimizer(inner or keras.optimizers.Adam(1e-2), clip=clip)


class Run:
    """One workflow on one model: what each fit, evaluate and logger gave, and the weights."""

    def __init__(self, style: str, logger: bool):
        keras.utils.set_random_seed(0)
        self.model = STYLES[style]()
        self.logger = logger
        self.fits, self.loggers, self.evaluations = [], [], []

    def compile(self, optimizer):
        self.model.compile(optimizer=optimizer, loss="mse", jit_compile=False)

    def fit(self, with_logger=True, **kwargs):
        callbacks = [gk.GradientLogger()] if self.logger and with_logger else []
        history = self.model.fit(X, Y, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)
        self.fits.append(history.history)
        self.loggers.append(callbacks[0].history if callbacks else None)

    def evaluate(self):
        self.evaluations.append(self.model.evaluate(X, Y, batch_size=16, verbose=0))

    def weights(self):
        return [w.numpy() for w in self.model.weights]


def trainable_layer(model):
    return next(layer for layer in model.layers if layer.trainable_weights)


def run(style: str, lifecycle: str, logger: bool) -> Run:
    """The life cycle ``lifecycle`` of a ``style`` model; with ``logger``, every GradOptimizer fit logs."""
    r = Run(style, logger)
    if lifecycle == "evaluate":
        r.compile(grad_optimizer())
        r.evaluate()  # before any fit: on a model built at its first call, this builds it
        r.fit(epochs=2, validation_data=(X[:16], Y[:16]))
        r.evaluate()
    elif lifecycle == "recompile":
        r.compile(grad_optimizer())
        r.fit()
        r.compile(grad_optimizer(keras.optimizers.SGD(0.1), clip=0.01))
        r.fit()
        r.compile(keras.optimizers.Adam(1e-2))  # plain Keras again: no logger can be used, none is
        r.fit(with_logger=False)
        r.evaluate()
    elif lifecycle == "freeze":
        opt = grad_optimizer()
        r.compile(opt)
        r.fit()
        layer = trainable_layer(r.model)
        layer.trainable = False
        r.compile(opt)  # the same optimizer, now for a subset of the variables it was built with
        r.fit()
        layer.trainable = True
        r.compile(opt)
        r.fit()
        r.evaluate()
    else:
        raise ValueError(f"lifecycle must be one of {LIFECYCLES}, got {lifecycle!r}")
    return r


def numbered(logs: dict) -> dict:
    """Per-variable keys numbered in their order: two models' auto-generated paths differ."""
    out, seen = {}, {}
    for key, value in logs.items():
        head, sep, _ = key.partition("/")
        if sep:
            seen[head] = seen.get(head, -1) + 1
            key = f"{head}/{seen[head]}"
        out[key] = value
    return out


def mixed_save_load(style: str) -> dict:
    """Under mixed_float16: fit, save, load, fit again, against two fits without the save; both logged."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    out = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for logger in (False, True):
            runs = {}
            for resume in (False, True):
                r = Run(style, logger)
                r.compile(gk.GradOptimizer(keras.optimizers.Adam(1e-2), clip="zclip"))
                r.fit()
                if resume:
                    path = os.path.join(tmp, f"{style}_{logger}.keras")
                    r.model.save(path)
                    r.model = keras.saving.load_model(path)
                r.fit()
                opt = r.model.optimizer
                runs["resumed" if resume else "whole"] = {
                    "weights": [w.tolist() for w in r.weights()],
                    "loss_scale": float(opt.dynamic_scale.numpy()),
                    "optimizer": type(opt).__name__,
                    "variables": len(opt.variables),
                    "zclip": opt.inner_optimizer.policy.state_dict(),
                    "last_fit": numbered(r.fits[-1]),
                    "last_logger": r.loggers[-1] and numbered(r.loggers[-1]),
                }
            out["logged" if logger else "plain"] = runs
    out["warnings"] = sorted({str(w.message)[:160] for w in caught if "Skipping variable" in str(w.message)})
    return out


if __name__ == "__main__":
    if sys.argv[1:2] != ["mixed"] or len(sys.argv) != 3:
        raise SystemExit("usage: keras_workflows.py mixed <style>")
    print(json.dumps(mixed_save_load(sys.argv[2])))
