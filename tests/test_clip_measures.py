"""Chapter 5's tools in both backends: the angle a clip turns the gradient by, AGC's
per-unit ratios, ``train(clip=, agc=)``, and the RNN twins training alike."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradtools.keras as gk
import gradtools.torch as gt
from gradtools.data import adding_problem, digits
from gradtools.maths import angle_between
from gradtools.models import init_mlp, init_rnn
from gradtools.policies import AutoClip, FixedThreshold, ZClip

import keras  # noqa: E402  (after gradtools.keras, which imports it quietly)


# ----------------------------------------------------------------- the angle
def test_angle_between_known_angles():
    assert angle_between([np.array([1.0, 0.0])], [np.array([3.0, 3.0])]) == pytest.approx(45.0, abs=1e-12)
    assert angle_between(np.array([1.0, 2.0]), np.array([-1.0, -2.0])) == pytest.approx(180.0, abs=1e-12)
    assert angle_between([np.ones(2)], [np.array([1.0, -1.0])]) == pytest.approx(90.0, abs=1e-12)


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=20), st.floats(1e-6, 1e6))
def test_angle_of_a_rescaled_gradient_is_zero(values, scale):
    g = np.array(values)
    if not np.any(g):
        return
    assert angle_between([g], [g * scale]) < 1e-5


def test_angle_between_refuses_what_has_no_direction():
    with pytest.raises(ValueError, match="b is zero"):
        angle_between([np.ones(3)], [np.zeros(3)])
    with pytest.raises(ValueError, match="after is zero"):
        angle_between([np.ones(3)], [np.zeros(3)], names=("before", "after"))
    with pytest.raises(ValueError, match="a has non-finite"):
        angle_between([np.array([np.nan, 1.0])], [np.ones(2)])
    with pytest.raises(ValueError, match="a has 3 entries but b has 2"):
        angle_between([np.ones(3)], [np.ones(2)])
    with pytest.raises(ValueError, match="a is empty"):
        angle_between([], [np.ones(2)])


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    # three "layers" of very different scales, as a deep net's gradients are
    return [rng.standard_normal((8, 4)).astype(np.float32) * 10,
            rng.standard_normal(4).astype(np.float32),
            rng.standard_normal((4, 2)).astype(np.float32) * 0.1]


def test_direction_change_of_each_clip_in_both_frameworks():
    g = _grads()
    tg = [torch.from_numpy(a.copy()) for a in g]
    kg = [keras.ops.convert_to_tensor(a) for a in g]
    # global norm: a rescaling, no turn
    clipped_t = [t.clone() for t in tg]
    params = []
    for t in clipped_t:
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t
        params.append(p)
    gt.clip_grad_norm_(params, 1.0)
    assert gt.direction_change(tg, [p.grad for p in params]) < 1e-4
    assert gk.direction_change(kg, gk.clip_grad_norm(kg, 1.0)[0]) < 1e-4
    # value clipping and Keras clipnorm (per variable) turn it, the same in both frameworks
    for p in params:
        p.grad = None
    for p, t in zip(params, tg):
        p.grad = t.clone()
    gt.clip_grad_value_(params, 0.5)
    turn_t = gt.direction_change(tg, [p.grad for p in params])
    turn_k = gk.direction_change(kg, gk.clip_grad_value(kg, 0.5))
    assert turn_t > 5 and turn_k == pytest.approx(turn_t, rel=1e-6)
    per_var = gk.compare_clipping(g, 1.0)["keras clipnorm"]["grads"]
    assert gk.direction_change(kg, per_var) > 5


def test_direction_change_names_a_bad_argument():
    with pytest.raises(TypeError, match=r"before\[0\] must be a tensor, got float"):
        gt.direction_change([1.0], [torch.ones(1)])
    with pytest.raises(TypeError, match="after must be a tensor or a list of tensors, got NoneType"):
        gt.direction_change([torch.ones(1)], None)
    with pytest.raises(TypeError, match=r"before\[1\] must be a tensor, got NoneType \(a parameter without"):
        gt.direction_change([torch.ones(1), None], [torch.ones(1)])
    with pytest.raises(ValueError, match="after is zero"):
        gt.direction_change([torch.ones(2)], [torch.zeros(2)])
    with pytest.raises(TypeError, match=r"after\[0\] is None"):
        gk.direction_change([np.ones(2)], None)
    with pytest.raises(TypeError, match=r"before\[0\] must be a tensor or an array, got str"):
        gk.direction_change("abc", [np.ones(2)])


# ----------------------------------------------------------------- AGC's ratios
def _linear_pair(seed=0):
    w = init_mlp([6, 5, 3], init="he", seed=seed)
    x, y = np.random.default_rng(seed).standard_normal((16, 6)).astype(np.float32), np.zeros((16, 3), np.float32)
    tm, km = gt.mlp(w), gk.mlp(w)
    torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    kg = gk.loss_gradients(km, x, y)
    return tm, km, kg


def test_unit_ratios_match_across_frameworks_and_predict_agc():
    tm, km, kg = _linear_pair()
    rt, rk = gt.unit_ratios(tm), gk.unit_ratios(kg, km.trainable_variables)
    assert list(rt) == [n for n, _ in tm.named_parameters()]
    assert len(rk) == len(rt)
    for a, b in zip(rt.values(), rk.values()):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    all_t = np.concatenate(list(rt.values()))
    c = float(np.median(all_t))   # about half the units over the factor
    expected = int(np.sum(all_t > c))
    assert 0 < expected < all_t.size
    assert int(gt.adaptive_clip_grad_(tm, c)) == expected
    assert int(gk.adaptive_clip_grad(kg, km.trainable_variables, c)[1]) == expected


def test_unit_ratios_check_arguments():
    tm, km, kg = _linear_pair()
    with pytest.raises(ValueError, match="eps"):
        gt.unit_ratios(tm, eps=0)
    with pytest.raises(ValueError, match="grads has 1 tensors but variables has 4"):
        gk.unit_ratios(kg[:1], km.trainable_variables)
    swapped = [kg[0], kg[3], kg[2], kg[1]]            # two biases of different sizes swapped
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(3,\) but its variable .*bias' has shape \(5,\)"):
        gk.unit_ratios(swapped, km.trainable_variables)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        gk.adaptive_clip_grad(swapped, km.trainable_variables, 0.1)
    with pytest.raises(TypeError, match="variables must be a Model, a layer or a list of variables, got str"):
        gk.unit_ratios(kg, "abc")


# ----------------------------------------------------------------- train(clip=, agc=)
X, Y = digits(one_hot=True)
X, Y = X[:200], Y[:200]
W = init_mlp([64, 32, 32, 10], init="normal", seed=0)   # large gradients: every step clipped


def test_torch_train_clip_is_clip_grad_norm_in_the_loop():
    a, b = gt.mlp(W), gt.mlp(W)
    trace = gt.train(a, torch.optim.SGD(a.parameters(), lr=0.05), X, Y, steps=15, clip=1.0)
    opt = torch.optim.SGD(b.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(X), torch.from_numpy(Y)
    norms = []
    for _ in range(15):
        opt.zero_grad()
        torch.nn.functional.mse_loss(b(xt), yt).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)))
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    np.testing.assert_allclose(trace.grad_norms, norms, rtol=1e-6)
    assert trace.thresholds == [1.0] * 15 and trace.clipped == [n > 1.0 for n in norms]


def test_keras_train_clip_is_global_clipnorm():
    a, b = gk.mlp(W), gk.mlp(W)
    trace = gk.train(a, keras.optimizers.SGD(0.05), X, Y, steps=15, clip=1.0)
    plain = gk.train(b, keras.optimizers.SGD(0.05, global_clipnorm=1.0), X, Y, steps=15)
    for p, q in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trace.losses, plain.losses, rtol=1e-5)
    assert all(trace.clipped) and plain.thresholds == [math.inf] * 15 and plain.clipped == [False] * 15


@pytest.mark.parametrize("clip, agc", [(1.0, None), ("autoclip", None), (None, 0.05), (3.0, 0.05)])
def test_train_with_clipping_takes_the_same_decisions_in_both_frameworks(clip, agc):
    def policy():
        return AutoClip(50) if clip == "autoclip" else clip

    tm, km = gt.mlp(W), gk.mlp(W)
    t = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.05), X, Y, steps=12, clip=policy(), agc=agc)
    k = gk.train(km, keras.optimizers.SGD(0.05), X, Y, steps=12, clip=policy(), agc=agc)
    np.testing.assert_allclose(k.losses, t.losses, rtol=1e-4)
    assert k.clipped == t.clipped
    np.testing.assert_allclose(k.thresholds, t.thresholds, rtol=1e-4)
    assert len(t.thresholds) == 12 and (clip is None) == (t.thresholds == [math.inf] * 12)


def test_train_agc_scales_units_down():
    tm = gt.mlp(W)
    trace = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.05), X, Y, steps=3, agc=1e-4)
    assert trace.clipped == [True] * 3 and trace.thresholds == [math.inf] * 3


def test_train_clip_arguments_are_checked():
    tm, km = gt.mlp(W), gk.mlp(W)
    topt, kopt = torch.optim.SGD(tm.parameters(), lr=0.1), keras.optimizers.SGD(0.1)
    for train, m, o in ((gt.train, tm, topt), (gk.train, km, kopt)):
        with pytest.raises(ValueError, match="clip must be a positive finite number, got -1.0"):
            train(m, o, X, Y, steps=1, clip=-1.0)
        with pytest.raises(ValueError, match="agc"):
            train(m, o, X, Y, steps=1, agc=0.0)
        with pytest.raises(ValueError, match="normalize=True divides"):
            train(m, o, X, Y, steps=1, clip=1.0, normalize=True)


def test_the_policy_passed_is_the_one_used():
    for policy in (ZClip(warmup_steps=3), FixedThreshold(1.0)):
        tm = gt.mlp(W)
        gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.01), X, Y, steps=5, clip=policy)
        assert policy.steps == 5
        gk.train(gk.mlp(W), keras.optimizers.SGD(0.01), X, Y, steps=4, clip=policy)
        assert policy.steps == 9


# ----------------------------------------------------------------- the RNN twins
def test_rnn_twins_train_alike_with_clipping():
    x, y = adding_problem(n=64, length=20, seed=0)
    w = init_rnn(2, 16, spectral_radius=1.5, seed=0, input_scale=0.5)
    tm, km = gt.rnn(w), gk.rnn(w)
    t = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.1), x, y, steps=20, clip=1.0)
    k = gk.train(km, keras.optimizers.SGD(0.1), x, y, steps=20, clip=1.0)
    np.testing.assert_allclose(k.losses, t.losses, rtol=1e-4)
    np.testing.assert_allclose(k.grad_norms, t.grad_norms, rtol=1e-4)
    assert k.clipped == t.clipped and any(t.clipped)
    assert sum(p.numel() for p in tm.parameters() if p.requires_grad) == km.count_params()


class _Ramp(FixedThreshold):
    """A subclass whose threshold grows: not the constant FixedThreshold promises."""

    def step(self, norm):
        super().step(norm)
        return self.max_norm * min(1.0, 0.25 * self.steps)


def test_a_fixed_threshold_subclass_is_asked_every_step_in_keras_too():
    tm, km = gt.mlp(W), gk.mlp(W)
    t = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.05), X, Y, steps=4, clip=_Ramp(1.0))
    k = gk.train(km, keras.optimizers.SGD(0.05), X, Y, steps=4, clip=_Ramp(1.0))
    assert t.thresholds == k.thresholds == [0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(k.update_norms, t.update_norms, rtol=1e-4)
    np.testing.assert_allclose(t.update_norms, [0.05 * c for c in t.thresholds], rtol=1e-4)


def test_torch_train_records_the_finite_norm_of_a_gradient_whose_square_overflows_float32():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x, y = np.full((1, 1), 1e10, np.float32), np.zeros((1, 1), np.float32)   # gradient 2e20
    t = gt.train(lin, torch.optim.SGD(lin.parameters(), lr=1e-30), x, y, steps=1, clip=1e30)
    assert t.grad_norms[0] == pytest.approx(2e20, rel=1e-6) and t.clipped == [False]
    lin2 = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin2.weight.fill_(1.0)
    n = gt.train(lin2, torch.optim.SGD(lin2.parameters(), lr=0.5), x, y, steps=1, normalize=True)
    assert n.update_norms[0] == pytest.approx(0.5, rel=1e-6)   # a unit step, not a zero one


def test_trace_without_clipping_has_one_threshold_and_decision_per_step():
    tm = gt.mlp(W)
    t = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.05), X, Y, steps=3)
    assert t.thresholds == [math.inf] * 3 and t.clipped == [False] * 3
