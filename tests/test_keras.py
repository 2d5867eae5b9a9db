"""gradtools.keras: parity with PyTorch, the in-graph guard, accumulation, config and saving."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

import gradtools.keras as gk  # noqa: E402
import gradtools.torch as gt  # noqa: E402
from gradtools.models import init_mlp  # noqa: E402
from gradtools.policies import AutoClip, SpikeDetector, ZClip  # noqa: E402

SIZES = [6, 16, 16, 3]


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, SIZES[0])).astype(np.float32), rng.standard_normal((n, SIZES[-1])).astype(np.float32)


def _compiled(opt, seed=0):
    keras.utils.set_random_seed(seed)
    model = gk.mlp(init_mlp(SIZES, seed=seed), activation="tanh")
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    return model


def test_per_layer_norms_match_pytorch():
    w = init_mlp(SIZES, init="xavier", seed=3)
    x, y = _data()
    tm = gt.mlp(w, activation="tanh")
    torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    ts = gt.grad_stats(tm)
    km = gk.mlp(w, activation="tanh")
    ks = gk.grad_stats(gk.loss_gradients(km, x, y), km)
    # torch Linear weights are (out, in), Keras kernels (in, out): same norms, same order
    np.testing.assert_allclose(ks.norms.numpy(), ts.norms.numpy(), rtol=1e-5)
    assert float(ks.total) == pytest.approx(float(ts.total), rel=1e-5)
    assert ks.names[0].endswith("dense_0/kernel") and ts.names[0] == "0.weight"
    assert type(ks) is type(ts) and ks.as_dict()["norms"].keys() == set(ks.names)


def test_global_clipping_matches_pytorch_and_clipnorm_differs():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((4, 5)) * 10, rng.standard_normal(5), rng.standard_normal((5, 2)) * 0.1]
    out = gk.compare_clipping(grads, threshold=1.0)
    for a, b in zip(out["keras global_clipnorm"]["grads"], out["torch clip_grad_norm_"]["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert out["torch clip_grad_norm_"]["global_norm"] == pytest.approx(1.0, rel=1e-4)
    assert out["keras global_clipnorm"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    # clipnorm clips each variable: the total exceeds the threshold, and the direction changes
    per_var = [np.linalg.norm(g) for g in out["keras clipnorm"]["grads"]]
    assert max(per_var) == pytest.approx(1.0, rel=1e-4) and out["keras clipnorm"]["global_norm"] > 1.2
    assert out["keras clipnorm"]["cosine"] < 0.999
    assert np.abs(np.concatenate([g.ravel() for g in out["keras clipvalue"]["grads"]])).max() <= 1.0 + 1e-7
    with pytest.raises(ValueError, match="threshold must be a positive finite number, got 0"):
        gk.compare_clipping(grads, 0)


@pytest.mark.parametrize("policy", [lambda: AutoClip(percentile=25), lambda: ZClip(warmup_steps=4, z_thresh=0.5)])
def test_in_graph_policy_equals_python_policy(policy):
    x, y = _data(64)
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=policy())
    model = _compiled(opt)
    logger = gk.GradientLogger(per_layer=False)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
    reference = policy()
    expected = [np.float32(reference.step(n)) for n in logger.history["grad_norm"]]
    assert logger.history["clip_threshold"] == [float(e) for e in expected]  # identical, not close
    clipped = [i for i, (n, t) in enumerate(zip(logger.history["grad_norm"], expected)) if n > t]
    assert clipped, "the test should exercise clipping"
    for i in clipped:
        assert logger.history["grad_norm_clipped"][i] == pytest.approx(expected[i], rel=1e-4)


def _weights_and_slots(model, opt):
    return [v.numpy().copy() for v in model.weights], [v.numpy().copy() for v in opt.inner_optimizer.variables]


@settings(max_examples=25)
@given(st.sampled_from(["nan", "inf", "spike"]), st.integers(0, 5), st.integers(0, 10**6), st.integers(4, 7),
       st.sampled_from(["adam", "sgd"]))
def test_fault_injection_in_graph_skip_is_bit_identical(kind, var_index, entry, at, opt_kind):
    inner = keras.optimizers.Adam(1e-2) if opt_kind == "adam" else keras.optimizers.SGD(1e-2, momentum=0.9)
    opt = gk.GradOptimizer(inner, spike=SpikeDetector(window=20, min_history=3, z_thresh=6.0))
    model = _compiled(opt)
    x, y = _data()

    @tf.function
    def step(inject_var, inject_index, inject_value):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        g = grads[inject_var]
        flat = tf.reshape(g, [-1])
        flat = tf.tensor_scatter_nd_update(flat, [[inject_index]], [inject_value])
        grads[inject_var] = tf.reshape(flat, tf.shape(g))
        opt.apply(grads, model.trainable_variables)

    value = {"nan": math.nan, "inf": math.inf, "spike": 1e6}[kind]
    for s in range(9):
        if s == at:
            size = int(np.prod(model.trainable_variables[var_index].shape))
            before = _weights_and_slots(model, opt)
            step(var_index, entry % size, value)
            after = _weights_and_slots(model, opt)
            for a, b in zip(before[0] + before[1], after[0] + after[1]):
                assert np.array_equal(a, b)
            assert float(opt.last_skipped.numpy()) == 1.0
        else:
            step(0, 0, float(model.trainable_variables[0].numpy().ravel()[0] * 0))  # a harmless write of 0
    assert float(opt.skipped.numpy()) == 1.0 and opt.decider.consecutive_skips == 0
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def test_fit_skips_a_poisoned_batch_and_keeps_training():
    x, y = _data(32)
    x[8:16] = np.inf  # batch 1 of 4 gives non-finite gradients
    opt = gk.GradOptimizer(keras.optimizers.Adam(1e-2))
    model = _compiled(opt)
    logger = gk.GradientLogger()
    hist = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    assert logger.history["skipped_steps"] == [0.0, 1.0, 1.0, 1.0]
    assert logger.history["nonfinite"][1] > 0 and logger.history["nonfinite"][2] == 0
    assert int(opt.iterations.numpy()) == 3  # the inner optimizer stepped 3 times, not 4
    assert hist.history["skipped_steps"] == [1.0] and hist.history["nonfinite"] == [0.0]  # epoch end: last step
    assert hist.history["grad_norm_mean"][0] == pytest.approx(np.mean([logger.history["grad_norm"][i] for i in (0, 2, 3)]),
                                                              rel=1e-6)  # mean over applied steps
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def test_raise_names_the_variable_and_too_many_skips():
    x, y = _data(16)
    x[:] = np.nan
    model = _compiled(gk.GradOptimizer(keras.optimizers.SGD(0.1), action="raise"))
    weights = [w.numpy().copy() for w in model.weights]
    with pytest.raises(tf.errors.UnknownError,
                       match=r"non-finite gradient at step 1: first in variable 'sequential(_\d+)?/dense_0/kernel'"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert isinstance(model.optimizer.last_error, gk.NonFiniteGradientError)  # the original, for `raise ... from`
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(weights, model.weights))  # nothing written
    model = _compiled(gk.GradOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=3))
    with pytest.raises(tf.errors.UnknownError, match="skipped 3 consecutive steps"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert isinstance(model.optimizer.last_error, gk.TooManySkipsError)


def test_zero_action():
    x, y = _data(16)
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), action="zero")
    model = _compiled(opt)
    x[0, 0] = np.inf
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert float(opt.skipped.numpy()) == 0.0 and int(opt.iterations.numpy()) == 1


def test_accumulation_equals_large_batch_and_schedules_count_optimizer_steps():
    x, y = _data(32)
    big = _compiled(keras.optimizers.SGD(0.1))
    big.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.1, 0.1])
    opt = gk.GradOptimizer(keras.optimizers.SGD(schedule), accumulation_steps=4)
    acc = _compiled(opt)
    logger = gk.GradientLogger(per_layer=False)
    acc.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
    for a, b in zip(acc.weights, big.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert int(opt.iterations.numpy()) == 2  # optimizer steps, not 8 micro-batches
    assert len(logger.history["grad_norm"]) == 2  # statistics at the boundary only
    # Keras' own accumulation counts micro-batches; accumulation_aware fixes the schedule.
    warm = keras.optimizers.schedules.PolynomialDecay(1.0, decay_steps=10, end_learning_rate=0.0)
    fixed = gk.accumulation_aware(warm, 4)
    assert float(fixed(8)) == pytest.approx(float(warm(2))) and float(fixed(8)) != pytest.approx(float(warm(8)))


def test_flush_applies_a_partial_window_as_its_own_batch():
    x, y = _data(40)
    big = _compiled(keras.optimizers.SGD(0.1))
    big.train_on_batch(x[:32], y[:32])
    big.train_on_batch(x[32:], y[32:])
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), accumulation_steps=4)
    acc = _compiled(opt)
    flushed = []
    acc.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: flushed.append(opt.flush()))])
    assert flushed == [True] and opt.flush() is False  # nothing left
    assert int(opt.iterations.numpy()) == 2
    for a, b in zip(acc.weights, big.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def _micro_steps(model, opt, x, y, sizes, weighted, compiled=False):
    """One accumulation window in a custom loop: micro-batches of ``sizes`` samples."""
    def micro(xb, yb, n):
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(yb, model(xb))
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables, batch_size=n if weighted else None)

    step = tf.function(micro) if compiled else micro
    lo = 0
    for n in sizes:
        step(x[lo:lo + n], y[lo:lo + n], tf.constant(n) if compiled else n)
        lo += n


@pytest.mark.parametrize("compiled", [False, True])
def test_apply_with_batch_size_weights_a_short_micro_batch_by_its_samples(compiled):
    x, y = _data(28)
    sizes = [8, 8, 8, 4]  # a short last micro-batch
    big = _compiled(keras.optimizers.SGD(0.1))
    big.train_on_batch(x, y)
    weighted, plain = _compiled(None), _compiled(None)
    for model, flag in ((weighted, True), (plain, False)):
        opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), accumulation_steps=4)
        _micro_steps(model, opt, x, y, sizes, weighted=flag, compiled=compiled)
        assert int(opt.iterations.numpy()) == 1 and float(opt.accumulator.weight.numpy()) == 0.0
    for a, b in zip(weighted.weights, big.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    # Without batch sizes each micro-batch weighs 1/4 (Keras' own rule): the step is measurably different.
    start = _compiled(None)
    grads = [gk.loss_gradients(start, x[lo:hi], y[lo:hi]) for lo, hi in ((0, 8), (8, 16), (16, 24), (24, 28))]
    for i, (a, w0) in enumerate(zip(plain.weights, start.weights)):
        expect = w0.numpy() - 0.1 * np.mean([g[i].numpy() for g in grads], axis=0)
        np.testing.assert_allclose(a.numpy(), expect, rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in zip(plain.weights, big.weights)) > 1e-4


def test_apply_batch_size_is_checked_and_flush_keeps_the_weights():
    x, y = _data(24)
    model = _compiled(None)
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), accumulation_steps=4)
    grads = gk.loss_gradients(model, x[:8], y[:8])
    bad_values = [(0, ValueError, "batch_size must be an int >= 1, got 0"),
                  (2.5, TypeError, "batch_size must be an int, got 2.5"),
                  (True, TypeError, "batch_size must be an int, got True"),
                  (tf.constant(0), ValueError, "batch_size must be an int >= 1, got 0"),
                  (tf.constant(-3), ValueError, "batch_size must be an int >= 1, got -3"),
                  (tf.constant(2.5), TypeError, "integer scalar tensor, got a float32 tensor"),
                  (tf.constant(True), TypeError, "integer scalar tensor, got a bool tensor"),
                  (tf.constant([8, 8]), ValueError, "batch_size must be a scalar, got a tensor of shape")]
    for bad, err, message in bad_values:
        with pytest.raises(err, match=message):
            opt.apply(grads, model.trainable_variables, batch_size=bad)
    traced = tf.function(lambda n: opt.apply(grads, model.trainable_variables, batch_size=n))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch_size must be an int >= 1"):
        traced(tf.constant(0))  # checked in the graph, where the value is not known when tracing
    assert float(opt.accumulator.weight.numpy()) == 0.0 and int(opt.micro_step.numpy()) == 0  # nothing changed
    _micro_steps(model, opt, x, y, [8, 16], weighted=True)
    with pytest.raises(ValueError, match="batch_size=None here, but earlier apply\\(\\) calls gave one"):
        opt.apply(grads, model.trainable_variables)  # a window must not mix weights
    assert opt.flush() is True  # a partial window of 8 + 16 samples: the step on all 24
    big = _compiled(keras.optimizers.SGD(0.1))
    big.train_on_batch(x, y)
    for a, b in zip(model.weights, big.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_agc_matches_pytorch():
    w = init_mlp(SIZES, seed=1)
    x, y = _data()
    model = gk.mlp(w, activation="tanh")
    clipped, count = gk.adaptive_clip_grad(gk.loss_gradients(model, x, y), model, clip_factor=0.01)
    clipped = [g.numpy() for g in clipped]
    tm = gt.mlp(w, activation="tanh")
    torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    assert int(count) == int(gt.adaptive_clip_grad_(tm, clip_factor=0.01)) > 0
    for kg, tp in zip(clipped, tm.parameters()):
        np.testing.assert_allclose(kg, tp.grad.numpy().T, rtol=1e-4, atol=1e-7)


def test_config_round_trip_and_save_load(tmp_path):
    opt = gk.GradOptimizer(keras.optimizers.Adam(3e-4), clip=ZClip(alpha=0.9, warmup_steps=5), agc=0.02,
                           action="zero", spike=SpikeDetector(window=50), max_consecutive_skips=4,
                           accumulation_steps=2)
    clone = gk.GradOptimizer.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()
    assert clone.policy.get_config() == opt.policy.get_config() and clone.inner_optimizer.learning_rate == opt.learning_rate
    x, y = _data()
    model = _compiled(opt)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, gk.GradOptimizer)
    assert loaded.optimizer.get_config() == opt.get_config()
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    logger = gk.GradientLogger()
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    assert len(logger.history["grad_norm"]) == len(x) // 8 // 2  # 2 micro-batches per step
    loaded.save(path)  # the recording buffer is not a model or optimizer variable
    assert len(keras.models.load_model(path).optimizer.variables) == len(loaded.optimizer.variables)
    assert not any("record" in v.path for v in loaded.optimizer.variables)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_resumed_run_takes_the_same_decisions_as_an_uninterrupted_one(tmp_path, suffix):
    x, y = _data(64)
    x[40:48] = 30.0  # a spike the detector skips, in the second half

    def make():
        return _compiled(gk.GradOptimizer(keras.optimizers.Adam(1e-2), clip=AutoClip(percentile=30),
                                          spike=SpikeDetector(window=10, min_history=3, z_thresh=3.0)))

    whole, whole_log = make(), gk.GradientLogger(per_layer=False)
    whole.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[whole_log])
    first, first_log = make(), gk.GradientLogger(per_layer=False)
    first.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[first_log])
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".keras":
        first.save(path)
        second = keras.models.load_model(path)
    else:
        first.save_weights(path)
        second = make()
        second.optimizer.build(second.trainable_variables)
        second.load_weights(path)
    assert second.optimizer.decider.state_dict() == first.optimizer.decider.state_dict()
    second_log = gk.GradientLogger(per_layer=False)
    second.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[second_log])
    assert first_log.history["clip_threshold"] + second_log.history["clip_threshold"] == whole_log.history["clip_threshold"]
    # a cold AutoClip would clip the first step to its own norm: the restored history does not
    assert second_log.history["clip_threshold"][0] != second_log.history["grad_norm"][0]
    assert float(whole.optimizer.skipped.numpy()) == float(second.optimizer.skipped.numpy()) >= 2.0
    for a, b in zip(whole.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("call, exc, message", [
    (lambda: gk.GradOptimizer("adam"), TypeError, "inner_optimizer must be a keras.optimizers.Optimizer, got str"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), clip=-1.0), ValueError,
     "clip must be a positive finite number, got -1.0"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), clip=math.nan), ValueError, "got nan"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), clip="fast"), ValueError, "clip .fast. is not a registered policy"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), action="ignore"), ValueError, "action must be one of"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), accumulation_steps=0), ValueError,
     "accumulation_steps must be an int >= 1, got 0"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), agc=0), ValueError, "agc must be a positive finite number"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=2)), ValueError,
     "use GradOptimizer\\(accumulation_steps=...\\)"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), clipnorm=1.0), ValueError, "does not take clipnorm: its clip= is the one clip"),
    (lambda: gk.accumulation_aware("warmup", 2), TypeError, "schedule must be a LearningRateSchedule"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD()).start_recording(0), ValueError,
     "capacity must be an int >= 1, got 0"),
    (lambda: gk.GradientLogger(buffer_steps=2.5), TypeError, "buffer_steps must be an int, got 2.5"),
])
def test_bad_input(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


class _BatchReader(keras.callbacks.Callback):
    async_safe = False

    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


def test_logger_records_every_step_in_graph_and_puts_layer_means_in_epoch_logs():
    x, y = _data(48)
    x[8:16] = np.inf  # batch 1 of 6 in each epoch is skipped
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=0.5)
    model = _compiled(opt)
    reader = _BatchReader()
    logger = gk.GradientLogger()
    hist = model.fit(x[16:], y[16:], validation_data=(x[16:24], y[16:24]), verbose=0)  # train once without it
    hist = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, validation_data=(x[16:24], y[16:24]),
                     callbacks=[logger, reader])
    assert logger.async_safe and logger.lost_steps == 0
    # every step, from the in-graph buffer, equal to what each batch's logs carried
    assert len(logger.history["grad_norm"]) == 12
    np.testing.assert_array_equal(logger.history["grad_norm"], [b["grad_norm"] for b in reader.logs])  # NaN == NaN
    assert logger.history["skipped_steps"] == [float(b["skipped_steps"]) for b in reader.logs] == \
        [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert all(a > b == pytest.approx(0.5, rel=1e-5) for a, b in
               zip(logger.history["grad_norm"], logger.history["grad_norm_clipped"]) if np.isfinite(a))
    kernel = next(k for k in logger.history if k.startswith("grad_norm/") and k.endswith("dense_0/kernel"))
    assert not any(k.startswith("grad_norm/") for k in reader.logs[0])  # per-layer stays out of batch logs
    per_layer = [k for k in logger.history if k.startswith("grad_norm/")]
    assert len(per_layer) == len(model.trainable_variables)
    total = np.sqrt(np.sum([np.square(logger.history[k]) for k in per_layer], axis=0))
    np.testing.assert_allclose(total[[0, 2, 3, 4, 5]], np.array(logger.history["grad_norm"])[[0, 2, 3, 4, 5]], rtol=1e-5)
    # epoch logs: per-layer means over the epoch's applied steps, survive validation (evaluate resets metrics)
    for epoch, rows in enumerate([range(0, 6), range(6, 12)]):
        applied = [i for i in rows if i % 6 != 1]
        assert hist.history["grad_norm_mean/" + kernel[len("grad_norm/"):]][epoch] == pytest.approx(
            np.mean([logger.history[kernel][i] for i in applied]), rel=1e-5)
        assert hist.history["grad_norm_mean"][epoch] == pytest.approx(
            np.mean([logger.history["grad_norm"][i] for i in applied]), rel=1e-5)


def test_csvlogger_and_tensorboard_see_the_statistics(tmp_path):
    import csv
    import glob

    x, y = _data(32)
    model = _compiled(gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=0.5))
    logger = gk.GradientLogger()
    callbacks = [logger, keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
                 keras.callbacks.TensorBoard(str(tmp_path / "tb"), update_freq="batch", write_graph=False)]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    key = next(k for k in rows[0] if k.startswith("grad_norm_mean/") and k.endswith("dense_0/kernel"))
    layer = "grad_norm/" + key[len("grad_norm_mean/"):]
    assert [float(r[key]) for r in rows] == pytest.approx(
        [np.mean(logger.history[layer][:4]), np.mean(logger.history[layer][4:])], rel=1e-5)
    assert float(rows[1]["grad_norm_clipped"]) == pytest.approx(0.5, rel=1e-5)
    scalars = {}  # tag -> values, from the event files
    for path in glob.glob(str(tmp_path / "tb" / "train" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    scalars.setdefault(v.tag, []).append(float(tf.make_ndarray(v.tensor)))
    assert {"epoch_grad_norm", "epoch_grad_norm_mean", "epoch_" + key} <= set(scalars)
    assert scalars["batch_grad_norm"] == pytest.approx(logger.history["grad_norm"], rel=1e-6)


def test_mixed_precision_loss_scaling_wraps_the_grad_optimizer():
    x, y = _data(32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.layers.Input((SIZES[0],)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(SIZES[-1], dtype="float32")])
        opt = gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=0.5)
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        assert type(model.optimizer).__name__ == "LossScaleOptimizer" and model.optimizer.inner_optimizer is opt
        logger = gk.GradientLogger()
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # the norms are of the unscaled gradients: the loss scale (2**15) does not appear in them
    assert len(logger.history["grad_norm"]) == 4 and all(0 < n < 100 for n in logger.history["grad_norm"])
    assert all(c == pytest.approx(min(n, 0.5), rel=1e-3)
               for n, c in zip(logger.history["grad_norm"], logger.history["grad_norm_clipped"]))


def test_logger_records_every_step_under_steps_per_execution():
    x, y = _data(48)
    model = gk.mlp(init_mlp(SIZES, seed=0), activation="tanh")
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt, loss="mse", jit_compile=False, steps_per_execution=3)
    reader, logger = _BatchReader(), gk.GradientLogger()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger, reader])
    assert len(reader.logs) == 2  # fit() returns to Python every 3 steps...
    assert len(logger.history["grad_norm"]) == 6  # ...the buffer holds all 6
    assert [logger.history["grad_norm"][i] for i in (2, 5)] == [b["grad_norm"] for b in reader.logs]


@settings(max_examples=30)
@given(st.integers(1, 9), st.integers(0, 30))
def test_recording_ring_returns_the_newest_rows_oldest_first(capacity, steps):
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.1))
    opt.build([keras.Variable(np.zeros((2, 2), np.float32))])
    opt.start_recording(capacity, per_layer=True)
    for i in range(steps):
        opt.norm_before.assign(float(i))
        opt.layer_norms.assign([float(-i)])
        opt._record_step()
    rows, lost = opt.read_recording()
    kept = list(range(max(steps - capacity, 0), steps))
    assert rows["grad_norm"] == [float(i) for i in kept] and lost == steps - len(kept)
    assert rows[f"grad_norm/{opt.variable_names[0]}"] == [float(-i) for i in kept]
    assert opt.read_recording() == ({k: [] for k in rows}, 0)  # a read empties it


def test_logger_per_layer_batch_logs_and_no_recording():
    x, y = _data(32)
    model = _compiled(gk.GradOptimizer(keras.optimizers.SGD(0.05)))
    reader = _BatchReader()
    fast = gk.GradientLogger(per_layer=True, record_batches=False, per_layer_batch_logs=True)
    hist = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[fast, reader])
    assert fast.history == {}
    key = next(k for k in reader.logs[0] if k.startswith("grad_norm/") and k.endswith("dense_0/kernel"))
    assert len({b[key] for b in reader.logs}) == 4 and key in hist.history
    assert hist.history["grad_norm_mean/" + key[len("grad_norm/"):]][0] == pytest.approx(
        np.mean([b[key] for b in reader.logs]), rel=1e-5)


def test_logger_buffer_overflow_warns_and_keeps_the_newest_steps():
    x, y = _data(40)
    model = _compiled(gk.GradOptimizer(keras.optimizers.SGD(0.05)))
    reader = _BatchReader()
    logger = gk.GradientLogger(per_layer=False, buffer_steps=3)
    with pytest.warns(RuntimeWarning, match="2 steps did not fit in the buffer of 3 rows"):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger, reader])
    assert logger.lost_steps == 2
    assert logger.history["grad_norm"] == [float(b["grad_norm"]) for b in reader.logs[2:]]
    with pytest.raises(ValueError, match="buffer_steps must be an int >= 1, got 0"):
        gk.GradientLogger(buffer_steps=0)


def test_logger_needs_grad_optimizer():
    model = _compiled(keras.optimizers.SGD(0.1))
    x, y = _data(8)
    with pytest.raises(ValueError, match="needs the model compiled with gradtools.keras.GradOptimizer, got SGD"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[gk.GradientLogger()])


def test_lr_range_test_callback_restores_and_matches_sweep():
    x, y = _data(64)
    model = _compiled(keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # give Adam some state
    weights = [w.numpy().copy() for w in model.weights]
    slots = [v.numpy().copy() for v in model.optimizer.variables]
    finder = gk.LRRangeTest(start_lr=1e-5, end_lr=100.0, num_steps=60)
    model.fit(x, y, batch_size=64, epochs=60, verbose=0, callbacks=[finder])
    r = finder.result
    assert r.diverged_at is not None and len(r.lrs) == r.diverged_at + 1 < 60
    assert 1e-5 < r.suggested_lr < r.lrs[r.diverged_at]
    for w, before in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), before)
    for v, before in zip(model.optimizer.variables, slots):
        np.testing.assert_array_equal(v.numpy(), before)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)


def test_sharpness_matches_pytorch():
    w = init_mlp(SIZES, init="xavier", seed=2)
    x, y = _data()
    km = gk.mlp(w, activation="tanh")
    tm = gt.mlp(w, activation="tanh")
    mse = keras.losses.MeanSquaredError()
    lk = gk.top_hessian_eigenvalue(km, lambda m: mse(y, m(x)), iters=200, tol=1e-8)
    lt = gt.top_hessian_eigenvalue(
        tm, lambda m: torch.nn.functional.mse_loss(m(torch.from_numpy(x)), torch.from_numpy(y)), iters=200, tol=1e-8)
    assert lk == pytest.approx(lt, rel=1e-3) and lk > 0


def test_mlp_dtype_policy_is_per_model_and_checked():
    w = init_mlp(SIZES, seed=0)
    x, _ = _data(4)
    mixed = gk.mlp(w, activation="tanh", norm="layer", dtype="mixed_float16")
    assert {layer.dtype_policy.name for layer in mixed.layers} == {"mixed_float16"}
    assert all(v.dtype == "float32" for v in mixed.weights)  # variables stay float32
    assert mixed(x).dtype == "float16"
    assert keras.config.dtype_policy().name == "float32"  # nothing global changed
    np.testing.assert_allclose(np.asarray(mixed(x), np.float32), gk.mlp(w, activation="tanh", norm="layer")(x),
                               rtol=0.02, atol=0.02)
    for bad in ("float17", "int32", "int8_from_mixed_bfloat16"):
        with pytest.raises(ValueError, match=f"dtype must be a floating-point Keras dtype policy .* got '{bad}'"):
            gk.mlp(w, dtype=bad)
