"""gradtools.keras inside XLA-compiled steps: every policy, action, accumulation and the logger.

The decision is :meth:`gradtools.guard.StepDecider.decide_arrays`, written once; here it
runs with TensorFlow operations, eagerly, in a graph and under XLA, against the NumPy
reference on the same norms. A subprocess (``keras_xla.py``, with op determinism off,
which otherwise makes Keras fall back from XLA) runs ``fit()`` with ``jit_compile``
True and False and compares what each decided.
"""

import copy
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

import gradtools.keras as gk  # noqa: E402
from gradtools.guard import REASONS, StepDecider  # noqa: E402
from gradtools.keras._ops import TENSORFLOW  # noqa: E402
from gradtools.policies import AutoClip, FixedThreshold, SpikeDetector, ZClip  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Norms that exercise every branch: warm-up, ordinary steps, zeros, non-finite, spikes, a dead stretch.
NORMS = [1.0, 1.2, 0.9, 1.1, 0.0, 1.05, 50.0, 0.95, math.nan, 1.0, math.inf, 1.1, 0.8, 400.0, 1.2, 0.9, 1.0,
         1.3, 0.7, 1.1, 5.0, 1.0, 0.9, 1.2, math.nan, math.nan, math.nan, 1.0, 1.1, 0.95]

DECIDERS = {
    "skip": lambda: StepDecider("skip", max_consecutive_skips=50),
    "fixed_zero": lambda: StepDecider("zero", policy=FixedThreshold(1.5), max_consecutive_skips=50),
    "autoclip_spike": lambda: StepDecider("skip", SpikeDetector(window=8, min_history=3), 50,
                                          policy=AutoClip(percentile=30, history_size=7)),
    "zclip_raise": lambda: StepDecider("raise", policy=ZClip(warmup_steps=4), max_consecutive_skips=2),
    "zclip_mean_spike_zero": lambda: StepDecider("zero", SpikeDetector(window=5, min_history=3, z_thresh=2.0), 50,
                                                 policy=ZClip(warmup_steps=3, clip_option="mean", max_norm=20.0)),
}


def _inputs(decider):
    """(norm, non-finite) per step; under action "zero" the norm is measured after zeroing: finite."""
    zero = decider.action == "zero"
    return [(1.0 if zero and not math.isfinite(n) else n, not math.isfinite(n)) for n in NORMS]


def _numpy_decisions(decider):
    from gradtools._ops import NUMPY

    rows = []
    for n, bad in _inputs(decider):
        out = NUMPY.run(decider.decide_arrays, np.float64(n), np.bool_(bad), NUMPY)
        rows.append((int(out["code"]), bool(out["too_many"]), float(out["threshold"])))
    return rows


def _tf_decisions(decider, compile_with):
    @tf.autograph.experimental.do_not_convert  # as gradtools.keras.GradGuard.check calls it
    def decide(norm, bad):
        out = decider.decide_arrays(norm, bad, TENSORFLOW)
        return (tf.cast(out["code"], tf.int64), tf.convert_to_tensor(out["too_many"]),
                tf.cast(out["threshold"], tf.float64))

    decider.arrays(TENSORFLOW)
    for part in (decider.spike, decider.policy):
        if part is not None:
            part.arrays(TENSORFLOW)
    fn = decide if compile_with is None else tf.function(decide, jit_compile=compile_with)
    rows = []
    for n, bad in _inputs(decider):
        code, too_many, threshold = fn(tf.constant(n, tf.float64), tf.constant(bad))
        rows.append((int(code), bool(too_many), float(threshold)))
    return rows


@pytest.mark.parametrize("name", sorted(DECIDERS))
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_the_decision_in_tensorflow_equals_the_numpy_reference(name, mode):
    reference = DECIDERS[name]()
    expected = _numpy_decisions(reference)
    decider = DECIDERS[name]()
    got = _tf_decisions(decider, {"eager": None, "graph": False, "xla": True}[mode])
    assert [r[:2] for r in got] == [r[:2] for r in expected]  # codes and the consecutive-skip alarm: exactly
    np.testing.assert_allclose([r[2] for r in got], [r[2] for r in expected], rtol=1e-12)
    assert json.dumps(decider.state_dict()) == json.dumps(reference.state_dict()) or _close_states(
        decider.state_dict(), reference.state_dict())
    codes = {REASONS[r[0]] for r in expected}
    assert "ok" in codes and ("nonfinite" in codes or "zeroed" in codes)  # the sequence exercised them


