"""GradOptimizer under tf.distribute.MirroredStrategy (two logical CPUs) against one device.

Run as a script (logical devices must be configured before TensorFlow starts);
prints one JSON line: for each configuration, the largest weight difference from
the single-device run on the same global batch, whether both replicas hold the
same weights, and the per-step decisions (skipped, clipped) of both runs.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradtools.keras as gk  # noqa: E402
from gradtools.maths import max_abs_diff  # noqa: E402


def dense_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])


def sparse_model():
    return keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4),
                             keras.layers.Flatten(), keras.layers.Dense(1)])


def dense_data(poison=False):
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    y = x.sum(1, keepdims=True) * 3.0
    if poison:
        x = x.copy()
        x[21, 2] = np.nan  # second batch, second replica's half
    return x, y


def sparse_data():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 6, size=(64, 3)).astype(np.int32)
    ids[:, 1] = ids[:, 0]
    return ids, rng.standard_normal((64, 1)).astype(np.float32)


CONFIGS = {
    "clip": (dense_model, dense_data, lambda: gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=15.0)),
    "autoclip_accumulate": (dense_model, dense_data, lambda: gk.GradOptimizer(
        keras.optimizers.Adam(0.01), clip="autoclip", accumulation_steps=2)),
    "agc_skip": (dense_model, lambda: dense_data(poison=True),
                      lambda: gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=1.0, agc=0.05)),
    "adam_sparse": (sparse_model, sparse_data, lambda: gk.GradOptimizer(keras.optimizers.Adam(0.05), clip=0.6)),
}


def train(name, strategy):
    make_model, data, make_opt = CONFIGS[name]
    x, y = data()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = make_model()
        model.compile(optimizer=make_opt(), loss="mse", jit_compile=False)
    logger = gk.GradientLogger()
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[logger])
    h = logger.history
    decisions = [[bool(s1 > s0), bool(n > t)] for s0, s1, n, t in
                 zip([0.0] + h["skipped_steps"][:-1], h["skipped_steps"], h["grad_norm"], h["clip_threshold"])]
    replicas = [[np.asarray(r) for r in strategy.experimental_local_results(v.value)] for v in model.weights]
    return model.get_weights(), decisions, replicas, h


def custom_loop(strategy):
    """A custom loop passing each replica's batch size: global micro-batches of 16, 16, 16, 12."""
    x, y = dense_data()
    x, y = x[:60], y[:60]
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = dense_model()
        opt = gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=15.0, accumulation_steps=2)
        opt.build(model.trainable_variables)

    @tf.function
    def step(xb, yb):
        n = tf.shape(xb)[0]
        total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, n)
        with tf.GradientTape() as tape:
            per_sample = keras.losses.mean_squared_error(yb, model(xb, training=True))
            loss = tf.reduce_sum(per_sample) / tf.cast(total, per_sample.dtype)  # the global mean
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables, batch_size=n)

    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    for xb, yb in data:
        strategy.run(step, args=(xb, yb))
    return model.get_weights(), int(opt.iterations.numpy())


def large_batches():
    """The same two optimizer steps on the windows' concatenations (32 and 28 samples)."""
    x, y = dense_data()
    keras.utils.set_random_seed(0)
    model = dense_model()
    model.compile(optimizer=gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=15.0), loss="mse", jit_compile=False)
    model.train_on_batch(x[:32], y[:32])
    model.train_on_batch(x[32:60], y[32:60])
    return model.get_weights()


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    w1, steps1 = custom_loop(tf.distribute.get_strategy())
    w2, steps2 = custom_loop(mirrored)
    w0 = large_batches()
    out["custom_loop_batch_size"] = {
        "steps": [steps1, steps2],
        "max_weight_diff": max_abs_diff(w1, w2),
        "max_diff_large_batch": max_abs_diff(w2, w0),
    }
    for name in CONFIGS:
        w1, d1, _, _ = train(name, tf.distribute.get_strategy())
        w2, d2, replicas, h = train(name, mirrored)
        out[name] = {
            "replicas": mirrored.num_replicas_in_sync,
            "max_weight_diff": max_abs_diff(w1, w2),
            "replicas_identical": all(all(np.array_equal(r[0], c) for c in r[1:]) for r in replicas),
            "decisions_single": d1,
            "decisions_mirrored": d2,
            "clipped_steps": sum(c for _, c in d2),
            "skipped": int(h["skipped_steps"][-1]),
            "grad_norm": [round(v, 3) for v in h["grad_norm"]],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
