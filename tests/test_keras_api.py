"""gradtools.keras as a library: no global side effects, XLA for real, the LR range
test's per-batch losses, saving with schedules and user policies, and the functional twins
of gradtools.torch's norms, clipping and guard, compared with PyTorch."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

import gradtools.keras as gk  # noqa: E402
import gradtools.torch as gt  # noqa: E402
from gradtools.models import init_mlp  # noqa: E402
from gradtools.policies import AutoClip, Policy, SpikeDetector, register_policy  # noqa: E402

SIZES = [6, 16, 16, 3]


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, SIZES[0])).astype(np.float32), rng.standard_normal((n, SIZES[-1])).astype(np.float32)


def _model(opt, seed=0, **compile_kw):
    model = gk.mlp(init_mlp(SIZES, seed=seed), activation="tanh")
    model.compile(optimizer=opt, loss="mse", **{"jit_compile": False, **compile_kw})
    return model


_FRESH = r"""
import json, os, logging
before = dict(os.environ)
import tensorflow as tf
level = tf.get_logger().level
import gradtools.keras as gk
import keras, numpy as np
from tensorflow.python.framework import config
changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))
out = {"env": changed, "determinism": config.is_op_determinism_enabled(), "logger": tf.get_logger().level == level}
# an unseeded fit with random ops (dropout, shuffling) must work, as it does without gradtools
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
model.compile(optimizer=gk.GradOptimizer(keras.optimizers.Adam(1e-3), clip="zclip"), loss="mse", jit_compile=False)
model.fit(np.ones((16, 4), "float32"), np.ones((16, 1), "float32"), epochs=1, verbose=0)
out["fit"] = True
# XLA (what Keras' default jit_compile="auto" picks on a GPU machine): the step really compiles,
# also after the book's setup() told to leave determinism off
from gradtools.runtime import setup
setup(seed=0, frameworks=("keras",), deterministic=False)
out["determinism"] = out["determinism"] or config.is_op_determinism_enabled()
opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), clip="zclip")
model.compile(optimizer=opt, loss="mse", jit_compile=True)
model.fit(np.ones((8, 4), "float32"), np.ones((8, 1), "float32"), epochs=1, verbose=0)
out["xla"] = model.jit_compile is True and int(opt.iterations.numpy()) == 1
print(json.dumps(out))
"""


def test_importing_gradtools_keras_changes_nothing_global():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "PYTHONHASHSEED"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"  # set before the import, by us: not a change
    proc = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"env": [], "determinism": False, "logger": True, "fit": True, "xla": True}


def test_setup_names_a_bad_deterministic_flag():
    from gradtools.runtime import seed_everything, setup

    with pytest.raises(TypeError, match="deterministic must be True or False, got 'no'"):
        setup(seed=0, frameworks=(), deterministic="no")
    with pytest.raises(TypeError, match="deterministic must be True or False, got 1"):
        seed_everything(0, (), deterministic=1)


def test_a_host_only_policy_is_refused_under_xla_with_a_clear_error():
    # A policy with only step() runs on the host; every policy of gradtools compiles (test_keras_xla).
    @register_policy(name="halve_for_xla_test")
    class Halve(Policy):
        def get_config(self):
            return {}

        def step(self, norm):
            return 0.5 * float(norm)

    guard = gk.GradGuard(keras.optimizers.SGD(0.1), clipper=gk.Clipper(Halve()))
    w = keras.Variable(np.zeros(2, np.float32))
    step = tf.function(lambda g: guard.apply([g], [w]), jit_compile=True)
    with pytest.raises(ValueError, match=r"policy Halve has only step\(\).*define init_state\(\) and update\(\)"):
        step(tf.constant([3.0, 4.0]))
    assert bool(tf.function(lambda g: guard.apply([g], [w]))(tf.constant([3.0, 4.0])))  # no XLA: on the host
    np.testing.assert_allclose(w.numpy(), [-0.15, -0.2], rtol=1e-6)  # clipped to half the norm, 2.5


def test_lr_range_test_records_each_batchs_loss_and_restores_the_guard():
    x, y = _data(64)
    start, end, n = 1e-4, 1.0, 12
    # the sweep by hand: one SGD step per batch of 16 (4 batches an epoch), rate growing exponentially
    ref = _model(keras.optimizers.SGD(start))
    mse = keras.losses.MeanSquaredError()
    manual = []
    for i, lr in enumerate(start * (end / start) ** (np.arange(n) / (n - 1))):
        xb, yb = x[16 * (i % 4):16 * (i % 4 + 1)], y[16 * (i % 4):16 * (i % 4 + 1)]
        with tf.GradientTape() as tape:
            loss = mse(yb, ref(xb, training=True))
        ref.optimizer.learning_rate.assign(lr)
        ref.optimizer.apply(tape.gradient(loss, ref.trainable_variables), ref.trainable_variables)
        manual.append(float(loss))
    # AutoClip at the 100th percentile never clips (the threshold is the largest norm so far,
    # the current one included), so the sweep's steps are plain SGD steps, but it has a state
    opt = gk.GradOptimizer(keras.optimizers.SGD(start), clip=AutoClip(percentile=100))
    model = _model(opt)
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)  # the guard and AutoClip have seen one step
    guard_state = opt.guard.state_dict()
    fresh = _model(keras.optimizers.SGD(start))  # same initial weights as ref had
    model.set_weights(fresh.get_weights())
    finder = gk.LRRangeTest(start_lr=start, end_lr=end, num_steps=n, diverge_factor=1e9)
    weights = [w.numpy().copy() for w in model.weights]
    model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0, callbacks=[finder])
    np.testing.assert_allclose(finder.result.raw_losses, manual, rtol=2e-4)  # not the epoch's running means
    assert opt.guard.state_dict() == guard_state  # AutoClip's history and the counters as before
    for w, before in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), before)


@register_policy
class Quarter(Policy):
    """A user-defined policy: clip to a quarter of the norm."""

    def get_config(self):
        return {}

    def step(self, norm):
        self.steps += 1
        return 0.25 * float(norm)


@pytest.mark.parametrize("kind", ["schedule", "user policy"])
def test_models_with_accumulation_aware_schedules_and_user_policies_load(tmp_path, kind):
    x, y = _data(32)
    if kind == "schedule":
        schedule = gk.accumulation_aware(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5), 2)
        opt = gk.GradOptimizer(keras.optimizers.SGD(schedule))
    else:
        opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), clip=Quarter())
    model = _model(opt)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.get_config() == opt.get_config()
    if kind == "user policy":
        assert isinstance(loaded.optimizer.policy, Quarter) and loaded.optimizer.policy.steps == 4
    a = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history["loss"]
    b = loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history["loss"]
    assert a == b


def test_zero_action_steps_with_the_bad_entries_zeroed():
    x, y = _data(16)
    x[0, 0] = np.inf
    model = _model(gk.GradOptimizer(keras.optimizers.SGD(0.1), action="zero"))
    ref = _model(keras.optimizers.SGD(0.1))
    grads = gk.loss_gradients(ref, x, y)
    bad = [int(np.sum(~np.isfinite(g.numpy()))) for g in grads]
    assert sum(bad) > 0  # the poisoned input really gives non-finite gradients
    ref.optimizer.apply([tf.where(tf.math.is_finite(g), g, 0.0) for g in grads], ref.trainable_variables)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    opt = model.optimizer
    assert float(opt.skipped.numpy()) == 0.0 and int(opt.iterations.numpy()) == 1 and opt.guard.steps == 1
    assert opt.nonfinite.numpy().tolist() == bad
    for a, b in zip(model.weights, ref.weights):  # fit()'s compiled step vs an eager one: float32 rounding
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)


def _both(seed=0, scale=1.0):
    w = init_mlp(SIZES, seed=seed)
    x, y = _data()
    km, tm = gk.mlp(w, activation="tanh"), gt.mlp(w, activation="tanh")
    grads = [scale * g for g in gk.loss_gradients(km, x, y)]
    (scale * torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y))).backward()
    return km, tm, grads


@pytest.mark.parametrize("norm_type", [2.0, 3.0, math.inf])
def test_functional_clipping_equals_torch_in_place_clipping(norm_type):
    km, tm, grads = _both(scale=30.0)
    clipped, total = gk.clip_grad_norm(grads, 1.0, norm_type=norm_type)
    t_total = gt.clip_grad_norm_(tm, 1.0, norm_type=norm_type)
    assert float(total) == pytest.approx(float(t_total), rel=1e-5)
    assert float(gk.get_total_norm(grads, norm_type)) == pytest.approx(float(t_total), rel=1e-5)
    for k, p in zip(clipped, tm.parameters()):
        np.testing.assert_allclose(k.numpy(), p.grad.numpy().T, rtol=1e-4, atol=1e-7)
    values = gk.clip_grad_value(grads, 0.01)
    gt.clip_grad_value_(tm, 0.01)
    assert max(float(tf.reduce_max(tf.abs(v))) for v in values) == pytest.approx(0.01)
    assert float(gk.grad_stats(grads, km, norm_type=norm_type).total) == pytest.approx(float(t_total), rel=1e-5)


def test_zeroing_keeps_spike_detection_in_both_frameworks():
    # A x1000 spike with one NaN in it: zeroing the NaN must not let the spike through.
    x, y = _data(32)
    w = init_mlp(SIZES, seed=4)
    km, tm = gk.mlp(w, activation="tanh"), gt.mlp(w, activation="tanh")
    kguard = gk.GradGuard(keras.optimizers.SGD(0.05), action="zero",
                          spike=SpikeDetector(window=20, min_history=3))
    topt = torch.optim.SGD(tm.parameters(), lr=0.05)
    tguard = gt.GradGuard(tm, topt, action="zero", spike=SpikeDetector(window=20, min_history=3))
    for step in range(6):
        scale = 1e3 if step == 4 else 1.0
        grads = [scale * g for g in gk.loss_gradients(km, x, y)]
        topt.zero_grad()
        (scale * torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y))).backward()
        if step == 4:
            grads[0] = tf.tensor_scatter_nd_update(grads[0], [[0, 0]], [np.nan])
            tm[0].weight.grad[0, 0] = math.nan
        before = [v.numpy().copy() for v in km.trainable_variables]
        assert bool(kguard.apply(grads, km.trainable_variables)) == tguard.step().stepped == (step != 4)
        if step == 4:
            assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, km.trainable_variables))
    k, t = kguard.state_dict(), tguard.decider.state_dict()
    assert (k["skipped"], k["spike"]["spikes"]) == (t["skipped"], t["spike"]["spikes"]) == (1, 1)
    np.testing.assert_allclose(k["spike"]["norms"], t["spike"]["norms"], rtol=1e-5)


def test_keras_guard_and_clipper_decide_like_torch_in_a_custom_loop():
    x, y = _data(32)
    w = init_mlp(SIZES, seed=4)
    km, tm = gk.mlp(w, activation="tanh"), gt.mlp(w, activation="tanh")
    kguard = gk.GradGuard(keras.optimizers.SGD(0.05), clipper=gk.Clipper(AutoClip(percentile=50)))
    topt = torch.optim.SGD(tm.parameters(), lr=0.05)
    tguard = gt.GradGuard(tm, topt, clipper=gt.Clipper(AutoClip(percentile=50)))
    for step in range(6):
        xb = x.copy()
        if step == 3:
            xb[0, 0] = np.nan
        grads = gk.loss_gradients(km, xb, y)
        stepped = bool(kguard.apply(grads, km.trainable_variables))
        topt.zero_grad()
        torch.nn.functional.mse_loss(tm(torch.from_numpy(xb)), torch.from_numpy(y)).backward()
        assert stepped == tguard.step().stepped == (step != 3)
    assert kguard.state_dict()["skipped"] == tguard.state_dict()["skipped"] == 1
    np.testing.assert_allclose(kguard.clipper.policy.history, tguard.clipper.policy.history, rtol=1e-5)
    for k, p in zip(km.trainable_variables, tm.parameters()):
        np.testing.assert_allclose(k.numpy(), p.detach().numpy().T, rtol=1e-4, atol=1e-6)


def test_stats_records_are_shared_and_name_the_culprit():
    km, tm, grads = _both()
    grads[2] = tf.tensor_scatter_nd_update(grads[2], [[0, 0]], [math.nan])
    s = gk.grad_stats(grads, km)
    assert not s.is_finite() and s.first_nonfinite().endswith("dense_1/kernel")
    assert s.as_dict()["nonfinite"][s.names[2]] == 1 and sum(s.as_dict()["nonfinite"].values()) == 1
    with pytest.raises(ValueError, match="grads has 6 tensors but variables has 2"):
        gk.grad_stats(grads, km.trainable_variables[:2])
    with pytest.raises(ValueError, match=r"grads holds None at positions \[1\]"):
        gk.grad_stats([grads[0], None])
    with pytest.raises(ValueError, match="norm_type must be a number >= 1 or inf"):
        gk.grad_stats(grads, norm_type=0.5)


def test_keras_guard_measures_in_the_clippers_norm_like_torch():
    w = keras.Variable(np.zeros(2, np.float32))
    guard = gk.GradGuard(keras.optimizers.SGD(1.0), clipper=gk.Clipper(1.0, norm_type=math.inf))
    assert bool(guard.apply([np.array([3.0, 4.0], np.float32)], [w]))
    p = torch.nn.Parameter(torch.zeros(2))
    tguard = gt.GradGuard(torch.nn.ParameterList([p]), torch.optim.SGD([p], lr=1.0),
                          clipper=gt.Clipper(1.0, norm_type=math.inf))
    p.grad = torch.tensor([3.0, 4.0])
    tguard.step()
    np.testing.assert_allclose(-w.numpy(), -p.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(w.numpy(), [-0.75, -1.0], rtol=1e-5)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_grad_optimizer_trains_past_missing_gradients_and_frozen_layers(accumulation_steps):
    x, y = _data(32)
    inp = keras.Input((SIZES[0],))
    base = keras.layers.Dense(8, activation="tanh", name="base")
    out = keras.layers.Dense(SIZES[-1], name="head")(base(inp))
    aux = keras.layers.Dense(2, name="unused")(inp)  # an output without a loss: no gradients
    model = keras.Model(inp, {"head": out, "aux": aux})
    opt = gk.GradOptimizer(keras.optimizers.Adam(1e-2), clip=1.0, accumulation_steps=accumulation_steps)
    model.compile(optimizer=opt, loss={"head": "mse"}, jit_compile=False)
    logger = gk.GradientLogger()
    with pytest.warns(UserWarning, match="Gradients do not exist for variables"):
        model.fit(x, {"head": y}, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    unused_key = next(k for k in logger.history if k.startswith("grad_norm/") and "unused" in k)
    assert logger.history[unused_key] == [0.0] * (4 // accumulation_steps)
    kernel = model.get_layer("base").kernel.numpy().copy()
    model.get_layer("base").trainable = False  # freeze, recompile with the same optimizer
    model.compile(optimizer=opt, loss={"head": "mse"}, jit_compile=False)
    head = model.get_layer("head").kernel.numpy().copy()
    with pytest.warns(UserWarning, match="Gradients do not exist for variables"):
        model.fit(x, {"head": y}, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.get_layer("base").kernel.numpy(), kernel)
    assert not np.array_equal(model.get_layer("head").kernel.numpy(), head)


def test_validation_adds_no_copies_of_the_gradient_statistics():
    x, y = _data(40)
    model = _model(gk.GradOptimizer(keras.optimizers.SGD(0.05), clip=np.float32(1.0)))
    hist = model.fit(x, y, batch_size=8, epochs=2, validation_split=0.2, verbose=0, callbacks=[gk.GradientLogger()])
    assert "val_loss" in hist.history and "grad_norm" in hist.history
    assert not [k for k in hist.history if k.startswith(("val_grad", "val_clip", "val_skipped", "val_nonfinite"))]
    assert model.optimizer.get_config()["clip"] == 1.0 and type(model.optimizer.get_config()["clip"]) is float


def test_norm_helpers_take_one_tensor_and_can_refuse_a_nonfinite_norm():
    g = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    assert gk.grad_stats(g).names == ["0"] and float(gk.grad_stats(g).total) == pytest.approx(5.0)
    assert float(gk.get_total_norm(g)) == pytest.approx(5.0)
    with pytest.raises(RuntimeError, match="non-finite"):
        gk.get_total_norm([np.array([np.inf], np.float32)], error_if_nonfinite=True)


@pytest.mark.parametrize("eps, scale", [(1e-3, 1.0), (1e-5, 1e-8)])
def test_keras_agc_leaves_a_unit_under_its_limit_alone_like_torch(eps, scale):
    rng = np.random.default_rng(0)
    w = np.zeros((3, 4), np.float32)  # Keras: (fan_in, fan_out); a unit is a column
    w[:, 0] = rng.standard_normal(3)
    g = (rng.standard_normal((3, 4)) * scale).astype(np.float32)
    clipped, count = gk.adaptive_clip_grad([g], [keras.Variable(w)], clip_factor=0.01, eps=eps)
    p = torch.nn.Parameter(torch.from_numpy(w.T.copy()))
    p.grad = torch.from_numpy(g.T.copy())
    t_count = gt.adaptive_clip_grad_([("w", p)], clip_factor=0.01, eps=eps)
    np.testing.assert_allclose(clipped[0].numpy(), p.grad.numpy().T, rtol=1e-6)
    assert int(count) == int(t_count)


def test_keras_measures_finite_gradients_whose_float32_norm_overflows_like_torch():
    g = np.full(4, 1e20, np.float32)  # every entry finite; the float32 sum of squares is inf
    out, r = gk.Clipper(5.0)([g])
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.from_numpy(g.copy())
    t = gt.Clipper(5.0)([p])
    assert float(r.norm_before) == pytest.approx(float(t.norm_before), rel=1e-6) == 2e20
    np.testing.assert_allclose(out[0].numpy(), p.grad.numpy(), rtol=1e-6)
    w = keras.Variable(np.zeros(4, np.float32))
    assert bool(gk.GradGuard(keras.optimizers.SGD(1.0), clipper=gk.Clipper(5.0)).apply([g], [w]))
    np.testing.assert_allclose(w.numpy(), -2.5, rtol=1e-6)
    assert not math.isfinite(float(gk.grad_stats([np.array([np.inf, 1.0], np.float32)]).total))


def test_keras_clip_result_flag_follows_the_factor_applied():
    for norm in (100.0, 1e-3, 3.0):  # AutoClip's first threshold is the norm itself
        g = np.array([norm], np.float32)
        out, r = gk.Clipper(AutoClip())([g])
        assert r.clipped == (not np.array_equal(out[0].numpy(), g))  # 100 + 1e-6 is 100 in float32


def test_hessian_of_a_linear_loss_and_of_an_unused_head_in_both_frameworks():
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    assert gt.top_hessian_eigenvalue(torch.nn.Linear(4, 1), lambda m: m(torch.from_numpy(x)).mean()) == 0.0
    inp = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    two_heads = keras.Model(inp, [keras.layers.Dense(1)(h), keras.layers.Dense(3)(h)])
    one_head = keras.Model(inp, two_heads.outputs[0])
    both = gk.top_hessian_eigenvalue(two_heads, lambda m: tf.reduce_mean(m(x)[0] ** 2))
    alone = gk.top_hessian_eigenvalue(one_head, lambda m: tf.reduce_mean(m(x) ** 2))
    assert both == pytest.approx(alone, rel=1e-3) and alone > 0
    linear = keras.layers.Dense(1)
    linear.build((None, 4))
    assert gk.top_hessian_eigenvalue(linear, lambda m: tf.reduce_mean(m(x))) == 0.0
