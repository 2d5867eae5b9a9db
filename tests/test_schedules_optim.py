"""Schedules, warm-up and optimisers: the same rates and the same updates in both frameworks."""

import math
import pickle

import numpy as np
import pytest
import torch

import gradtools.keras as gk
import gradtools.torch as gt
from gradtools.data import digits
from gradtools.models import init_mlp
from gradtools.optim import OPTIMIZER_NAMES, adam_step_bound, spike_gradients
from gradtools.report import outcome
from gradtools.schedules import one_cycle, warmup_factor

import keras  # noqa: E402  (after gradtools.keras, which imports it quietly)
STEPS = 60


def _opt(lr=0.5):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=lr)


# Each PyTorch scheduler and its Keras equivalent, both starting at lr 0.5.
PAIRS = {
    "step": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
             lambda: keras.optimizers.schedules.ExponentialDecay(0.5, 7, 0.5, staircase=True)),
    "exponential": (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
                    lambda: keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.95)),
    "cosine": (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
               lambda: keras.optimizers.schedules.CosineDecay(0.5, STEPS)),
    "one-cycle": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=STEPS,
                                                                cycle_momentum=False),
                  lambda: gk.OneCycle(0.5, STEPS)),
}


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("warmup", [0, 10])
def test_torch_and_keras_schedules_give_the_same_rate_at_every_step(kind, warmup):
    make_torch, make_keras = PAIRS[kind]
    opt = _opt()
    torch_rates = gt.learning_rates(gt.Warmup(opt, warmup, after=make_torch(opt)), STEPS)
    keras_rates = gk.learning_rates(gk.Warmup(make_keras(), warmup), STEPS)
    # Keras computes in float32: 2e-5 relative, 1e-7 absolute (rates run up to 0.5).
    np.testing.assert_allclose(keras_rates, torch_rates, rtol=2e-5, atol=1e-7)
    # The warm-up multiplies the schedule's own rates, recursive ones (ExponentialLR) included.
    plain = gt.learning_rates(make_torch(_opt()), STEPS)
    np.testing.assert_allclose(torch_rates, warmup_factor(np.arange(STEPS), warmup) * plain, rtol=1e-12)


def test_one_cycle_formula_is_torchs_one_cycle_lr():
    opt = _opt()
    rates = gt.learning_rates(torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2.0, total_steps=40, pct_start=0.25, div_factor=10, final_div_factor=100,
        cycle_momentum=False), 40)
    np.testing.assert_allclose(one_cycle(np.arange(40.0), 2.0, 40, 0.25, 10, 100), rates, rtol=1e-12)
    assert rates.argmax() == 9 and rates[0] == pytest.approx(0.2) and rates[-1] == pytest.approx(0.002)


