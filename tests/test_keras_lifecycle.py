"""GradientLogger and GradOptimizer through a Keras model's life cycle.

Every model style Keras users have (Sequential with and without ``Input``,
functional with a shared layer, subclassed before and after its first call, a
custom ``train_step``) goes through every life cycle (evaluate before and after
fit with validation; compile-fit-recompile; freeze-unfreeze with the same
optimizer; save-load-continue under ``mixed_float16``), once with a
``GradientLogger`` on every fit and once without. Apart from the statistics the
logger adds to the training logs, the two runs must be the same: the same
weights bit for bit, the same losses, the same evaluation results.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gradtools.runtime import import_keras

keras = import_keras()

import gradtools.keras as gk  # noqa: E402
from gradtools.keras.monitor import GLOBAL_KEYS  # noqa: E402
from keras_workflows import LIFECYCLES, STYLES, X, Y, grad_optimizer, run, trainable_layer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = len(X) // 16  # optimizer steps per epoch in the workflows


def _statistics_keys(keys):
    return {k for k in keys if k in GLOBAL_KEYS or k.startswith("grad_norm_mean/")}


@pytest.mark.parametrize("lifecycle", LIFECYCLES)
@pytest.mark.parametrize("style", list(STYLES))
def test_the_logger_changes_nothing_but_the_statistics_it_adds(style, lifecycle):
    plain, logged = run(style, lifecycle, logger=False), run(style, lifecycle, logger=True)
    for a, b in zip(plain.weights(), logged.weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # evaluate() gives the loss alone, as in plain Keras, before and after a logged fit
    assert all(isinstance(e, float) for e in logged.evaluations)
    assert logged.evaluations == plain.evaluations
    for i, (p, q, rows) in enumerate(zip(plain.fits, logged.fits, logged.loggers, strict=True)):
        added = set(q) - set(p)
        assert {k: q[k] for k in p} == p, f"fit {i}: the logger changed what plain Keras logs"
        if rows is None:  # a fit without the logger: nothing of it left behind
            assert added == set(), f"fit {i}: {sorted(added)} without a logger"
            continue
        assert added == _statistics_keys(q) and set(GLOBAL_KEYS) <= added, sorted(added)
        assert not any(k.startswith("val_") for k in added)  # no validation gradients
        epochs = len(p["loss"])
        assert len(rows["grad_norm"]) == epochs * STEPS
        assert rows["skipped_steps"][-1] == 0.0
        assert all(n > 0 and math.isfinite(n) for n in rows["grad_norm"])
    if lifecycle == "recompile":  # each fit reports the optimizer it was compiled with
        assert logged.fits[0]["clip_threshold"] == [1.0]
        assert logged.fits[1]["clip_threshold"] == [pytest.approx(0.01)]
        assert logged.fits[1]["grad_norm_clipped"] == [pytest.approx(0.01, rel=1e-4)]
    if lifecycle == "freeze":  # the frozen layer's variables had no gradient in the second fit
        frozen = {f"grad_norm/{v.path}" for v in trainable_layer(logged.model).weights}
        rows = logged.loggers[1]
        zero = {k for k in rows if k.startswith("grad_norm/") and not any(rows[k])}
        moving = {k for k in rows if k.startswith("grad_norm/") and all(rows[k])}
        assert zero == frozen and len(zero) + len(moving) == len(logged.model.weights)


def test_evaluate_after_a_logged_fit_is_plain_keras_whether_or_not_it_ran_before():
    results = []
    for evaluate_first in (False, True):
        keras.utils.set_random_seed(0)
        model = STYLES["sequential"]()
        model.compile(optimizer=grad_optimizer(), loss="mse", jit_compile=False)
        if evaluate_first:  # its test function is traced before the logger ever ran
            model.evaluate(X, Y, verbose=0)
        model.fit(X, Y, batch_size=16, shuffle=False, verbose=0, callbacks=[gk.GradientLogger()])
        results.append(model.evaluate(X, Y, verbose=0, return_dict=True))
    assert results[0] == results[1] and set(results[0]) == {"loss"}


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, hook):
        super().__init__()
        setattr(self, hook, self.stop)

    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt("stopped by hand")


@pytest.mark.parametrize("where", ["train step", "on_epoch_begin", "on_train_batch_end", "on_epoch_end"])
def test_an_interrupted_logged_fit_leaves_later_fits_plain(where):
    # Keras calls no on_train_end when an exception ends fit(): nothing of the logger may stay
    keras.utils.set_random_seed(0)
    model = STYLES["sequential"]()
    model.compile(optimizer=gk.GradOptimizer(keras.optimizers.SGD(0.1), action="raise"), loss="mse",
                  jit_compile=False)
    x = X.copy()
    if where == "train step":
        x[20] = np.nan
        callbacks, error = [gk.GradientLogger()], "non-finite"
    else:
        callbacks, error = [gk.GradientLogger(), _Interrupt(where)], "stopped by hand"
    with pytest.raises((Exception, KeyboardInterrupt), match=error):
        model.fit(x, Y, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks)
    assert set(model.train_on_batch(X[:16], Y[:16], return_dict=True)) == {"loss"}
    history = model.fit(X, Y, batch_size=16, verbose=0)
    assert set(history.history) == {"loss"}
    history = model.fit(X, Y, batch_size=16, verbose=0, callbacks=[gk.GradientLogger()])
    assert set(GLOBAL_KEYS) <= set(history.history)


def test_the_optimizer_builds_once_whoever_asks():
    opt = grad_optimizer()
    model = STYLES["sequential"]()
    opt.build(model.trainable_variables)
    count = len(opt.variables)
    opt.build(model.trainable_variables)
    wrapped = keras.optimizers.LossScaleOptimizer(opt)
    wrapped.build(model.trainable_variables)  # builds its inner optimizer again
    assert len(opt.variables) == count


@pytest.mark.parametrize("style", list(STYLES))
def test_mixed_precision_save_load_continue_equals_the_uninterrupted_run(style):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "keras_workflows.py"), "mixed", style],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["warnings"] == []
    for kind in ("plain", "logged"):
        whole, resumed = out[kind]["whole"], out[kind]["resumed"]
        assert resumed["optimizer"] == whole["optimizer"] == "LossScaleOptimizer"
        assert resumed["variables"] == whole["variables"]
        assert resumed["loss_scale"] == whole["loss_scale"]
        assert resumed["zclip"] == whole["zclip"]
        assert resumed["weights"] == whole["weights"], f"{kind}: the resumed run drifted"
        assert resumed["last_fit"] == whole["last_fit"]
        assert resumed["last_logger"] == whole["last_logger"]
    assert out["logged"]["resumed"]["weights"] == out["plain"]["resumed"]["weights"]
    assert len(out["logged"]["resumed"]["last_logger"]["grad_norm"]) == STEPS
