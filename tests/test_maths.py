"""NumPy toys: thresholds measured against theory, the RNN cliff's gradient, data generators."""

import math

import numpy as np
import pytest

from gradtools import data, maths, models


@pytest.mark.parametrize("seed", range(5))
def test_gd_threshold_is_two_over_lambda_max(seed):
    A, eig = data.random_quadratic(dim=6, condition=20.0, seed=seed)
    measured = maths.bisect_threshold(lambda lr: maths.quadratic_diverges(A, lr), 0.01, 1.0)
    assert measured == pytest.approx(maths.stability_threshold(eig.max()), rel=1e-2)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_momentum_thresholds(beta):
    A, eig = data.random_quadratic(dim=4, condition=10.0, seed=1)
    heavy = maths.bisect_threshold(lambda lr: maths.quadratic_diverges(A, lr, momentum=beta, steps=4000), 0.01, 2.0)
    assert heavy == pytest.approx(maths.stability_threshold(eig.max(), beta), rel=1e-2)
    nag = maths.bisect_threshold(lambda lr: maths.quadratic_diverges(A, lr, momentum=beta, nesterov=True, steps=4000),
                                 0.01, 2.0)
    assert nag == pytest.approx(maths.nesterov_threshold(eig.max(), beta), rel=1e-2)
    assert nag < maths.stability_threshold(eig.max())  # below plain GD's bound


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
@pytest.mark.parametrize("lr", [0.05, 0.13, 0.19, 0.25, 0.4])
def test_quadratic_diverges_agrees_with_the_iterates(momentum, nesterov, lr):
    # quadratic_diverges jumps to the last iterate by repeated squaring; the verdict
    # must be the one the step-by-step trajectory gives.
    A, _ = data.random_quadratic(dim=5, condition=10.0, seed=3)
    A = A * (10.0 / np.linalg.eigvalsh(A).max())
    x0 = np.random.default_rng(0).standard_normal(5)
    for steps in (0, 1, 7, 300):
        end = maths.gd_quadratic(A, x0, lr, steps, momentum, nesterov)[-1]
        with np.errstate(over="ignore", invalid="ignore"):
            expected = not np.isfinite(np.linalg.norm(end)) or np.linalg.norm(end) > np.linalg.norm(x0)
        assert maths.quadratic_diverges(A, lr, momentum, nesterov, steps=steps) == expected


def test_quadratic_diverges_bad_input():
    with pytest.raises(ValueError, match="steps"):
        maths.quadratic_diverges(np.eye(2), 0.1, steps=-1)
    with pytest.raises(ValueError, match="momentum"):
        maths.quadratic_diverges(np.eye(2), 0.1, momentum=1.0)
    with pytest.raises(ValueError, match="A"):
        maths.quadratic_diverges(np.ones((2, 3)), 0.1)


def test_bisect_needs_a_bracket():
    with pytest.raises(ValueError, match="low=1.0 must converge and high=2.0 must diverge"):
        maths.bisect_threshold(lambda lr: True, 1.0, 2.0)


def test_rnn_cliff_gradient_matches_finite_differences():
    w, b = np.array([2.0, 5.0, 7.0]), np.array([-1.0, -2.5, -3.3])
    loss, gw, gb = maths.rnn_cliff(w, b, steps=10)
    h = 1e-6
    fw = (maths.rnn_cliff(w + h, b, steps=10)[0] - maths.rnn_cliff(w - h, b, steps=10)[0]) / (2 * h)
    fb = (maths.rnn_cliff(w, b + h, steps=10)[0] - maths.rnn_cliff(w, b - h, steps=10)[0]) / (2 * h)
    np.testing.assert_allclose(gw, fw, rtol=1e-5)
    np.testing.assert_allclose(gb, fb, rtol=1e-5)


def test_init_rnn_spectral_radius_and_adding_problem():
    w = models.init_rnn(2, 16, spectral_radius=1.3, seed=0)
    np.testing.assert_allclose(np.abs(np.linalg.eigvals(w["W_rec"].astype(np.float64))), 1.3, rtol=1e-5)
    x, y = data.adding_problem(n=8, length=20, seed=0)
    assert x.shape == (8, 20, 2) and (x[:, :, 1].sum(axis=1) == 2).all()
    np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * x[:, :, 1]).sum(axis=1), rtol=1e-6)


def test_divergence_step_and_bad_input():
    assert maths.divergence_step([1.0, 2.0]) is None and maths.divergence_step([1.0, 2e6]) == 1
    with pytest.raises(ValueError, match="lambda_max must be a positive finite number, got 0"):
        maths.stability_threshold(0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\), got 1.0"):
        maths.nesterov_threshold(1.0, 1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        models.init_mlp([2, 2], init="glorot")
    with pytest.raises(ValueError, match="condition must be >= 1"):
        data.random_quadratic(3, condition=0.5)
    assert maths.power_iteration(lambda v: [2.0 * v[0]], [(3,)], iters=5) == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_lr_range_suggestion_resists_batch_noise(seed):
    # A flat loss with large batch-to-batch noise up to lr 0.01, a real descent up to lr 0.5,
    # then divergence: the suggestion must land in the descent, whatever the noise.
    from gradtools.lr_range import RangeSweep

    rng = np.random.default_rng(seed)
    sweep = RangeSweep(1e-4, 10.0, 50)
    for i in range(50):
        lr = sweep.lr(i)
        trend = 5.0 if lr < 0.01 else max(5.0 - 4.0 * np.log(lr / 0.01) / np.log(50), 1.0)
        if lr > 0.7:
            trend = 1.0 + 50 * (lr - 0.7)
        noise = rng.normal(0, 2.0) if lr < 0.01 else rng.normal(0, 0.1)
        if sweep.record(max(trend + noise, 0.01)):
            break
    r = sweep.result()
    assert 0.01 <= r.suggested_lr <= 0.1, r.suggested_lr
    assert r.diverged_at is not None and r.steepest_lr is not None


def test_max_abs_diff_of_weight_lists():
    from gradtools.maths import max_abs_diff

    a = [np.ones((2, 3), np.float32), np.zeros(3)]
    b = [np.ones((2, 3)), np.array([0.0, -0.25, 0.1])]
    assert max_abs_diff(a, b) == 0.25 and max_abs_diff(a, a) == 0.0
    assert math.isnan(max_abs_diff(a, [b[0], np.array([0.0, np.nan, 0.0])]))
    with pytest.raises(ValueError, match=r"a\[1\] has shape \(3,\) but b\[1\] has shape \(2,\)"):
        max_abs_diff(a, [b[0], np.zeros(2)])
    with pytest.raises(ValueError, match="mine has 2 arrays but theirs has 1"):
        max_abs_diff(a, b[:1], names=("mine", "theirs"))