def test_warmup_without_an_inner_schedule_ramps_to_the_optimizers_rate():
    rates = gt.learning_rates(gt.Warmup(_opt(0.8), 4), 6)
    np.testing.assert_allclose(rates, [0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    np.testing.assert_allclose(gk.learning_rates(gk.Warmup(0.8, 4), 6), rates, rtol=1e-6)


def test_torch_warmup_resumes_from_its_state_dict(tmp_path):
    opt = _opt()
    sched = gt.Warmup(opt, 10, after=torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9))
    gt.learning_rates(sched, 6)
    path = tmp_path / "sched.pt"
    torch.save(sched.state_dict(), path)
    expected = gt.learning_rates(sched, 12)

    opt2 = _opt()
    resumed = gt.Warmup(opt2, 10, after=torch.optim.lr_scheduler.ExponentialLR(opt2, gamma=0.9))
    resumed.load_state_dict(torch.load(path, weights_only=False))
    # A resumed run restores the optimizer too; its rate is the one the scheduler last set.
    opt2.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    np.testing.assert_allclose(gt.learning_rates(resumed, 12), expected, rtol=1e-12)
    assert b"SGD" not in pickle.dumps(sched.state_dict())  # the state holds no optimizer
    with pytest.raises(ValueError, match="inner scheduler"):
        gt.Warmup(_opt(), 10).load_state_dict(sched.state_dict())


def test_torch_warmup_trains_like_the_same_rates_set_by_hand():
    weights = init_mlp([5, 8, 2], seed=1)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")
    m1, m2 = gt.mlp(weights), gt.mlp(weights)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1)
    sched = gt.Warmup(o1, 5, after=torch.optim.lr_scheduler.StepLR(o1, 3, 0.5))
    t1 = gt.train(m1, o1, x, y, 12, scheduler=sched)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    rates = warmup_factor(np.arange(12), 5) * 0.1 * 0.5 ** (np.arange(12) // 3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda s: rates[s] / 0.1 if s < 12 else 1.0)
    t2 = gt.train(m2, o2, x, y, 12, scheduler=sched2)
    np.testing.assert_allclose(t1.lrs, rates, rtol=1e-12)
    np.testing.assert_allclose(t1.losses, t2.losses, rtol=1e-6)


def test_keras_warmup_and_one_cycle_save_and_load_with_the_model(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    inner = keras.optimizers.schedules.CosineDecay(0.3, 50)
    model.compile(optimizer=keras.optimizers.SGD(gk.Warmup(inner, 5)), loss="mse")
    x = np.ones((8, 3), "float32")
    model.fit(x, x.sum(1), epochs=1, batch_size=4, verbose=0)  # two steps
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    schedule = loaded.optimizer._learning_rate
    assert isinstance(schedule, gk.Warmup) and isinstance(schedule.schedule, keras.optimizers.schedules.CosineDecay)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(float(model.optimizer.learning_rate))
    assert int(loaded.optimizer.iterations) == 2
    cycle = gk.OneCycle.from_config(gk.OneCycle(1.0, 20, pct_start=0.4).get_config())
    np.testing.assert_allclose(gk.learning_rates(cycle, 20), one_cycle(np.arange(20.0), 1.0, 20, 0.4), rtol=1e-5)


def test_schedules_refuse_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got -1"):
        gt.Warmup(_opt(), -1)
    with pytest.raises(ValueError, match="warmup_steps"):
        gk.Warmup(0.1, -3)
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        gk.Warmup(0.1, 2.5)
    with pytest.raises(ValueError, match="schedule must be a positive finite number, got -0.1"):
        gk.Warmup(-0.1, 3)
    other = _opt()
    with pytest.raises(ValueError, match="same optimizer"):
        gt.Warmup(_opt(), 3, after=torch.optim.lr_scheduler.ExponentialLR(other, 0.9))
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        o = _opt()
        gt.Warmup(o, 3, after=torch.optim.lr_scheduler.ReduceLROnPlateau(o))
    with pytest.raises(ValueError, match="pct_start"):
        gk.OneCycle(1.0, 10, pct_start=1.5)
    with pytest.raises(ValueError, match="max_lr must be a positive finite number, got 0"):
        gk.OneCycle(0, 10)
    with pytest.raises(ValueError, match="both phases"):
        one_cycle(0, 1.0, 3, pct_start=0.1)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_each_optimizer_makes_the_same_updates_in_both_frameworks(name):
    g = spike_gradients(steps=80, dim=12, spike_at=40, factor=1000.0, seed=3)
    t = gt.update_sizes(name, g, lr=0.01)
    k = gk.update_sizes(name, g, lr=0.01)
    np.testing.assert_allclose(k, t, rtol=1e-4)
    if name == "sgd":
        # float64 weights: the step's length keeps its digits however far w has gone.
        np.testing.assert_allclose(t, 0.01 * np.linalg.norm(g.astype(np.float64), axis=1), rtol=1e-12)


def test_epsilon_inside_or_outside_the_root_agrees_for_tiny_gradients():
    # sqrt(v) + eps in PyTorch, sqrt(v + eps^2) in Keras: within sqrt(2) even when sqrt(v) ~ eps.
    g = spike_gradients(steps=20, dim=4, spike_at=10, factor=1.0, seed=0) * 1e-8
    for name in ("rmsprop", "adagrad"):
        t, k = gt.update_sizes(name, g, lr=1.0), gk.update_sizes(name, g, lr=1.0)
        assert np.all(k / t < math.sqrt(2) + 1e-3) and np.all(t / k < math.sqrt(2) + 1e-3), name


def test_a_spike_moves_adam_by_at_most_its_bound_and_sgd_by_the_spike():
    g = spike_gradients(steps=400, dim=10, spike_at=300, factor=1000.0)
    bound = adam_step_bound(0.9, 0.999) * 0.01 * math.sqrt(10)  # per coordinate, over 10 coordinates
    adam = gt.update_sizes("adam", g, lr=0.01)
    assert adam[300] < bound and adam[300] > 0.5 * bound
    # v remembers the spike for ~1/(1 - beta_2) steps: a hundred steps on, Adam still crawls.
    assert adam[301:].max() < bound and adam[-1] < 0.25 * adam[299]
    sgd = gt.update_sizes("sgd", g, lr=0.01)
    assert sgd[300] == pytest.approx(1000 * sgd[299], rel=1e-5)
    ngd = gt.update_sizes("sgd", g, lr=0.01, normalize=True)
    np.testing.assert_allclose(ngd, 0.01, rtol=1e-5)


def test_optimizer_settings_are_checked_by_name():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="name must be one of .* got 'adamax'"):
        gt.make_optimizer("adamax", p, 0.1)
    with pytest.raises(ValueError, match=r"adam takes \['beta_1', 'beta_2', 'eps'\] besides lr, got \['rho'\]"):
        gk.make_optimizer("adam", 0.1, rho=0.9)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got -1"):
        gt.make_optimizer("sgd", p, -1)
    with pytest.raises(ValueError, match="momentum_decay"):
        gk.make_optimizer("nadam", 0.1, momentum_decay=0.004)
    opt = gt.make_optimizer("nadam", p, 0.1, momentum_decay=0.004)  # PyTorch's own default is allowed
    assert opt.defaults["momentum_decay"] == 0.004


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_train_traces_agree_between_frameworks_through_a_spike(name):
    x, y = digits()
    x, y = x[:200], y[:200]
    weights = init_mlp([64, 32, 10], init="he", seed=0)
    tm = gt.mlp(weights)
    t = gt.train(tm, gt.make_optimizer(name, tm.parameters(), 0.01), x, y, 12, loss="crossentropy", spike_at=6)
    km = gk.mlp(weights)
    k = gk.train(km, gk.make_optimizer(name, 0.01), x, y, 12, loss="crossentropy", spike_at=6)
    for field in ("losses", "grad_norms", "update_norms", "lrs"):
        np.testing.assert_allclose(getattr(k, field), getattr(t, field), rtol=2e-3, err_msg=field)
    assert t.grad_norms[6] > 300 * t.grad_norms[5]  # the injected spike is what the optimiser saw
    assert t.diverged_at is None and math.isfinite(t.final_loss)


def test_normalised_training_takes_steps_of_exactly_lr():
    x, y = digits()
    weights = init_mlp([64, 16, 10], seed=2)
    for backend, model in ((gt, gt.mlp(weights)), (gk, gk.mlp(weights))):
        opt = backend.make_optimizer("sgd", model.parameters(), 0.05) if backend is gt else \
            gk.make_optimizer("sgd", 0.05)
        trace = backend.train(model, opt, x[:100], y[:100], 5, loss="crossentropy", spike_at=2,
                              spike_factor=1e6, normalize=True)
        np.testing.assert_allclose(trace.update_norms, 0.05, rtol=1e-4)


def test_training_goes_on_after_the_loss_turns_non_finite():
    x, y = digits(one_hot=True)
    weights = init_mlp([64, 32, 10], seed=0)
    model = gt.mlp(weights)
    trace = gt.train(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 8, spike_at=2, spike_factor=1e12)
    assert len(trace.losses) == 8 and trace.diverged_at is not None and trace.diverged_at <= 4
    with pytest.raises(ValueError, match="spike_factor must be a positive finite number, got 0"):
        gt.train(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 2, spike_factor=0)
    with pytest.raises(ValueError, match="spike_at must be an int >= 0, got -1"):
        gk.train(gk.mlp(weights), gk.make_optimizer("sgd", 0.1), x, y, 2, spike_at=-1)


# ---------------------------------------------------------------- new-user trial

def test_keras_learning_rates_steps_one_call_at_a_time():
    cosine = keras.optimizers.schedules.CosineDecay(0.0, 100, warmup_target=0.1, warmup_steps=10)
    np.testing.assert_allclose(gk.learning_rates(cosine, 12), [float(cosine(i)) for i in range(12)], rtol=1e-6)

    def halving(step):  # a plain function with a Python branch on the step
        return 0.1 if int(step) < 3 else 0.05

    np.testing.assert_allclose(gk.learning_rates(halving, 5), [0.1, 0.1, 0.1, 0.05, 0.05], rtol=1e-6)


def test_keras_warmup_hands_the_inner_schedule_an_integer_step():
    big = 2 ** 24
    piecewise = keras.optimizers.schedules.PiecewiseConstantDecay([big], [0.1, 0.01])
    assert float(gk.Warmup(piecewise, 0)(big + 1)) == pytest.approx(0.01)
    table = keras.ops.convert_to_tensor([0.3, 0.2, 0.1])

    def lookup(step):
        return keras.ops.take(table, step)

    np.testing.assert_allclose(gk.learning_rates(gk.Warmup(lookup, 2), 3), [0.15, 0.2, 0.1], rtol=1e-6)


def test_torch_warmup_alone_leaves_the_rate_to_a_plateau_scheduler_stepped_alongside():
    def rates(make_warmup):
        opt = _opt(0.1)
        warm = make_warmup(opt)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        out = []
        for _ in range(7):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            warm.step()
            plateau.step(1.0)  # a loss that never improves: halve every step
        return out

    ours = rates(lambda o: gt.Warmup(o, 3))
    torchs = rates(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / 3, total_iters=2))
    np.testing.assert_allclose(ours, torchs, rtol=1e-12)
    assert ours[-1] < 0.01  # the plateau's halvings are kept


