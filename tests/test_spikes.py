"""Spike defences: AdaGC, SPAM, per-tensor clipping and the comparison runner.

Each defence is checked against a NumPy reference written here from the paper's
update rule (loops, no shared code), on a fixed gradient sequence; PyTorch and
Keras must take the same decisions; a state saved and resumed takes the same
decisions as an uninterrupted run; bad arguments are named in the error.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gradtools import spikes
from gradtools.spikes import AdaGC, Scenario, SPAMSchedule, score_run

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------------- NumPy references
def adagc_reference(norm_steps, lambda_rel=1.05, beta=0.98, warmup_steps=100, lambda_abs=1.0, eps=1e-8):
    """AdaGC as the paper writes it (Algorithm 1), tensor by tensor; non-finite steps clip nothing and
    zero norms leave the reference alone (gradtools' documented choices)."""
    gamma = [math.inf] * len(norm_steps[0])
    out = []
    for t, norms in enumerate(norm_steps, start=1):
        total = math.sqrt(sum(n * n for n in norms))
        if not math.isfinite(total):
            out.append([1.0] * len(norms))
            continue
        factors = []
        for i, n in enumerate(norms):
            if t < warmup_steps:
                h = min(lambda_abs / (total + eps), 1.0)
                new = min(gamma[i], h * n)
            else:
                h = 1.0 if n == 0 else min(lambda_rel * gamma[i] / n, 1.0)
                new = h * n if math.isinf(gamma[i]) else beta * gamma[i] + (1 - beta) * h * n
            if n != 0:
                gamma[i] = new
            factors.append(h)
        out.append(factors)
    return np.array(out)


def spam_schedule_reference(steps, interval, warmup, settle):
    """The authors' bookkeeping, replayed: a counter that starts past the warm-up, a reset when
    (total_step + 1) % interval == 0, clipping once current_step >= settle and
    current_step % interval >= settle, the warm-up's cosine through CosineAnnealingLR(T_max=warmup+1)."""
    total, current, out = 0, warmup + 1, []
    for _ in range(steps):
        dr = 0.0 if current >= warmup else 0.99 * (1 + math.cos(math.pi * current / (warmup + 1))) / 2
        s = total + 1
        reset = s % interval == 0
        clip = s >= settle and s % interval >= settle
        out.append((reset, clip, 1 - dr))
        total += 1
        current += 1
        if (total + 1) % interval == 0:
            current = 0
    return out


def adam_spam_reference(p0, grads, lr, betas, eps, schedule: SPAMSchedule):
    """Adam (PyTorch's update) with SPAM's reset, clip and warm-up, on one NumPy array."""
    p = np.array(p0, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2 = betas
    clipped_counts = []
    rows = spam_schedule_reference(len(grads), schedule.reset_interval, schedule.warmup_steps,
                                   schedule.settle_steps)
    for t, (g, (reset, clip, factor)) in enumerate(zip(grads, rows), start=1):
        g = np.array(g, dtype=np.float64)
        if reset:
            m[:] = 0.0
            v[:] = 0.0
        count = 0
        if clip:
            mask = g * g > schedule.threshold * v
            count = int(mask.sum())
            g = np.where(mask, np.sign(g) * np.sqrt(schedule.threshold * v), g)
        clipped_counts.append(count)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * factor * m_hat / (np.sqrt(v_hat) + eps)
    return p, clipped_counts


def gradient_sequence(steps=60, shape=(3, 4), spikes_at=(25, 41), scale=1e3, seed=0):
    rng = np.random.default_rng(seed)
    grads = rng.standard_normal((steps, *shape)).astype(np.float32) * 0.1
    for t in spikes_at:
        grads[t, 0, :2] *= scale  # a spike on a few entries of one tensor
    return grads


# ---------------------------------------------------------------------- the shared maths
NORMS = [[0.5, 1.0, 0.2], [0.6, 0.9, 0.0], [0.55, 1.1, 0.25], [0.5, 30.0, 0.2], [math.nan, 1.0, 0.2],
         [0.52, 1.0, 0.21], [0.0, 0.0, 0.0], [5.0, 1.05, 0.2], [0.5, 1.0, math.inf], [0.49, 0.95, 0.22]]


@pytest.mark.parametrize("warmup", [1, 3, 20])
def test_adagc_matches_the_reference(warmup):
    a = AdaGC(warmup_steps=warmup, lambda_abs=1.2)
    got = np.array([a.step(n) for n in NORMS])
    want = adagc_reference(NORMS, warmup_steps=warmup, lambda_abs=1.2)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if warmup == 3:  # the 30x spike on tensor 1 after the warm-up is pulled back to 1.05 x its reference
        assert got[3, 1] < 0.05 and got[3, 0] == 1.0


def test_adagc_resumes_with_the_same_decisions():
    a = AdaGC(warmup_steps=3)
    for n in NORMS[:5]:
        a.step(n)
    saved = json.loads(json.dumps(a.state_dict()))
    b = AdaGC(warmup_steps=3)
    b.load_state_dict(saved)
    assert b.gamma == a.gamma and b.steps == 5
    np.testing.assert_array_equal([a.step(n) for n in NORMS[5:]], [b.step(n) for n in NORMS[5:]])


@pytest.mark.parametrize("kwargs, name", [({"lambda_rel": 0}, "lambda_rel"), ({"beta": 1.0}, "beta"),
                                          ({"warmup_steps": 0}, "warmup_steps"), ({"lambda_abs": -1}, "lambda_abs"),
                                          ({"eps": float("nan")}, "eps"), ({"warmup_steps": 2.5}, "warmup_steps")])
def test_adagc_bad_settings_are_named(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        AdaGC(**kwargs)


def test_adagc_refuses_a_second_model_and_a_foreign_state():
    a = AdaGC(warmup_steps=2)
    a.step([1.0, 2.0])
    with pytest.raises(ValueError, match="3"):
        a.step([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="norms"):
        AdaGC().step([[1.0]])
    b = AdaGC(warmup_steps=2)
    b.step([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="config"):
        AdaGC(warmup_steps=5).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="gamma"):
        b.load_state_dict(a.state_dict())


def test_spam_schedule_replays_the_authors_bookkeeping():
    for interval, warmup, settle in [(500, 150, 20), (10, 3, 2), (7, 0, 2)]:
        schedule = SPAMSchedule(reset_interval=interval, warmup_steps=warmup, settle_steps=settle)
        got = [tuple(x.item() for x in schedule.at(np.int64(s))) for s in range(1, 3 * interval + 5)]
        want = spam_schedule_reference(3 * interval + 4, interval, warmup, settle)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0, atol=1e-12)
    assert sum(r for r, _, _ in got) == 3  # steps 7, 14, 21


@pytest.mark.parametrize("kwargs, name", [({"threshold": 0}, "threshold"), ({"reset_interval": 0}, "reset_interval"),
                                          ({"warmup_steps": -1}, "warmup_steps"), ({"settle_steps": 1}, "settle_steps"),
                                          ({"reset_interval": 10, "warmup_steps": 10}, "warmup_steps")])
def test_spam_bad_settings_are_named(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        SPAMSchedule(**kwargs)


def test_spam_clip_and_clipnorm_factors():
    g = np.array([3.0, -3.0, 0.5, 0.0])
    v = np.array([1e-4, 1e-4, 1e-4, 0.0])
    clipped, mask = spikes.spam_clip(g, v, 5000.0)
    bound = math.sqrt(5000 * 1e-4)
    np.testing.assert_allclose(clipped, [bound, -bound, 0.5, 0.0])
    assert mask.tolist() == [True, True, False, False]
    np.testing.assert_allclose(spikes.clipnorm_factors(np.array([0.5, 2.0, 4.0]), 2.0), [1.0, 1.0, 0.5])


def test_scenarios_and_scores():
    with pytest.raises(ValueError, match="spike_steps"):
        Scenario("x", spike_steps=(-1,))
    with pytest.raises(ValueError, match="spike_scale"):
        Scenario("x", spike_scale=0)
    with pytest.raises(ValueError, match="name"):
        Scenario("")
    names = [s.name for s in spikes.default_scenarios(200)]
    assert names == ["clean", "spike x10", "spike x100", "spike x1000", "corrupt x100", "lr x10"]
    assert spikes.default_scenarios(200)[-1].disturbed == tuple(range(50))
    clean = np.linspace(2.0, 1.0, 100)
    s = Scenario("s", spike_steps=(40,), spike_scale=100.0)
    assert score_run(clean, clean, s)["outcome"] == "unharmed"
    bump = clean.copy()
    bump[40:60] *= 3
    rec = score_run(bump, clean, s)
    assert rec["outcome"] == "recovered" and 20 <= rec["steps_lost"] <= 30
    stuck = clean.copy()
    stuck[40:] = 1.8
    assert score_run(stuck, clean, s)["outcome"] == "slowed"
    nan = clean.copy()
    nan[50:] = np.nan
    rec = score_run(nan, clean, s)
    assert rec["diverged"] and rec["outcome"] == "diverged"
    up = clean.copy()
    up[40:] = 2.5
    assert score_run(up, clean, s)["diverged"]
    with pytest.raises(ValueError, match="curves"):
        score_run(clean[:5], clean, s)


# ---------------------------------------------------------------------- PyTorch
def _params_with(grads_list):
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads_list]
    for p, g in zip(params, grads_list):
        p.grad = torch.tensor(g)
    return params


def test_torch_per_tensor_clip_is_clip_grad_norm_on_each_tensor():
    from gradtools.torch import clip_grad_norm_per_tensor_

    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) * s for s in (0.1, 5.0, 30.0)]
    ours, theirs = _params_with(grads), _params_with(grads)
    norms = clip_grad_norm_per_tensor_(ours, 2.0)
    for p in theirs:
        torch.nn.utils.clip_grad_norm_([p], 2.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[0].grad, torch.tensor(grads[0]))  # below the threshold: untouched
    np.testing.assert_allclose(norms.numpy(), [np.linalg.norm(g) for g in grads], rtol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_per_tensor_(ours, -1.0)


def _torch_adagc_factors(seq, adagc):
    out = []
    for grads in seq:
        params = _params_with(grads)
        out.append(adagc(params).numpy())
    return np.array(out)


def _tensor_sequence(steps=30, seed=2):
    rng = np.random.default_rng(seed)
    seq = [[rng.standard_normal((3, 4)).astype(np.float32) * 0.3, rng.standard_normal(4).astype(np.float32)]
           for _ in range(steps)]
    seq[12][0] *= 50.0  # a spike on the first tensor
    seq[20][1] *= 0.0  # a zero gradient on the second
    return seq


def test_torch_adagc_takes_the_reference_decisions_and_resumes():
    from gradtools.torch import AdaGC as TorchAdaGC

    seq = _tensor_sequence()
    got = _torch_adagc_factors(seq, TorchAdaGC(warmup_steps=5))
    norms = [[float(np.linalg.norm(g.astype(np.float64))) for g in grads] for grads in seq]
    np.testing.assert_allclose(got, adagc_reference(norms, warmup_steps=5), rtol=1e-6)
    assert got[12, 0] < got[11, 0] / 20  # the 50x spike is pulled back to its reference
    first = TorchAdaGC(warmup_steps=5)
    _torch_adagc_factors(seq[:15], first)
    resumed = TorchAdaGC(warmup_steps=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    np.testing.assert_array_equal(_torch_adagc_factors(seq[15:], resumed), got[15:])
    with pytest.raises(ValueError, match="either"):
        TorchAdaGC(AdaGC(), warmup_steps=3)
    with pytest.raises(TypeError, match="policy"):
        TorchAdaGC("adagc")


def _torch_spam_run(grads, schedule, lr=1e-2, steps=None, state=None, optimizer_cls=None):
    from gradtools.torch import SPAM

    p = torch.nn.Parameter(torch.zeros(grads.shape[1:]))
    optimizer_cls = optimizer_cls or torch.optim.Adam
    opt = SPAM(optimizer_cls([p], lr=lr, eps=1e-8), **schedule.get_config())
    if state is not None:
        p.data.copy_(state[0])
        opt.load_state_dict(state[1])
    start = opt.steps
    for t in range(start, len(grads) if steps is None else steps):
        p.grad = torch.tensor(grads[t])
        opt.step()
    return p, opt


def test_torch_spam_matches_the_numpy_reference():
    grads = gradient_sequence()
    schedule = SPAMSchedule(reset_interval=20, warmup_steps=6, settle_steps=3)
    p, opt = _torch_spam_run(grads, schedule)
    want, counts = adam_spam_reference(np.zeros((3, 4)), grads, 1e-2, (0.9, 0.999), 1e-8, schedule)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    # the spike at step 26 is clipped entry by entry; the one at step 42, two steps after the reset at 40,
    # inside the settling steps, goes through: SPAM cannot clip against a second moment it just zeroed
    assert counts[25] == 2 and counts[41] == 0 and opt.resets == 3
    plain = torch.nn.Parameter(torch.zeros(3, 4))
    adam = torch.optim.Adam([plain], lr=1e-2, eps=1e-8)
    for g in grads:
        plain.grad = torch.tensor(g)
        adam.step()
    assert not torch.allclose(plain, p, atol=1e-3)


def test_torch_spam_without_resets_or_spikes_is_adam_bit_for_bit():
    grads = gradient_sequence(spikes_at=())
    p, _ = _torch_spam_run(grads, SPAMSchedule(threshold=1e30, reset_interval=10_000, warmup_steps=0))
    plain = torch.nn.Parameter(torch.zeros(3, 4))
    adam = torch.optim.Adam([plain], lr=1e-2, eps=1e-8)
    for g in grads:
        plain.grad = torch.tensor(g)
        adam.step()
    assert torch.equal(plain, p)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_torch_spam_resumes_with_the_same_steps(cls):
    grads = gradient_sequence()
    schedule = SPAMSchedule(reset_interval=20, warmup_steps=6, settle_steps=3)
    optimizer_cls = getattr(torch.optim, cls)
    whole, _ = _torch_spam_run(grads, schedule, optimizer_cls=optimizer_cls)
    half, opt = _torch_spam_run(grads, schedule, steps=33, optimizer_cls=optimizer_cls)
    saved = (half.detach().clone(), opt.state_dict())
    resumed, _ = _torch_spam_run(grads, schedule, state=saved, optimizer_cls=optimizer_cls)
    assert torch.equal(whole, resumed)


def test_torch_spam_bad_arguments():
    from gradtools.torch import SPAM

    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="optimizer.*SGD"):
        SPAM(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="threshold"):
        SPAM(torch.optim.Adam([p]), threshold=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        SPAM(torch.optim.Adam([p]), reset_interval=5, warmup_steps=5)
    a = SPAM(torch.optim.Adam([p]), reset_interval=50, warmup_steps=5)
    with pytest.raises(ValueError, match="reset_interval"):
        SPAM(torch.optim.Adam([p])).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        a.load_state_dict({"steps": 3})


# ---------------------------------------------------------------------- the comparison (PyTorch)
def _torch_problem(steps=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 32, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    batches = [(x[i], torch.tanh(x[i] @ w)) for i in range(steps)]

    def model_fn():
        return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    return model_fn, batches, torch.nn.functional.mse_loss


def test_torch_compare_defences_judges_a_huge_spike():
    from gradtools.torch import compare_defences

    model_fn, batches, loss = _torch_problem()
    scenarios = [Scenario("clean"), Scenario("spike", spike_steps=(15, 16), spike_scale=1e4)]
    table, curves = compare_defences(model_fn, batches, loss, steps=40, lr=1e-2, scenarios=scenarios,
                                     defences=["none", "global_norm", "adagc", "zskip"], return_curves=True)
    rows = {(r.scenario, r.defence): r for r in table.itertuples()}
    assert len(rows) == 8 and set(table.columns) >= {"diverged", "final_rel", "steps_lost", "v_growth", "time_rel"}
    assert rows[("clean", "none")].final_rel == 1.0 and rows[("clean", "none")].outcome == "unharmed"
    # Adam's second moment: a 1e4 spike multiplies it by ~1e4 (over two steps); a defence keeps it near 1
    assert rows[("spike", "none")].v_growth > 100
    for d in ("global_norm", "adagc", "zskip"):
        assert rows[("spike", d)].v_growth < rows[("spike", "none")].v_growth / 10
    assert rows[("spike", "zskip")].skipped == 2
    np.testing.assert_array_equal(curves[("clean", "none")][:15], curves[("spike", "none")][:15])
    again = compare_defences(model_fn, batches, loss, steps=40, lr=1e-2, scenarios=scenarios[1:],
                             defences=["adagc"], return_curves=True)[1]
    np.testing.assert_array_equal(again[("spike", "adagc")], curves[("spike", "adagc")])


def test_compare_defences_bad_arguments():
    from gradtools.torch import compare_defences

    model_fn, batches, loss = _torch_problem()
    with pytest.raises(ValueError, match="'clip'"):
        compare_defences(model_fn, batches, loss, steps=20, defences=["none", "clip"])
    with pytest.raises(ValueError, match="step 30"):
        compare_defences(model_fn, batches, loss, steps=20, scenarios=[Scenario("s", spike_steps=(30,))])
    with pytest.raises(TypeError, match="model_fn"):
        compare_defences(None, batches, loss)
    with pytest.raises(ValueError, match="steps"):
        compare_defences(model_fn, batches, loss, steps=5)
    with pytest.raises(ValueError, match="spike_tensor"):
        compare_defences(model_fn, batches, loss, steps=20, defences=["none"],
                         scenarios=[Scenario("s", spike_steps=(3,), spike_tensor=9)])


def test_compare_defences_names_what_is_wrong():
    from gradtools.torch import compare_defences

    model_fn, batches, loss = _torch_problem()
    with pytest.raises(ValueError, match=r"thresholds has no value for \['clipnorm'\]"):
        compare_defences(model_fn, batches, loss, steps=20, defences=["none", "clipnorm"],
                         thresholds={"global_norm": 1.0})
    with pytest.raises(ValueError, match=r"thresholds\['value'\]"):
        compare_defences(model_fn, batches, loss, steps=20, defences=["value"], thresholds={"value": -1.0})
    with pytest.raises(TypeError, match="model_fn must build a fresh model"):
        compare_defences(model_fn(), batches, loss, steps=20)
    with pytest.raises(ValueError, match=r"batches\[0\] must be an \(x, y\) pair"):
        compare_defences(model_fn, batches[0], loss, steps=20)
    with pytest.raises(TypeError, match="wrap it in a list"):
        compare_defences(model_fn, batches, loss, steps=20, scenarios=Scenario("x"))


def test_torch_spam_under_a_scheduler_and_with_a_new_group():
    from gradtools.torch import SPAM

    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = SPAM(torch.optim.Adam([p], lr=0.1), reset_interval=4, warmup_steps=2, settle_steps=2)
    opt.add_param_group({"params": [q], "lr": 0.05})
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    for step in range(6):
        p.grad, q.grad = torch.ones(3), torch.ones(2)
        opt.step()
        sched.step()
        assert [g["lr"] for g in opt.param_groups] == [0.1 * 0.5 ** (step + 1), 0.05 * 0.5 ** (step + 1)]
    assert opt.resets == 1 and "exp_avg" in opt.state[q]
