"""Spike defences in Keras: the same decisions as PyTorch's and the NumPy references; Keras' own
``clipnorm`` against ours; SPAM through ``fit()``, a ``.keras`` file and XLA; the runner."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

import gradtools.keras as gk  # noqa: E402
import gradtools.torch as gt  # noqa: E402
from gradtools.spikes import Scenario, SPAMSchedule  # noqa: E402
from test_spikes import _tensor_sequence, _torch_adagc_factors, _torch_spam_run, adagc_reference  # noqa: E402
from test_spikes import adam_spam_reference, gradient_sequence  # noqa: E402


def test_per_tensor_clip_is_keras_clipnorm():
    """Train the same model with Adam(clipnorm=c) and with Adam + clip_grad_norm_per_tensor: same weights."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5)).astype("float32") * 10
    y = rng.standard_normal((64, 1)).astype("float32")

    def run(clip_ours):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        opt = keras.optimizers.Adam(1e-2, clipnorm=None if clip_ours else 0.5)
        for i in range(8):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(keras.ops.square(model(x[i * 8:(i + 1) * 8]) - y[i * 8:(i + 1) * 8]))
            grads = tape.gradient(loss, model.trainable_variables)
            if clip_ours:
                grads, norms = gk.clip_grad_norm_per_tensor(grads, 0.5)
                assert float(tf.reduce_max(norms)) > 0.5  # it did clip
            opt.apply(grads, model.trainable_variables)
        return [w.numpy() for w in model.trainable_variables]

    for a, b in zip(run(True), run(False)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_per_tensor_clip_has_torchs_factors():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) * s for s in (0.1, 5.0, 30.0)]
    ours, norms = gk.clip_grad_norm_per_tensor(grads, 2.0)
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    torch_norms = gt.clip_grad_norm_per_tensor_(params, 2.0)
    np.testing.assert_allclose(norms.numpy(), torch_norms.numpy(), rtol=1e-6)
    for a, p in zip(ours, params):
        np.testing.assert_allclose(a.numpy(), p.grad.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="max_norm"):
        gk.clip_grad_norm_per_tensor(grads, 0.0)
    with pytest.raises(ValueError, match="None"):
        gk.clip_grad_norm_per_tensor([grads[0], None], 1.0)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_adagc_takes_torchs_decisions(mode):
    seq = _tensor_sequence()
    def in_mode(adagc):
        return adagc if mode == "eager" else tf.function(lambda g: adagc(g), jit_compile=mode == "xla")

    adagc = gk.AdaGC(warmup_steps=5)
    call = in_mode(adagc)
    got = np.array([call([tf.constant(g) for g in grads])[1].numpy() for grads in seq])
    want = _torch_adagc_factors(seq, gt.AdaGC(warmup_steps=5))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    norms = [[float(np.linalg.norm(g.astype(np.float64))) for g in grads] for grads in seq]
    np.testing.assert_allclose(got, adagc_reference(norms, warmup_steps=5), rtol=1e-6)
    # resumed from a state dict (JSON) half-way: the same factors
    first = gk.AdaGC(warmup_steps=5)
    call = in_mode(first)
    for grads in seq[:15]:
        call([tf.constant(g) for g in grads])
    resumed = gk.AdaGC(warmup_steps=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    call = in_mode(resumed)
    rest = np.array([call([tf.constant(g) for g in grads])[1].numpy() for grads in seq[15:]])
    np.testing.assert_allclose(rest, got[15:], rtol=1e-12)
    with pytest.raises(ValueError, match="3 gradients"):
        adagc(seq[0] + [seq[0][1]])
    with pytest.raises(TypeError, match="policy"):
        gk.AdaGC(policy=3)


def _keras_spam_run(grads, schedule, lr=1e-2, weight=None, opt=None, start=0, stop=None):
    if weight is None:
        weight = keras.Variable(np.zeros(grads.shape[1:], np.float32))
    if opt is None:
        opt = gk.SPAM(keras.optimizers.Adam(lr, epsilon=1e-8), **schedule.get_config())
    for t in range(start, len(grads) if stop is None else stop):
        opt.apply([tf.constant(grads[t])], [weight])
    return weight, opt


def test_spam_takes_torchs_steps_and_the_references():
    grads = gradient_sequence()
    schedule = SPAMSchedule(reset_interval=20, warmup_steps=6, settle_steps=3)
    weight, opt = _keras_spam_run(grads, schedule)
    p, _ = _torch_spam_run(grads, schedule)
    want, _ = adam_spam_reference(np.zeros((3, 4)), grads, 1e-2, (0.9, 0.999), 1e-8, schedule)
    # Keras' Adam puts epsilon after the bias correction, PyTorch's before: ~1e-6 apart
    np.testing.assert_allclose(weight.numpy(), p.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weight.numpy(), want, rtol=1e-4, atol=1e-5)
    assert opt.resets == 3 and int(opt.iterations) == 60
    plain, _ = _keras_spam_run(grads, SPAMSchedule(threshold=1e30, reset_interval=10_000, warmup_steps=0))
    adam_weight = keras.Variable(np.zeros((3, 4), np.float32))
    adam = keras.optimizers.Adam(1e-2, epsilon=1e-8)
    for g in grads:
        adam.apply([tf.constant(g)], [adam_weight])
    np.testing.assert_array_equal(plain.numpy(), adam_weight.numpy())  # no reset, no clip: Adam exactly


def test_spam_bad_arguments():
    with pytest.raises(TypeError, match="inner_optimizer.*SGD"):
        gk.SPAM(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="threshold"):
        gk.SPAM(keras.optimizers.Adam(), threshold=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        gk.SPAM(keras.optimizers.Adam(), reset_interval=5, warmup_steps=9)
    with pytest.raises(ValueError, match="clipnorm"):
        gk.SPAM(keras.optimizers.Adam(clipnorm=1.0))


def test_spam_fit_resumes_from_a_keras_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 4)).astype("float32")
    y = (x @ rng.standard_normal((4, 1))).astype("float32")
    x[40:44] *= 300.0  # a corrupted batch

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)])
        m.compile(optimizer=gk.SPAM(keras.optimizers.AdamW(1e-2), reset_interval=8, warmup_steps=3, settle_steps=2),
                  loss="mse")
        return m

    whole = model()
    whole.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    half = model()
    half.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    half.save(tmp_path / "spam.keras")
    resumed = keras.saving.load_model(tmp_path / "spam.keras")
    assert isinstance(resumed.optimizer, gk.SPAM) and resumed.optimizer.schedule == whole.optimizer.schedule
    resumed.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations) == 48 and resumed.optimizer.resets == 6
    for a, b in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------- the comparison