def test_keras_train_builds_an_unbuilt_model_and_skips_unused_variables():
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = x.sum(1, keepdims=True)
    unbuilt = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(1)])
    trace = gk.train(unbuilt, gk.make_optimizer("sgd", 0.1), x, y, 3)
    assert min(trace.update_norms) > 0 and trace.losses[2] < trace.losses[0]

    inp = keras.Input((3,))
    used, unused = keras.layers.Dense(1, name="used"), keras.layers.Dense(1, name="unused")
    two_heads = keras.Model(inp, used(inp))
    unused(inp)  # built, trainable, never in the loss
    two_heads.unused = unused
    trace = gk.train(two_heads, gk.make_optimizer("adam", 0.01), x, y, 3)
    assert min(trace.update_norms) > 0

    double = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, dtype="float64")])
    trace = gk.train(double, gk.make_optimizer("sgd", 0.1), x.astype("float64"), y.astype("float64"), 3,
                     spike_at=1, normalize=True)
    np.testing.assert_allclose(trace.update_norms, 0.1, rtol=1e-6)


def test_train_refuses_what_it_cannot_do_naming_it():
    x, y = np.ones((4, 3), "float32"), np.ones((4, 1), "float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(TypeError, match="optimizer must be a keras.optimizers.Optimizer, got str"):
        gk.train(model, "adam", x, y, 2)
    with pytest.raises(TypeError, match="does not scale the loss"):
        gk.train(model, keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), x, y, 2)
    tm = gt.mlp(init_mlp([3, 1]))
    with pytest.raises(TypeError, match="closure"):
        gt.train(tm, torch.optim.LBFGS(tm.parameters()), x, y, 2)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got str"):
        gt.train(tm, "sgd", x, y, 2)


