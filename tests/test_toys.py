"""The chapter experiments' building blocks agree across PyTorch, Keras and NumPy."""

import numpy as np
import pytest
import torch

import gradtools.keras as gk
import gradtools.torch as gt
from gradtools import data, maths, models


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_quadratic_runs_agree_with_numpy(momentum, nesterov):
    A, _ = data.random_quadratic(dim=3, condition=8.0, seed=2)
    x0 = np.array([1.0, -0.5, 0.3])
    for lr in (0.05, 0.2, 0.3):
        ref = maths.gd_quadratic(A, x0, lr, 100, momentum, nesterov)
        expected = np.linalg.norm(ref[-1]) / np.linalg.norm(x0)
        assert gt.sgd_on_quadratic(A, x0, lr, 100, momentum, nesterov) == pytest.approx(expected, rel=1e-5)
        assert gk.sgd_on_quadratic(A, x0, lr, 100, momentum, nesterov) == pytest.approx(expected, rel=1e-5)


def test_rnn_input_gradients_agree_and_scale_with_spectral_radius():
    x, y = data.adding_problem(n=16, length=30, seed=0)
    norms = {}
    for rho in (0.7, 1.5):
        w = models.init_rnn(2, 24, spectral_radius=rho, seed=0, input_scale=0.01)
        t = gt.rnn_input_gradients(w, x, y)
        k = gk.rnn_input_gradients(w, x, y)
        np.testing.assert_allclose(t, k, rtol=1e-4)
        norms[rho] = t
    assert norms[0.7][0] < 1e-3 * norms[0.7][-1]  # vanishes towards early steps
    assert norms[1.5][0] > 10 * norms[1.5][-1]  # grows towards early steps


def test_batchnorm_and_dropout_layouts_match():
    w = models.init_mlp([5, 8, 8, 2], seed=0)
    tm = gt.mlp(w, norm="batch", dropout=0.2)
    km = gk.mlp(w, norm="batch", dropout=0.2)
    assert [type(m).__name__ for m in tm] == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert [type(layer).__name__ for layer in km.layers] == ["Dense", "BatchNormalization", "Activation", "Dropout"] * 2 + ["Dense"]
    x = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)
    tm.eval()
    np.testing.assert_allclose(tm(torch.from_numpy(x)).detach().numpy(), km(x, training=False).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init, factor", [("normal", 32 ** 0.5), ("xavier", 0.5 ** 0.5), ("he", 1.0)])
def test_activation_gradients_follow_the_product_of_jacobians(init, factor):
    x, y = data.digits(one_hot=True)
    w = models.init_mlp([64] + [128] * 8 + [10], init=init, seed=0)
    t = gt.activation_gradients(gt.mlp(w), x[:512], y[:512])
    k = gk.activation_gradients(gk.mlp(w), x[:512], y[:512])
    np.testing.assert_allclose(k, t, rtol=1e-3)
    growth = (t[0] / t[-1]) ** (1 / (len(t) - 1))  # per layer, towards the input
    # sqrt(n sigma^2 / 2) per layer; N(0, 1) at width 128 gives sqrt(64) = 8, not the width-64 figure
    assert growth == pytest.approx(factor * 2 ** 0.5 if init == "normal" else factor, rel=0.25)
