"""GradOptimizer as a drop-in Keras optimizer: each test does the same thing with the
wrapped optimizer and with the plain one, and compares.

Sparse (Embedding) gradients reach the inner optimizer as Keras hands them over;
the inner optimizer's loss_scale_factor, weight decay exclusions, EMA, name,
weights and saved files behave as on the plain optimizer; clipping arguments on
the inner optimizer are refused (GradOptimizer's ``clip`` is the one clip); raw
``tf.Variable``s are accepted; MirroredStrategy trains on the all-reduced
gradient, equal to one device (a subprocess: logical devices must be set before
TensorFlow starts).
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

import gradtools.keras as gk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _xy(n=64, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)
    return x, x.sum(1, keepdims=True)


def _mk(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])


def _fit(opt, epochs=2, model=None, **fit_kw):
    x, y = _xy()
    model = model or _mk()
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False, **fit_kw)
    return model


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------- sparse gradients (Embedding)
def _embedding_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4),
                             keras.layers.Flatten(), keras.layers.Dense(1)])


def _ids():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 6, size=(48, 3)).astype(np.int32)
    ids[:, 1] = ids[:, 0]  # every sample repeats an id: duplicate slices in each gradient
    return ids, rng.standard_normal((48, 1)).astype(np.float32)


@pytest.mark.parametrize("inner", ["adam", "rmsprop", "sgd"])
@pytest.mark.parametrize("settings", [{"action": "skip"}, {"action": "zero"}, {"agc": 1e6}, {"clip": 1e6}],
                         ids=["skip", "zero", "agc", "clip"])
def test_sparse_gradients_reach_the_inner_optimizer_as_in_plain_keras(inner, settings):
    # Keras' Adam and RMSprop square each slice of an IndexedSlices gradient: with a repeated
    # id that differs from squaring the dense gradient. The wrapper must hand the slices on,
    # also through a clip and AGC that leave them as they are.
    ids, y = _ids()
    runs = []
    for wrap in (False, True):
        opt = keras.optimizers.get({"class_name": inner, "config": {"learning_rate": 0.05}})
        if wrap:
            opt = gk.GradOptimizer(opt, **settings)
        model = _embedding_model()
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        model.fit(ids, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        runs.append(_weights(model))
    _assert_same(*runs)


def test_sparse_gradient_norms_are_those_of_the_dense_gradient():
    ids, y = _ids()
    model = _embedding_model()
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y[:16], model(ids[:16]))
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, model.trainable_variables)
    assert isinstance(grads[0], tf.IndexedSlices)
    dense = [tf.convert_to_tensor(g) for g in grads]
    stats, expect = gk.grad_stats(grads, model), gk.grad_stats(dense, model)
    np.testing.assert_allclose(stats.norms.numpy(), expect.norms.numpy(), rtol=1e-6)
    np.testing.assert_allclose(float(gk.get_total_norm(grads)), float(expect.total), rtol=1e-6)
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), clip=1e-3)
    opt.apply(grads, model.trainable_variables)
    np.testing.assert_allclose(float(opt.norm_before), float(expect.total), rtol=1e-6)
    np.testing.assert_allclose(float(opt.norm_after), 1e-3, rtol=1e-4)


def test_zero_action_on_a_sparse_gradient_zeroes_the_dense_gradients_bad_entries():
    # row 1 twice: its dense entries are [1 + 10, 2 + nan] = [11, nan]; only the nan entry is zeroed
    values = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, np.nan]], np.float32)
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant([1, 3, 1]), tf.constant([5, 2]))
    steps = []
    for grad in (sparse, tf.convert_to_tensor(sparse)):
        table = keras.Variable(np.ones((5, 2), np.float32), name="table")
        opt = gk.GradOptimizer(keras.optimizers.SGD(0.5), action="zero")
        opt.apply([grad], [table])
        steps.append(table.numpy())
        assert int(opt.iterations) == 1 and float(opt.nonfinite.numpy().sum()) == 1.0
    expect = np.ones((5, 2), np.float32)
    expect[1] = [1.0 - 0.5 * 11.0, 1.0]  # the nan entry zeroed (both of its slices), the other stepped
    expect[3] = [1.0 - 0.5 * 3.0, 1.0 - 0.5 * 4.0]
    np.testing.assert_array_equal(steps[0], expect)
    np.testing.assert_array_equal(steps[1], expect)


# ---------------------------------------------------------------- the inner optimizer's clipping
@pytest.mark.parametrize("arg", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_clipping_on_the_inner_optimizer_is_refused_naming_the_argument(arg):
    with pytest.raises(ValueError, match=f"inner_optimizer has {arg}=0.5.*clip="):
        gk.GradOptimizer(keras.optimizers.SGD(1.0, **{arg: 0.5}), clip=1.0)
    with pytest.raises(ValueError, match=f"GradOptimizer does not take {arg}.*clip="):
        gk.GradOptimizer(keras.optimizers.SGD(1.0), **{arg: 0.5})


@pytest.mark.parametrize("clip, message", [
    ("zlip", "clip 'zlip' is not a registered policy; known policies: \\['autoclip'"),
    (-1.0, "clip must be a positive finite number, got -1.0"),
    (0, "clip must be a positive finite number, got 0"),
    (float("nan"), "clip must be a positive finite number, got nan"),
    (True, "clip must be a Policy, a positive number or a registered name .*got True"),
    ([1.0], "clip must be a Policy, a positive number or a registered name .*got \\[1.0\\]"),
])
def test_a_bad_clip_is_named_clip(clip, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gk.GradOptimizer(keras.optimizers.SGD(), clip=clip)


@pytest.mark.parametrize("call, message", [
    (lambda: gk.GradOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())),
     "must not be a LossScaleOptimizer: wrap the other way round, LossScaleOptimizer\\(GradOptimizer"),
    (lambda: gk.GradOptimizer(gk.GradOptimizer(keras.optimizers.SGD())), "must not be a GradOptimizer"),
    (lambda: gk.GradOptimizer(keras.optimizers.SGD(), gradient_accumulation_steps=4),
     "does not take gradient_accumulation_steps: use accumulation_steps=4"),
])
def test_wrappings_that_would_train_wrongly_are_refused(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


# ---------------------------------------------------------------- loss_scale_factor
def test_loss_scale_factor_is_passed_through_and_clipping_sees_the_true_gradient():
    plain = _weights(_fit(keras.optimizers.SGD(0.1, loss_scale_factor=8.0)))
    _assert_same(plain, _weights(_fit(gk.GradOptimizer(keras.optimizers.SGD(0.1, loss_scale_factor=8.0)))))
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.1, loss_scale_factor=8.0))
    assert opt.loss_scale_factor == 8.0 and float(opt.scale_loss(1.0)) == 8.0
    # the clip threshold applies to the unscaled gradient: as without a loss scale
    scaled = gk.GradOptimizer(keras.optimizers.SGD(0.1, loss_scale_factor=8.0), clip=0.5)
    unscaled = gk.GradOptimizer(keras.optimizers.SGD(0.1), clip=0.5)
    logs = [gk.GradientLogger() for _ in range(2)]
    a, b = _fit(scaled, callbacks=[logs[0]]), _fit(unscaled, callbacks=[logs[1]])
    np.testing.assert_allclose(logs[0].history["grad_norm"], logs[1].history["grad_norm"], rtol=1e-6)
    assert logs[0].history["grad_norm_clipped"][-1] == pytest.approx(0.5, rel=1e-5)
    for u, v in zip(_weights(a), _weights(b)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_loss_scale_factor_under_loss_scale_and_multi_optimizers_as_plain_keras():
    def lso(wrap):
        inner = keras.optimizers.SGD(0.1, loss_scale_factor=8.0)
        return keras.optimizers.LossScaleOptimizer(gk.GradOptimizer(inner) if wrap else inner)

    _assert_same(_weights(_fit(lso(False))), _weights(_fit(lso(True))))

    def multi(wrap):
        def pick(variable):
            opt = keras.optimizers.SGD(0.1) if "kernel" in variable.path else keras.optimizers.Adam(0.01)
            return gk.GradOptimizer(opt) if wrap else opt
        return keras.optimizers.MultiOptimizer(pick, loss_scale_factor=4.0)

    _assert_same(_weights(_fit(multi(False))), _weights(_fit(multi(True))))


# ---------------------------------------------------------------- weight decay, EMA, name
def test_weight_decay_exclusions_and_settings_read_through_to_the_inner_optimizer():
    runs = []
    for wrap in (False, True):
        opt = keras.optimizers.AdamW(0.01, weight_decay=0.5)
        if wrap:
            opt = gk.GradOptimizer(opt)
        opt.exclude_from_weight_decay(var_names=["bias"])
        runs.append(_weights(_fit(opt)))
    _assert_same(*runs)
    opt = gk.GradOptimizer(keras.optimizers.Adam(name="my_adam", weight_decay=0.1, use_ema=True, ema_momentum=0.9))
    assert (opt.name, opt.weight_decay, opt.use_ema, opt.ema_momentum) == ("my_adam", 0.1, True, 0.9)
    assert gk.GradOptimizer(keras.optimizers.Adam(name="x"), name="mine").name == "mine"
    opt.weight_decay = 0.2  # set through the wrapper: on the optimizer that decays
    assert opt.inner_optimizer.weight_decay == 0.2


@pytest.mark.parametrize("outer", [None, "loss_scale", "multi"])
def test_swap_ema_weights_works_through_every_wrapper(outer):
    def make(wrap):
        opt = keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.5)
        opt = gk.GradOptimizer(opt) if wrap else opt
        if outer == "loss_scale":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        elif outer == "multi":
            opt = keras.optimizers.MultiOptimizer(lambda variable, opt=opt: opt)
        return opt

    runs = []
    for wrap in (False, True):
        model = _fit(make(wrap), callbacks=[keras.callbacks.SwapEMAWeights(swap_on_epoch=True)])
        runs.append(_weights(model))
    _assert_same(*runs)


# ---------------------------------------------------------------- variables, weights, files
def test_variables_set_weights_and_a_plain_optimizers_weights_file(tmp_path):
    plain, wrapped = keras.optimizers.Adam(0.01), gk.GradOptimizer(keras.optimizers.Adam(0.01))
    assert len(wrapped.variables) == len(plain.variables)
    a, b = _fit(plain), _fit(wrapped)
    _assert_same(_weights(a), _weights(b))
    assert len(wrapped.variables) == len(plain.variables) == 2 + 2 * 4  # iterations, lr; m, v of 4 variables
    # set_weights: the inner optimizer's state, as on the plain optimizer
    c = _fit(gk.GradOptimizer(keras.optimizers.Adam(0.01)), epochs=1)
    c.optimizer.set_weights([v.numpy() for v in plain.variables])
    assert int(c.optimizer.iterations) == int(plain.iterations) == 8
    for u, v in zip(c.optimizer.variables, plain.variables):
        np.testing.assert_array_equal(u.numpy(), v.numpy())
    # a plain optimizer's .weights.h5 loads into a GradOptimizer model, and training goes on the same
    path = str(tmp_path / "plain.weights.h5")
    a.save_weights(path)
    d = _mk(seed=5)
    d.compile(optimizer=gk.GradOptimizer(keras.optimizers.Adam(0.01)), loss="mse", jit_compile=False)
    d.optimizer.build(d.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Skipping variable loading"
        d.load_weights(path)
    assert int(d.optimizer.iterations) == 8
    _assert_same(_weights(_fit(a.optimizer, model=a)), _weights(_fit(d.optimizer, model=d)))


def test_gradtools_state_still_saves_with_the_model(tmp_path):
    opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), clip="zclip", accumulation_steps=3)
    model = _fit(opt, epochs=1)  # 4 micro-batches: a partial window is held
    assert opt.accumulator.held() == 1
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.accumulator.held() == 1
    assert loaded.optimizer.guard.state_dict() == opt.guard.state_dict()
    np.testing.assert_array_equal(loaded.optimizer.accumulator.sums[0].numpy(), opt.accumulator.sums[0].numpy())
    _assert_same(_weights(_fit(opt, model=model)), _weights(_fit(loaded.optimizer, model=loaded)))


def test_raw_tf_variables_as_a_plain_optimizer_takes_them():
    runs = []
    for wrap in (False, True):
        w = tf.Variable([1.0, -2.0], name="w")
        opt = keras.optimizers.Adam(0.1)
        opt = gk.GradOptimizer(opt, clip=1.0) if wrap else opt
        for _ in range(3):
            opt.apply([tf.constant([0.3, 0.4])], [w])
        runs.append(w.numpy())
    np.testing.assert_array_equal(*runs)
    assert opt.variable_names == ["w"]


@pytest.mark.parametrize("steps", [1, 3])
def test_overwrite_with_gradient_variables_are_assigned_as_keras_does(steps):
    # float8 layers keep scales whose "gradient" is their next value: Keras assigns it (the maximum
    # over an accumulation window), before clipping; they never enter the norm or the clip.
    runs = []
    for wrap in (False, True):
        w, scale = keras.Variable([1.0, 2.0], name="w"), keras.Variable(0.0, name="scale")
        scale.overwrite_with_gradient = True
        if wrap:
            opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), clip=0.5, accumulation_steps=steps)
        else:
            opt = keras.optimizers.SGD(0.1, gradient_accumulation_steps=steps if steps > 1 else None)
        seen = []
        for gw, gs in [([3.0, 4.0], 5.0), ([0.0, 1.0], 100.0), ([1.0, 0.0], 3.0)] * 2:
            opt.apply([tf.constant(gw), tf.constant(gs)], [w, scale])
            seen.append(float(scale.numpy()))
        runs.append(seen)
    assert runs[0] == runs[1] == ([5.0, 100.0, 3.0] * 2 if steps == 1 else [0.0, 0.0, 100.0, 100.0, 100.0, 100.0])
    expect = 0.5 if steps == 1 else float(np.linalg.norm(np.mean([[3, 4], [0, 1], [1, 0]], axis=0)))
    assert float(opt.norm_before) == pytest.approx(1.0 if steps == 1 else expect, rel=1e-6)


def test_no_gradient_for_any_variable_raises_as_keras_does():
    w = keras.Variable([1.0], name="w")
    for opt in (keras.optimizers.SGD(0.1), gk.GradOptimizer(keras.optimizers.SGD(0.1))):
        with pytest.raises(ValueError, match="No gradients provided for any variable"):
            opt.apply([None], [w])


# ---------------------------------------------------------------- MirroredStrategy
def test_mirrored_strategy_trains_on_the_all_reduced_gradient_like_one_device():
    script = os.path.join(HERE, "keras_mirrored.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(gk.__file__))))
    env = {**os.environ, "PYTHONPATH": root}  # the gradtools this test imported, in the subprocess too
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    loop = results.pop("custom_loop_batch_size")  # apply(batch_size=) per replica, a short last micro-batch
    assert loop["steps"] == [2, 2], loop
    assert loop["max_weight_diff"] <= 1e-6 and loop["max_diff_large_batch"] <= 1e-5, loop
    assert set(results) == {"clip", "autoclip_accumulate", "agc_skip", "adam_sparse"}
    for name, r in results.items():
        assert r["replicas"] == 2
        assert r["max_weight_diff"] <= 1e-6, (name, r)
        assert r["replicas_identical"], name
        assert r["decisions_single"] == r["decisions_mirrored"], name
        assert 0 < r["clipped_steps"] < len(r["decisions_single"]), name
    assert results["agc_skip"]["skipped"] == 3  # the poisoned batch, in each of the 3 epochs