def test_torch_train_takes_float64_arrays_like_keras():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 1))  # float64, as NumPy makes them
    weights = init_mlp([3, 4, 1], seed=0)
    m64, m32 = gt.mlp(weights), gt.mlp(weights)
    a = gt.train(m64, torch.optim.SGD(m64.parameters(), lr=0.1), x, y, 3)
    b = gt.train(m32, torch.optim.SGD(m32.parameters(), lr=0.1), x.astype("float32"), y.astype("float32"), 3)
    assert a.losses == b.losses


def test_optimizer_settings_are_validated_naming_the_setting():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"beta_1 must be in \[0.0, 1.0\), got 1.5"):
        gk.make_optimizer("adam", 0.1, beta_1=1.5)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got -1e-08"):
        gk.make_optimizer("rmsprop", 0.1, eps=-1e-8)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got -1"):
        gt.make_optimizer("adamw", p, 0.1, weight_decay=-1)
    with pytest.raises(TypeError, match="eps must be a real number, got '1e-8'"):
        gt.make_optimizer("adam", p, 0.1, eps="1e-8")


def test_keras_momentum_carries_the_old_rate_after_a_rate_change():
    # Documented in gradtools.optim: the same rule at a constant rate, not right after a change.
    opt_t = gt.make_optimizer("momentum", [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], 0.1)
    w = opt_t.param_groups[0]["params"][0]
    torch_steps, keras_steps = [], []
    for i in range(12):
        opt_t.param_groups[0]["lr"] = 0.1 if i < 6 else 0.01
        before = w.detach().clone()
        w.grad = torch.ones(1, dtype=torch.float64)
        opt_t.step()
        torch_steps.append(float((w.detach() - before).abs()))
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([5], [0.1, 0.01])  # steps 0-5 at 0.1
    keras_steps = []
    v = keras.Variable(np.zeros(1))
    opt_k = gk.make_optimizer("momentum", schedule)
    opt_k.build([v])
    for i in range(12):
        before = float(v.numpy()[0])
        opt_k.apply([keras.ops.ones(1, dtype="float64")], [v])
        keras_steps.append(abs(float(v.numpy()[0]) - before))
    np.testing.assert_allclose(keras_steps[:6], torch_steps[:6], rtol=1e-6)
    assert keras_steps[6] > 5 * torch_steps[6]  # Keras' velocity still holds lr 0.1


def test_outcome_reports_in_one_line_within_its_width():
    assert outcome(lambda: None) == "ran"
    text = outcome(lambda: 1 / 0, width=10)
    assert len(text) == 10 and text.startswith("ZeroDiv")
    with pytest.raises(TypeError, match="width must be an int"):
        outcome(lambda: None, width="x")
