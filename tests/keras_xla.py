"""GradOptimizer inside an XLA-compiled train step, against the same fit without XLA.

Run as a script, in a process where TensorFlow's op determinism is off (with it on,
Keras quietly compiles without XLA, whatever ``jit_compile`` says; ``make test``
runs tests in workers that may have switched it on). Prints one JSON line: for
each configuration and for ``jit_compile`` False and True, ``model.jit_compile``
after ``fit()``, the per-step decisions recorded by ``GradientLogger`` (skipped,
clip threshold, global norm, non-finite entries, one per-layer norm), the error
``fit()`` raised (class and message), the guard's state and the weights.
"""

import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework import config as tf_config  # noqa: E402

import gradtools.keras as gk  # noqa: E402
from gradtools.policies import AutoClip, SpikeDetector, ZClip  # noqa: E402

BATCH, STEPS = 4, 48


def data():
    """A regression whose batch 8 holds a NaN and whose batch 20 has targets 300 times too large (a spike)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(4, 1))).astype("float32")
    x[8 * BATCH + 1, 2] = np.nan
    y[20 * BATCH:21 * BATCH] *= 300.0
    return x, y


def dead_after(x, step, count):
    """``count`` batches in a row from ``step`` on hold a NaN: too many skips."""
    x = x.copy()
    x[step * BATCH:(step + count) * BATCH, 0] = np.nan
    return x


CONFIGS = {  # GradOptimizer's arguments, made afresh for each run (a policy object holds its state)
    "none_skip": lambda: dict(clip=None),
    "fixed_zero": lambda: dict(clip=1.0, action="zero"),
    "autoclip_skip": lambda: dict(clip=AutoClip(percentile=50, history_size=64)),
    "zclip_skip": lambda: dict(clip=ZClip(warmup_steps=5)),
    "zclip_raise": lambda: dict(clip=ZClip(warmup_steps=5), action="raise"),
    "autoclip_zero_spike": lambda: dict(clip="autoclip", action="zero", spike=SpikeDetector(window=16, min_history=4)),
    "zclip_accumulate_agc": lambda: dict(clip=ZClip(warmup_steps=3), accumulation_steps=2, agc=0.05),
    "fixed_spike_too_many": lambda: dict(clip=1.0, spike=SpikeDetector(window=16, min_history=4),
                                         max_consecutive_skips=3, dead=(30, 4)),
}


def run(name, jit):
    settings = CONFIGS[name]()
    dead = settings.pop("dead", None)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="out")], name="net")  # the same paths in both runs
    opt = gk.GradOptimizer(keras.optimizers.Adam(1e-2), **settings)
    model.compile(optimizer=opt, loss="mse", jit_compile=jit)
    x, y = data()
    if dead is not None:
        x = dead_after(x, *dead)
    logger = gk.GradientLogger(per_layer=True)
    error = None
    try:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    except Exception as exc:  # noqa: BLE001 - what fit() raised is the result
        error = [type(exc).__name__, str(exc)]
    logger.flush()
    chain, f = [], model.train_function  # what wraps the train function once fit() is over
    while hasattr(f, "function"):
        chain.append(type(f).__name__)
        f = f.function
    h = logger.history
    layer = next(k for k in h if k.startswith("grad_norm/"))
    return {"jit_compile": model.jit_compile, "error": error, "iterations": int(opt.iterations.numpy()),
            "skipped": h.get("skipped_steps", []), "threshold": h.get("clip_threshold", []),
            "norm": h.get("grad_norm", []), "nonfinite": h.get("nonfinite", []), "layer": h.get(layer, []),
            "state": opt.guard.state_dict(), "weights": [w.numpy().ravel().tolist() for w in model.weights],
            "wrappers": chain}


def small(optimizer, **compile_kw):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="out")], name="net")
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True, **compile_kw)
    return model


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - what was raised is the result
        return [type(exc).__name__, str(exc)]
    return None


class CustomStep(keras.Model):
    """A model with its own train_step that calls optimizer.apply()."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((self(x) - y) ** 2)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"loss": loss}


def paths():
    """Where Keras runs the step: several steps per call, train_on_batch, a custom train_step,
    a LossScaleOptimizer outside, and a save and load in between."""
    x, y = data()
    out = {}
    m = small(gk.GradOptimizer(keras.optimizers.SGD(0.1), action="raise"), steps_per_execution=4)
    out["steps_per_execution"] = {"error": error_of(lambda: m.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)),
                                  "iterations": int(m.optimizer.iterations.numpy()), "jit_compile": m.jit_compile,
                                  "guard_steps": m.optimizer.guard.steps}
    m = small(gk.GradOptimizer(keras.optimizers.SGD(0.1), action="raise"))
    m.train_on_batch(x[:BATCH], y[:BATCH])
    bad = slice(8 * BATCH, 9 * BATCH)
    out["train_on_batch"] = {"error": error_of(lambda: m.train_on_batch(x[bad], y[bad])),
                             "iterations": int(m.optimizer.iterations.numpy()), "jit_compile": m.jit_compile}
    keras.utils.set_random_seed(0)
    m = CustomStep()
    m.compile(optimizer=gk.GradOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=2), jit_compile=True)
    dead = np.full_like(x, np.nan)
    out["custom_train_step"] = {"error": error_of(lambda: m.fit(dead, y, batch_size=BATCH, verbose=0)),
                                "iterations": int(m.optimizer.iterations.numpy()), "jit_compile": m.jit_compile}
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = small(gk.GradOptimizer(keras.optimizers.SGD(0.1)))
        m.fit(x[:2 * BATCH], y[:2 * BATCH], batch_size=BATCH, verbose=0)
        out["loss_scale"] = {"outer": type(m.optimizer).__name__, "checked": type(m.train_function).__name__,
                             "jit_compile": m.jit_compile}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    clean = slice(24 * BATCH, None)
    m = small(gk.GradOptimizer(keras.optimizers.Adam(1e-2), clip=ZClip(warmup_steps=5)))
    m.fit(x[clean], y[clean], batch_size=BATCH, shuffle=False, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        m.save(os.path.join(tmp, "model.keras"))
        loaded = keras.models.load_model(os.path.join(tmp, "model.keras"))
    for model in (m, loaded):
        model.fit(x[clean], y[clean], batch_size=BATCH, shuffle=False, verbose=0)
    out["save_load"] = {"same_state": m.optimizer.guard.state_dict() == loaded.optimizer.guard.state_dict(),
                        "jit_compile": loaded.jit_compile, "steps": m.optimizer.guard.steps}
    return out


def main():
    out = {"determinism": tf_config.is_op_determinism_enabled()}
    for name in CONFIGS:
        out[name] = {"eager_graph": run(name, False), "xla": run(name, True)}
    out["paths"] = paths()
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
