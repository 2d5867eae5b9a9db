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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
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
    h = logger.history
    layer = next(k for k in h if k.startswith("grad_norm/"))
    return {"jit_compile": model.jit_compile, "error": error, "iterations": int(opt.iterations.numpy()),
            "skipped": h.get("skipped_steps", []), "threshold": h.get("clip_threshold", []),
            "norm": h.get("grad_norm", []), "nonfinite": h.get("nonfinite", []), "layer": h.get(layer, []),
            "state": opt.guard.state_dict(), "weights": [w.numpy().ravel().tolist() for w in model.weights]}


def main():
    out = {"determinism": tf_config.is_op_determinism_enabled()}
    for name in CONFIGS:
        out[name] = {"eager_graph": run(name, False), "xla": run(name, True)}
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
