"""Overhead of per-layer gradient norms inside Keras ``fit()``, measured side by side in one process.

Three ways to train the same 12-layer 256-wide MLP for the same batches:

* plain ``model.fit()`` (the baseline);
* ``fit()`` with ``GradOptimizer`` + ``GradientLogger()``: global and per-layer
  norms, non-finite counts and the guard at every step; every step's values
  recorded (per-layer included) by the train step into an in-graph buffer, the
  global ones also in every batch's logs;
* the same with ``per_layer_batch_logs=True``: the per-layer norms in every
  batch's logs too (26 more values to move to the host per step);
* the usual workaround: an eager ``GradientTape`` loop computing the same norms;
* under XLA (``jit_compile=True``): ``GradOptimizer(clip="zclip")`` + ``GradientLogger()``
  against plain XLA ``fit()``, and the same ``GradOptimizer`` fit with and without XLA
  (the speed a reader gains from compiling the guard and the policy with the step).

Each pair is timed in alternation; the median of per-round ratios is printed. Op
determinism stays off here (``setup(deterministic=False)``): with it on, Keras
compiles without XLA whatever ``jit_compile`` says.

    .venv/bin/python benchmarks/keras_overhead.py [--rounds 5]
"""

from __future__ import annotations

import argparse

from gradtools.runtime import setup

setup(seed=0, frameworks=("keras",), deterministic=False)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, models, optimizers  # noqa: E402

import gradtools.keras as gk  # noqa: E402
from gradtools.timing import median_ratio  # noqa: E402


def build(optimizer, jit=False):
    model = models.Sequential([layers.Input((256,))] + [layers.Dense(256, activation="relu") for _ in range(12)]
                              + [layers.Dense(10)])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", jit_compile=jit)
    return model


def tape_loop(model, opt, x, y, batch):
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
    history = []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        norms = [float(tf.norm(g)) for g in grads]
        history.append((float(np.sqrt(np.sum(np.square(norms)))), norms))
        opt.apply_gradients(zip(grads, model.trainable_variables))
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    batch = 256
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * args.batches, 256)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    steps = args.batches

    # XLA first: once TensorFlow's own (non-XLA) runtime has run in a process, its threads slow
    # XLA's steps on a 2-core machine (plain XLA fit() from 11 to 16 ms a step here)
    def fit(model, **kw):
        return lambda: model.fit(x, y, batch_size=batch, epochs=1, verbose=0, **kw)

    plain_xla = build(optimizers.Adam(1e-4), jit=True)
    guarded_xla = build(gk.GradOptimizer(optimizers.Adam(1e-4), clip="zclip"), jit=True)
    xla_logger = gk.GradientLogger(per_layer=True)
    r4, b4, c4 = median_ratio(fit(plain_xla), fit(guarded_xla, callbacks=[xla_logger]), args.rounds)
    assert plain_xla.jit_compile is True and guarded_xla.jit_compile is True  # XLA really ran
    print(f"XLA fit() with GradOptimizer(zclip) + per-layer logging vs plain XLA fit(): {r4:.3f}x "
          f"({1e3 * c4 / steps:.1f} ms vs {1e3 * b4 / steps:.1f} ms per step)")
    guarded = build(gk.GradOptimizer(optimizers.Adam(1e-4), clip="zclip"))
    logger5 = gk.GradientLogger(per_layer=True)
    r5, b5, c5 = median_ratio(fit(guarded, callbacks=[logger5]), fit(guarded_xla, callbacks=[xla_logger]),
                              args.rounds)
    print(f"the same GradOptimizer fit() with jit_compile=True vs False: {r5:.3f}x "
          f"({1e3 * c5 / steps:.1f} ms vs {1e3 * b5 / steps:.1f} ms per step): {1 / r5:.2f} times faster")

    plain = build(optimizers.Adam(1e-4))
    tracked = build(gk.GradOptimizer(optimizers.Adam(1e-4)))
    logger = gk.GradientLogger(per_layer=True)  # every step recorded in the graph; global stats in batch logs
    r1, b, c = median_ratio(lambda: plain.fit(x, y, batch_size=batch, epochs=1, verbose=0),
                              lambda: tracked.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[logger]),
                              args.rounds)
    assert len(logger.history[f"grad_norm/{tracked.optimizer.variable_names[0]}"]) >= steps
    print(f"fit() with global + per-layer norms recorded every step vs plain fit(): {r1:.3f}x "
          f"({1e3 * c / steps:.1f} ms vs {1e3 * b / steps:.1f} ms per step)")
    batch_logs = build(gk.GradOptimizer(optimizers.Adam(1e-4)))
    wide = gk.GradientLogger(per_layer=True, record_batches=False, per_layer_batch_logs=True)
    r3, b3, c3 = median_ratio(lambda: plain.fit(x, y, batch_size=batch, epochs=1, verbose=0),
                                lambda: batch_logs.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[wide]),
                                args.rounds)
    print(f"fit() with per-layer norms in every batch's logs vs plain fit(): {r3:.3f}x "
          f"({1e3 * c3 / steps:.1f} ms vs {1e3 * b3 / steps:.1f} ms per step)")
    eager = build(optimizers.Adam(1e-4))
    r2, b2, c2 = median_ratio(lambda: tape_loop(eager, eager.optimizer, x, y, batch),
                                lambda: tracked.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[logger]),
                                args.rounds)
    print(f"fit() with per-layer norms vs the eager GradientTape workaround: {r2:.3f}x "
          f"({1e3 * c2 / steps:.1f} ms vs {1e3 * b2 / steps:.1f} ms per step): {1 / r2:.2f} times faster")


if __name__ == "__main__":
    main()
