"""GradGuard: fault injection, bit-identical skips, raise messages, GradScaler."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradtools.torch as gt
from gradtools.policies import AutoClip, SpikeDetector, ZClip
from torch_helpers import assert_bit_identical, backward, state_copy, tiny_mlp

faults = st.tuples(
    st.sampled_from(["nan", "inf", "-inf", "spike"]),
    st.integers(0, 3),  # parameter index
    st.integers(0, 10**6),  # entry (mod numel)
    st.integers(3, 12),  # step at which to inject
    st.sampled_from(["sgd", "adam", "momentum"]),
    st.booleans(),  # sync: read the verdict, or decide and undo on the device
)


def _optimizer(kind, model):
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    return torch.optim.SGD(model.parameters(), lr=1e-2)


@settings(max_examples=200)
@given(faults)
def test_fault_injection_skip_is_bit_identical(fault):
    kind, index, entry, at, opt_kind, sync = fault
    model = tiny_mlp()
    opt = _optimizer(opt_kind, model)
    guard = gt.GradGuard(model, opt, action="skip", sync=sync,
                         spike=SpikeDetector(window=20, z_thresh=6.0, min_history=3))
    for step in range(15):
        backward(model, seed=step)
        if step == at:
            p = list(model.parameters())[index]
            value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "spike": 1e6}[kind]
            p.grad.view(-1)[entry % p.numel()] = value
            before = state_copy(model, opt)
            result = guard.step()
            assert not result.stepped and result.reason == ("spike" if kind == "spike" else "nonfinite")
            assert_bit_identical(before, state_copy(model, opt))
        else:
            assert guard.step().stepped
        opt.zero_grad(set_to_none=True)
    assert guard.skipped == 1 and guard.consecutive_skips == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())  # training went on


def test_raise_names_parameter_and_step():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.GradGuard(model, opt, action="raise")
    for _ in range(2):
        backward(model)
        guard.step()
    backward(model)
    model[2].weight.grad[0, 1] = math.nan
    model[2].bias.grad[0] = math.inf
    with pytest.raises(gt.NonFiniteGradientError, match=r"at step 3: first in parameter '2.weight' \(2 non-finite"):
        guard.step()


def test_zero_replaces_bad_entries_and_steps():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.GradGuard(model, opt, action="zero")
    backward(model)
    model[0].bias.grad[2] = math.nan
    expected_bias = model[0].bias.detach().clone()
    expected_bias -= 0.1 * torch.nan_to_num(model[0].bias.grad, nan=0.0)
    result = guard.step()
    assert result.stepped and result.reason == "zeroed"
    torch.testing.assert_close(model[0].bias.detach(), expected_bias)


def test_too_many_consecutive_skips():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.GradGuard(model, opt, max_consecutive_skips=3)
    for _ in range(2):
        backward(model)
        model[0].weight.grad.fill_(math.nan)
        assert not guard.step().stepped
    backward(model)
    model[0].weight.grad.fill_(math.nan)
    with pytest.raises(gt.TooManySkipsError, match="skipped 3 consecutive steps"):
        guard.step()


def test_grad_scaler_overflow_lowers_scale_and_keeps_weights():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = gt.GradGuard(model, opt, scaler=scaler, clipper=gt.Clipper(1.0))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    model[0].weight.grad[0, 0] = math.inf
    before = state_copy(model, opt)
    result = guard.step()
    assert result.reason == "overflow" and guard.overflows == 1
    assert scaler.get_scale() == 2.0**9
    assert_bit_identical(before, state_copy(model, opt))
    # A clean step afterwards: unscaled once, clipped to 1, then stepped.
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean() * 1e4).backward()
    w0 = model[0].weight.detach().clone()
    result = guard.step()
    assert result.stepped
    assert float(gt.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(1.0, rel=1e-4)
    assert not torch.equal(w0, model[0].weight)


def test_guard_state_round_trip():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g1 = gt.GradGuard(model, opt, spike=SpikeDetector(window=5, min_history=2))
    for s in range(4):
        backward(model, seed=s)
        g1.step()
    g2 = gt.GradGuard(model, opt, spike=SpikeDetector(window=5, min_history=2))
    g2.load_state_dict(g1.state_dict())
    assert g2.state_dict() == g1.state_dict()
    with pytest.raises(ValueError, match="missing key 'steps'"):
        g2.load_state_dict({})


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_guard_with_clipper_clips_in_the_clippers_norm_and_reads_the_verdict_once(norm_type, monkeypatch):
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, the clipped grads remain to inspect
    clipper = gt.Clipper(0.05, norm_type=norm_type)
    guard = gt.GradGuard(model, opt, clipper=clipper)
    backward(model, scale=10.0)
    reads = []
    real_float, real_int = torch.Tensor.__float__, torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t.shape) or real_float(t))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(t.shape) or real_int(t))
    result = guard.step()
    monkeypatch.undo()
    # the guard, the policy and the clip decide on the device: one read, the verdict
    assert len(reads) == 1 and result.stepped
    after = gt.get_total_norm([p.grad for p in model.parameters()], norm_type)
    assert float(after) == pytest.approx(0.05, rel=1e-4)


@pytest.mark.parametrize("policy", [lambda: ZClip(warmup_steps=3), lambda: AutoClip(percentile=30)],
                         ids=["zclip", "autoclip"])
def test_a_guard_resumed_from_its_state_dict_takes_the_same_decisions(policy):
    # The guard's state holds the clipper's policy state (ZClip's EMA, AutoClip's history).
    def run(resume_at=None):
        model = tiny_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        guard = gt.GradGuard(model, opt, spike=SpikeDetector(window=6, min_history=3), clipper=gt.Clipper(policy()))
        thresholds = []
        for step in range(12):
            if step == resume_at:
                state = guard.state_dict()
                guard = gt.GradGuard(model, opt, spike=SpikeDetector(window=6, min_history=3),
                                     clipper=gt.Clipper(policy()))
                guard.load_state_dict(state)
            backward(model, seed=step, scale=1.0 + 3.0 * (step % 4 == 3))
            guard.step()
            thresholds.append(guard.clipper.policy.threshold() if hasattr(guard.clipper.policy, "threshold")
                              else guard.clipper.policy.mean)
        return thresholds, [p.detach().clone() for p in model.parameters()]

    straight, w1 = run()
    resumed, w2 = run(resume_at=6)
    assert resumed == straight
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_a_skipped_step_never_enters_the_policys_history():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gt.GradGuard(model, opt, clipper=gt.Clipper(AutoClip(percentile=50)))
    backward(model)
    guard.step()
    backward(model)
    model[0].weight.grad[0, 0] = math.inf
    assert not guard.step().stepped
    assert list(guard.clipper.policy.history) == list(guard.state_dict()["policy"]["history"]) and \
        len(guard.clipper.policy.history) == 1


def test_loss_scale_overflows_are_counted_apart_and_never_raise_too_many_skips():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    guard = gt.GradGuard(model, opt, scaler=scaler, max_consecutive_skips=3)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    reasons = []
    for _ in range(20):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean() * 1e3).backward()
        reasons.append(guard.step().reason)
    assert reasons[:4] == ["overflow"] * 4  # more in a row than max_consecutive_skips, no error
    assert guard.overflows == reasons.count("overflow") and guard.skipped == 0
    assert "ok" in reasons  # the scale came down far enough to step


def test_the_guard_checks_what_the_optimizer_applies_not_what_the_model_holds():
    model = tiny_mlp()
    log_temp = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([*model.parameters(), log_temp], lr=0.1)
    guard = gt.GradGuard(model, opt, action="raise")
    backward(model)
    log_temp.grad = torch.tensor(math.nan)
    with pytest.raises(gt.NonFiniteGradientError, match=r"param_groups\[0\]\[4\]"):
        guard.step()
    assert torch.isfinite(log_temp)
    # the name comes from the model where it can: a model parameter is named by its path
    backward(model)
    log_temp.grad = torch.tensor(0.5)
    model[2].bias.grad[0] = math.inf
    with pytest.raises(gt.NonFiniteGradientError, match="'2.bias'"):
        guard.step()


def test_a_model_parameter_the_optimizer_does_not_own_is_neither_checked_nor_clipped():
    model = tiny_mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)  # trains only the last layer
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    guard = gt.GradGuard(model, opt, scaler=scaler, clipper=gt.Clipper(1.0))
    opt.zero_grad()
    model.zero_grad(set_to_none=True)
    scaler.scale(model(torch.ones(4, 5)).pow(2).mean()).backward()  # model[0] keeps its scaled grad
    want = float(torch.nn.utils.get_total_norm([p.grad for p in model[2].parameters()])) / 2.0**16
    result = guard.step()
    assert result.stepped and float(result.stats.total) == pytest.approx(want, rel=1e-6)
    assert result.stats.names == ["2.weight", "2.bias"]


def test_zeroing_nonfinite_entries_does_not_exempt_a_step_from_spike_detection():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.GradGuard(model, opt, action="zero", spike=SpikeDetector(window=20, min_history=3))
    for step in range(6):
        backward(model, seed=step)
        assert guard.step().stepped
    backward(model, seed=6, scale=1e3)
    model[0].weight.grad[0, 0] = math.nan
    before = state_copy(model, opt)
    result = guard.step()
    assert (result.stepped, result.reason) == (False, "spike")
    assert_bit_identical(before, state_copy(model, opt))


def test_closure_optimizers_are_refused_with_a_clear_error():
    model = tiny_mlp()
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match="optimizer LBFGS takes a closure"):
        gt.GradGuard(model, opt)
    with pytest.raises(TypeError, match="optimizer LBFGS takes a closure"):
        gt.lr_range_test(model, opt, lambda m, b: m(b).sum(), [torch.ones(2, 5)])
    with pytest.raises(TypeError, match="optimizer LBFGS takes a closure"):
        gt.Accumulator(model, opt, 2)


OPTIMIZERS = {  # each creates state on its first step, some of it not zeros
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),  # mu_product starts at 1
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.5),  # buffer = first grad
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_skipped_first_step_leaves_no_optimizer_state_in_either_sync_mode(kind):
    """The first step creates the optimizer's state; skipped, it must leave none behind (NaN in a
    fresh Adam moment, or a momentum buffer of zeros, would change every later step)."""
    runs = {}
    for sync in (True, False):
        model = tiny_mlp()
        opt = OPTIMIZERS[kind](model.parameters())
        guard = gt.GradGuard(model, opt, sync=sync)
        reasons = []
        for step in range(4):
            backward(model, seed=step)
            if step == 0:
                model[0].weight.grad[0, 0] = math.nan
            before = state_copy(model, opt)  # no state yet (Adagrad's is made by its constructor)
            reasons.append(guard.step().reason)
            if step == 0:
                assert_bit_identical(before, state_copy(model, opt))
            opt.zero_grad(set_to_none=True)
        assert reasons == ["nonfinite", "ok", "ok", "ok"]
        runs[sync] = state_copy(model, opt)
    fresh = tiny_mlp()  # the same three steps without the skipped one
    opt = OPTIMIZERS[kind](fresh.parameters())
    for step in range(1, 4):
        backward(fresh, seed=step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_bit_identical(runs[True], state_copy(fresh, opt))
    assert_bit_identical(runs[False], state_copy(fresh, opt))


def _async_guard(action="skip"):
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return model, opt, gt.GradGuard(model, opt, action=action, sync=False)


def test_apply_takes_one_result_of_this_guards_decide_once():
    model, opt, guard = _async_guard()
    backward(model, seed=0)
    result = guard.decide()
    with pytest.raises(TypeError, match="result must be the GuardResult of decide.., got dict"):
        guard.apply({"code": 0})
    other = _async_guard()[2]
    with pytest.raises(ValueError, match="result comes from another guard's decide"):
        other.apply(result)
    before = [p.detach().clone() for p in model.parameters()]
    guard.apply(result)
    after = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    with pytest.raises(ValueError, match="already applied"):
        guard.apply(result)
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))  # no second step
    synced = gt.GradGuard(model, opt)
    result = synced.step()
    with pytest.raises(ValueError, match=r"another guard's decide\(\) \(or from step\(\)\)"):
        synced.apply(result)  # step() has stepped already
    scaled = gt.GradGuard(model, opt, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="decide.. is for a guard without a GradScaler"):
        scaled.decide()


@pytest.mark.parametrize("action", ["skip", "zero", "raise"])
def test_with_sync_decide_then_apply_is_step(action):
    """sync=True: decide() (read-free, compilable) then apply(), which reads the verdict and steps
    only on a step taken: the same decisions, weights and errors as step()."""
    runs = []
    for split in (False, True):
        model = tiny_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        guard = gt.GradGuard(model, opt, action=action, spike=SpikeDetector(window=6, min_history=3),
                             clipper=gt.Clipper(ZClip(warmup_steps=3)), max_consecutive_skips=2)
        reasons = []
        for step in range(12):
            backward(model, seed=step, scale=1000.0 if step == 8 else 1.0)
            if step in (5, 10, 11):
                model[2].weight.grad[0, 1] = math.nan
            try:
                if split:
                    result = guard.decide()
                    guard.apply(result)
                else:
                    result = guard.step()
                reasons.append(result.reason)
            except (gt.NonFiniteGradientError, gt.TooManySkipsError) as exc:
                reasons.append(type(exc).__name__ + (": 2.weight" if "'2.weight'" in str(exc) else ""))
        runs.append((reasons, state_copy(model, opt), guard.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][2] == runs[1][2]
    assert_bit_identical(runs[0][1], runs[1][1])
    if action == "raise":
        assert runs[0][0][5] == "NonFiniteGradientError: 2.weight"
    else:
        assert runs[0][0][8] == "spike" and runs[0][0][11] == "TooManySkipsError" or action == "zero"


def test_without_sync_a_raised_error_names_the_parameter_after_the_gradients_are_gone():
    model, opt, guard = _async_guard(action="raise")
    backward(model, seed=0)
    model[2].weight.grad[1, 1] = math.nan
    guard.step()
    opt.zero_grad(set_to_none=True)  # the usual loop: the next read comes after zero_grad
    with pytest.raises(gt.NonFiniteGradientError, match="step 1: first in parameter '2.weight'"):
        guard.check()
    guard.check()  # reported once
    # which parameters have gradients changes (a frozen layer): the name is the one of that step
    model[0].weight.requires_grad_(False)
    for step in range(2):
        backward(model, seed=step)
        model[2].weight.grad[0, 0] = math.nan
        guard.step()
        model[0].weight.requires_grad_(True)
    with pytest.raises(gt.NonFiniteGradientError, match="step 2: first in parameter '2.weight'"):
        guard.check()


@pytest.mark.parametrize("sync", [True, False])
def test_a_skipped_step_reports_and_leaves_the_gradients_it_was_decided_on(sync):
    """A non-finite global norm makes a NaN clipping factor: the skipped step must not apply it
    to the gradients, whose counts the result reports when read."""
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.GradGuard(model, opt, sync=sync, clipper=gt.Clipper(1.0))
    backward(model, seed=0)
    model[2].bias.grad[0] = math.nan
    grads = [p.grad.clone() for p in model.parameters()]
    result = guard.step()
    assert result.reason == "nonfinite"
    assert result.stats.nonfinite.tolist() == [0, 0, 0, 1] and result.stats.first_nonfinite() == "2.bias"
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["zclip", "autoclip"])
def test_both_sync_modes_keep_the_same_policy_state_on_the_cpu(policy):
    """With sync=True the guard decides with NumPy on the CPU, with sync=False with PyTorch:
    the same operations in the same order, to the last bit."""
    states = []
    for sync in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = gt.GradGuard(model, opt, sync=sync, clipper=gt.Clipper(policy),
                             spike=SpikeDetector(window=8, min_history=3))
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
            guard.step()
        states.append(guard.state_dict())
    assert states[0] == states[1]