def _close_states(a, b, rtol=1e-12):
    """Equal state dicts, floats to ``rtol`` (a running sum may round differently under XLA)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (a, b)
        return all(_close_states(a[k], b[k], rtol) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), (a, b)
        return all(_close_states(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, nan_ok=True), (a, b)
        return True
    assert a == b, (a, b)
    return True


def test_the_spike_decider_flags_the_spikes_it_should():
    # guards the sequence above against a change that would leave the spike branch unexercised
    rows = _numpy_decisions(DECIDERS["autoclip_spike"]())
    assert [i for i, r in enumerate(rows) if REASONS[r[0]] == "spike"] == [6, 13, 20]


def _step_fn(opt, model, jit):
    loss_fn = keras.losses.MeanSquaredError()

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return tf.function(step, jit_compile=jit)


def _model_and_opt(**kw):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    opt = gk.GradOptimizer(keras.optimizers.Adam(1e-2), **kw)
    opt.build(model.trainable_variables)
    return model, opt


def _batches(n=12, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(size=(8, 3)).astype(np.float32)
        if i == 5:
            x *= 200.0  # a spike
        out.append((x, np.sin(x.sum(1, keepdims=True))))
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_a_state_loaded_into_a_traced_step_gives_the_uninterrupted_decisions(jit):
    # The state lives in variables the traced step captured: load_state_dict() writes into them.
    model, opt = _model_and_opt(clip=ZClip(warmup_steps=3), spike=SpikeDetector(window=6, min_history=3))
    step = _step_fn(opt, model, jit)
    batches = _batches()
    for x, y in batches[:4]:
        step(x, y)
    saved, weights = copy.deepcopy(opt.guard.state_dict()), [w.numpy() for w in model.weights + opt.variables]
    first = []
    for x, y in batches[4:]:
        step(x, y)
        first.append((float(opt.threshold.numpy()), float(opt.last_skipped.numpy())))
    opt.guard.load_state_dict(saved)
    for v, w in zip(model.weights + opt.variables, weights):
        v.assign(w)
    again = []
    for x, y in batches[4:]:
        step(x, y)  # the same traced function: no retrace
        again.append((float(opt.threshold.numpy()), float(opt.last_skipped.numpy())))
    assert again == first
    assert sum(s for _, s in first) >= 1 and any(math.isfinite(t) for t, _ in first)  # a skip and a clip


def test_a_custom_xla_loop_records_the_error_and_check_raises_it():
    model, opt = _model_and_opt(action="raise")
    step = _step_fn(opt, model, True)
    x, y = _batches(1)[0]
    before = [w.numpy().copy() for w in model.weights]
    x = x.copy()
    x[0, 1] = np.nan
    step(x, y)  # XLA cannot raise in the step: it is skipped and the error recorded
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    with pytest.raises(gk.NonFiniteGradientError, match=r"non-finite gradient at step 1: first in variable "
                                                        r"'sequential(_\d+)?/dense(_\d+)?/kernel'"):
        opt.check()
    opt.check()  # raised once: nothing is left
    assert isinstance(opt.last_error, gk.NonFiniteGradientError)


def test_a_placed_policy_is_read_and_stepped_in_place():
    model, opt = _model_and_opt(clip=AutoClip(percentile=50, history_size=8))
    step = _step_fn(opt, model, False)
    for x, y in _batches(3):
        step(x, y)
    policy = opt.policy
    history = policy.history
    assert len(history) == 3 and policy.threshold() == pytest.approx(float(np.median(history)))
    policy.step(2.0)  # on the host, into the variables the traced step reads
    x, y = _batches(4)[3]
    step(x, y)
    assert len(policy.history) == 5 and policy.history[:4] == pytest.approx(history + [2.0])
    from gradtools.torch._ops import ops_on  # the same object cannot also live in PyTorch's tensors

    with pytest.raises(RuntimeError, match="AutoClip's state lives in tensorflow variables"):
        policy.arrays(ops_on("cpu"))


def test_fit_under_xla_takes_the_decisions_of_fit_without_it():
    script = os.path.join(HERE, "keras_xla.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(gk.__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_DETERMINISTIC")}
    env["PYTHONPATH"] = root  # the gradtools this test imported, in the subprocess too
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("determinism") is False
    paths = out.pop("paths")
    assert len(out) == 8
    for name, r in out.items():
        plain, xla = r["eager_graph"], r["xla"]
        assert plain["jit_compile"] is False and xla["jit_compile"] is True, name  # XLA really ran
        assert xla["iterations"] == plain["iterations"], name
        for key in ("skipped", "nonfinite"):
            assert xla[key] == plain[key], (name, key)
        for key in ("threshold", "norm", "layer"):  # float32 norms: XLA fuses the sums differently
            np.testing.assert_allclose(xla[key], plain[key], rtol=2e-5, atol=1e-5, err_msg=f"{name} {key}")
        _close_states(xla["state"], plain["state"], rtol=2e-5)
        for a, b in zip(xla["weights"], plain["weights"]):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        if plain["error"] is None:  # the logger's wrapper is gone; GradOptimizer's check stays, under XLA only
            assert plain["wrappers"] == [], name
            assert xla["error"] is None and xla["wrappers"] == ["_CheckedTrainFunction"], (name, xla["wrappers"])
        else:  # raised in the graph without XLA (wrapped), on the host after the batch under XLA (the original)
            assert plain["error"][0] == "UnknownError" and xla["error"][1] in plain["error"][1], (name, r)
    assert out["zclip_raise"]["xla"]["error"] == [
        "NonFiniteGradientError", "non-finite gradient at step 9: first in variable 'net/hidden/kernel' (49 "
        "non-finite entries in all)"]  # the NaN in batch 8 reaches the 8 x 4 weights of the first layer + 1 bias
    assert out["zclip_raise"]["xla"]["iterations"] == 8  # batch 8 (the 9th) raised; nothing after it ran
    assert out["fixed_spike_too_many"]["xla"]["error"][0] == "TooManySkipsError"
    # what the scenario exercised: a non-finite batch, a spike, clipping
    assert out["none_skip"]["xla"]["skipped"][8] == 1.0 and out["none_skip"]["xla"]["nonfinite"][8] > 0
    assert out["autoclip_zero_spike"]["xla"]["state"]["spike"]["spikes"] >= 1
    zclip = out["zclip_skip"]["xla"]
    assert any(t < n for t, n in zip(zclip["threshold"], zclip["norm"]) if math.isfinite(n))
    # where else Keras runs the step: the error comes after the call that ran the bad batch
    assert all(p["jit_compile"] is True for p in paths.values()), paths
    # four steps per call: the bad batch (the 9th) opens the third call, whose other steps then do nothing
    spe = paths["steps_per_execution"]
    assert spe["error"][0] == "NonFiniteGradientError" and "at step 9" in spe["error"][1]
    assert spe["iterations"] == 8 and spe["guard_steps"] == 9
    tob = paths["train_on_batch"]
    assert tob["error"][0] == "NonFiniteGradientError" and "at step 2" in tob["error"][1] and tob["iterations"] == 1
    custom = paths["custom_train_step"]
    assert custom["error"][0] == "TooManySkipsError" and custom["iterations"] == 0
    assert "skipped 2 consecutive steps (last at step 2" in custom["error"][1]
    assert paths["loss_scale"] == {"outer": "LossScaleOptimizer", "checked": "_CheckedTrainFunction",
                                   "jit_compile": True}
    assert paths["save_load"]["same_state"] is True and paths["save_load"]["steps"] == 48


def test_a_guard_in_a_custom_xla_step_clips_skips_and_records_as_without_xla():
    def run(jit):
        w = keras.Variable(np.zeros(2, np.float32), name="w")
        guard = gk.GradGuard(keras.optimizers.SGD(0.1), action="raise",
                             clipper=gk.Clipper(ZClip(warmup_steps=2, clip_option="mean")))
        step = tf.function(lambda g: guard.apply([g], [w]), jit_compile=jit)
        taken, error = [], None
        for g in ([3.0, 4.0], [6.0, 8.0], [30.0, 40.0], [math.nan, 1.0], [3.0, 4.0]):
            try:
                stepped = False
                stepped = bool(step(tf.constant(g)))
                guard.check_recorded()  # under XLA the error comes here; without, from the step
            except (gk.NonFiniteGradientError, tf.errors.UnknownError) as exc:
                error = str(exc)
            taken.append(stepped)
        return w.numpy(), taken, error, guard.state_dict()

    w_plain, taken_plain, error_plain, state_plain = run(False)
    w_xla, taken_xla, error_xla, state_xla = run(True)
    assert taken_xla == taken_plain == [True, True, True, False, True]
    # the spike [30, 40] is clipped to the EMA mean of the norms (7.5): w moved by 0.1 * (3 + 6 + 4.5 + 3, ...)
    np.testing.assert_allclose(w_xla, [-1.65, -2.2], rtol=1e-6)
    np.testing.assert_allclose(w_xla, w_plain, rtol=1e-6)
    assert error_xla == "non-finite gradient at step 4: first in variable 'w' (1 non-finite entries in all)"
    assert error_xla in error_plain  # without XLA the same message, raised in the graph
    _close_states(state_xla, state_plain)