def test_keras_compare_defences_judges_a_huge_spike():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 32, 8)).astype("float32")
    w = rng.standard_normal((8, 1)).astype("float32")
    batches = [(x[i], np.tanh(x[i] @ w)) for i in range(30)]

    def model_fn():
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)])

    def loss(y, out):
        return keras.ops.mean(keras.ops.square(y - out))

    scenarios = [Scenario("spike", spike_steps=(12, 13), spike_scale=1e4)]
    table = gk.compare_defences(model_fn, batches, loss, steps=30, lr=1e-2, scenarios=scenarios,
                                defences=["none", "clipnorm", "spam", "zskip"])
    rows = {r.defence: r for r in table.itertuples()}
    assert set(rows) == {"none", "clipnorm", "spam", "zskip"} and (table.framework == "keras").all()
    assert rows["none"].v_growth > 100
    assert rows["clipnorm"].v_growth < rows["none"].v_growth / 10
    assert rows["zskip"].skipped == 2 and rows["zskip"].v_growth == 1.0
    with pytest.raises(TypeError, match="loss_fn"):
        gk.compare_defences(model_fn, batches, "mse")


def test_spam_compiles_with_xla():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = (x @ rng.standard_normal((4, 1))).astype("float32")
    x[20:24] *= 300.0

    def run(jit):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)])
        m.compile(optimizer=gk.SPAM(keras.optimizers.Adam(1e-2), reset_interval=6, warmup_steps=2,
                                    settle_steps=2), loss="mse", jit_compile=jit)
        m.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return m

    xla, plain = run(True), run(False)
    assert xla.jit_compile and int(xla.optimizer.iterations) == 16
    for a, b in zip(xla.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_one_tensor_is_one_tensor():
    g = tf.ones((3, 4))
    clipped, norms = gk.clip_grad_norm_per_tensor(g, 1.0)
    assert norms.shape == (1,) and abs(float(tf.norm(clipped[0])) - 1.0) < 1e-6
    assert gk.AdaGC(warmup_steps=1)(g)[1].shape == (1,)
