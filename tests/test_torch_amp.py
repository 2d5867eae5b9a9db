"""GradGuard under torch.amp.GradScaler: each run is compared with PyTorch's own AMP recipe.

PyTorch's recipe is ``scaler.scale(loss).backward(); scaler.unscale_(opt);
<inspect or clip>; scaler.step(opt); scaler.update()``. The guard must leave
the scaler exactly as that loop would (an overflow lowers the scale; any other
skip leaves scale and growth tracker as they were) and must never leave it
half-way through a step, whatever it decides and whatever it raises.
"""

import math

import pytest
import torch

import gradtools.torch as gt
from gradtools.policies import SpikeDetector
from torch_helpers import assert_bit_identical, state_copy, tiny_mlp

X = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))


def _scaled_backward(model, opt, scaler, scale=1.0, poison=None):
    opt.zero_grad(set_to_none=True)
    loss = scale * torch.nn.functional.mse_loss(model(X), Y)
    if poison is not None:
        loss = loss * poison
    scaler.scale(loss).backward()


def _scaler_state(scaler):
    return scaler.get_scale(), scaler._get_growth_tracker()


def test_a_disabled_scaler_is_no_scaler_a_nan_is_skipped_and_the_weights_stay():
    # GradScaler("cpu", enabled=use_amp): with use_amp False, scaler.step() simply steps.
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = gt.GradGuard(model, opt, scaler=scaler)
    _scaled_backward(model, opt, scaler, poison=math.nan)
    before = state_copy(model, opt)
    result = guard.step()
    assert (result.stepped, result.reason) == (False, "nonfinite")
    assert guard.overflows == 0 and guard.skipped == 1
    assert_bit_identical(before, state_copy(model, opt))
    with pytest.raises(gt.NonFiniteGradientError, match="non-finite gradient"):
        gt.GradGuard(model, opt, scaler=scaler, action="raise").step()


def _spiky_run(scaler, steps=14, spike_at=(8,), hook=None):
    """A run whose step 8 has its loss scaled x1000; returns weights, reasons and the scaler's states."""
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gt.GradGuard(model, opt, scaler=scaler, spike=SpikeDetector(window=20, min_history=3))
    reasons, states = [], []
    for step in range(steps):
        _scaled_backward(model, opt, scaler, scale=1e3 if step in spike_at else 1.0)
        reasons.append(guard.step().reason)
        states.append(_scaler_state(scaler))
    return model, reasons, states


def test_a_spike_skip_leaves_the_scaler_as_it_was_and_the_next_step_works():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3)
    model, reasons, states = _spiky_run(scaler)
    assert reasons[8] == "spike" and reasons.count("ok") == 13
    # growth_interval=3: the tracker counts the 8 steps taken before the spike, the skip leaves it alone
    assert states[7] == states[8]
    # and the plain recipe on the steps the guard took gives the same scaler and weights
    ref = tiny_mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3)
    for step in range(14):
        if step == 8:
            continue
        _scaled_backward(ref, ref_opt, ref_scaler)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
    assert _scaler_state(ref_scaler) == states[-1]
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_a_caught_nonfinite_error_leaves_the_scaler_ready_for_the_next_step():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    guard = gt.GradGuard(model, opt, scaler=scaler, action="raise", max_consecutive_overflows=1)
    for _ in range(2):  # the first NaN is an overflow, the second in a row is not the scale's fault
        _scaled_backward(model, opt, scaler, poison=math.nan)
        result = None
        try:
            result = guard.step()
        except gt.NonFiniteGradientError as exc:
            assert "2 consecutive steps under loss scaling" in str(exc)
    assert result is None and guard.overflows == 1
    assert scaler.get_scale() == 2.0**2  # both non-finite steps lowered the scale, as scaler.step/update would
    _scaled_backward(model, opt, scaler)
    assert guard.step().stepped  # no "unscale_() has already been called"


def _fp16_run(guard_kind, steps=30):
    """Training under fp16 autocast with a loss large enough that a fresh scaler overflows while it calibrates."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), 300 * torch.randn(64, 1, generator=g)
    guard = None if guard_kind is None else gt.GradGuard(model, opt, scaler=scaler, action=guard_kind)
    reasons = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if guard is None:
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            reasons.append("overflow" if scaler.get_scale() < scale else "ok")
        else:
            reasons.append(guard.step().reason)
    return model, scaler, reasons, guard


@pytest.mark.parametrize("action", ["skip", "raise", "zero"])
def test_the_scalers_calibration_is_counted_apart_whatever_the_action(action):
    ref_model, ref_scaler, ref_reasons, _ = _fp16_run(None)
    model, scaler, reasons, guard = _fp16_run(action)
    assert ref_reasons[:6] == ["overflow"] * 6  # the fresh scaler calibrates: 65536 down to 1024
    assert reasons == ref_reasons and scaler.get_scale() == ref_scaler.get_scale()
    assert guard.overflows == reasons.count("overflow") and guard.skipped == 0
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("action, error", [("skip", gt.TooManySkipsError), ("raise", gt.NonFiniteGradientError)])
def test_gradients_that_stay_nonfinite_under_loss_scaling_end_the_run(action, error):
    # A NaN in every batch is not an overflow: the scale falls and falls. The guard stops it.
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    guard = gt.GradGuard(model, opt, scaler=scaler, action=action, max_consecutive_overflows=5,
                         max_consecutive_skips=3)
    before = state_copy(model, opt)
    with pytest.raises(error):
        for _ in range(20):
            _scaled_backward(model, opt, scaler, poison=math.nan)
            guard.step()
    assert guard.overflows == 5
    assert guard.steps == 5 + (3 if action == "skip" else 1)
    assert_bit_identical(before, state_copy(model, opt))


def test_zeroing_after_persistent_overflows_steps_and_the_scaler_still_sees_the_overflow():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    guard = gt.GradGuard(model, opt, scaler=scaler, action="zero", max_consecutive_overflows=1)
    reasons = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        scaler.scale(torch.nn.functional.mse_loss(model(X), Y)).backward()
        model[0].weight.grad[0, 0] = math.nan
        w = model[0].weight.detach().clone()
        reasons.append(guard.step().reason)
    assert reasons == ["overflow", "zeroed"]
    assert scaler.get_scale() == 2.0**2 and not torch.equal(w, model[0].weight)
    assert torch.isfinite(model[0].weight).all()
    _scaled_backward(model, opt, scaler)
    assert guard.step().stepped


@pytest.mark.parametrize("order", ["guard_records", "recipe"])
def test_the_monitor_sees_unscaled_pre_clip_norms_in_both_supported_orders(order):
    def run(scaler):
        model = tiny_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = gt.Monitor(model)
        guard = gt.GradGuard(model, opt, scaler=scaler, clipper=gt.Clipper(0.01),
                             monitor=monitor if scaler is not None and order == "guard_records" else None)
        for step in range(5):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(X), Y)
            if scaler is None:
                loss.backward()
                monitor.record()
            else:
                scaler.scale(loss).backward()
                if order == "recipe":  # PyTorch's AMP recipe: unscale, inspect, then step
                    scaler.unscale_(opt)
                    monitor.record()
            assert guard.step().stepped
        return monitor.history["total_norm"], model

    plain, plain_model = run(None)
    amp, amp_model = run(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert amp == pytest.approx(plain, rel=1e-6) and max(plain) > 0.01  # not the scaled (x1024) or clipped norm
    for a, b in zip(plain_model.parameters(), amp_model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16 has float32's range
@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("use_scaler", [False, True])
def test_finite_entries_whose_norm_overflows_float32_are_no_overflow_and_get_clipped(use_scaler, sync, dtype):
    # every entry is finite, but the float32 2-norm of 1e20-sized entries is inf
    model = torch.nn.Linear(100, 1).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=use_scaler)
    guard = gt.GradGuard(model, opt, scaler=scaler, clipper=gt.Clipper(1.0), sync=sync)
    w = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double()
    scaler.scale(1e20 * model(torch.ones(4, 100, dtype=dtype)).mean()).backward()
    result = guard.step()
    assert (result.stepped, result.reason, guard.overflows) == (True, "ok", 0)
    rel = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16 rounds each entry to 3 digits
    assert float(result.stats.total) == pytest.approx(math.sqrt(101) * 1e20, rel=rel)  # measured in float64
    moved = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double() - w
    assert float(moved.norm()) == pytest.approx(0.1, rel=1e-4 if dtype == torch.float32 else 3e-2)  # clipped to 1
    assert scaler.get_scale() == (2.0**16 if use_scaler else 1.0)


def test_one_scaler_cannot_serve_the_guards_of_two_optimizers():
    a, b = tiny_mlp(0), tiny_mlp(1)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    guard = gt.GradGuard(a, oa, scaler=scaler)
    with pytest.raises(ValueError, match="scaler already belongs to a GradGuard of another optimizer"):
        gt.GradGuard(b, ob, scaler=scaler)
    gt.GradGuard(a, oa, scaler=scaler)  # a new guard for the same optimizer replaces the old one
    del guard


def test_accumulation_under_amp_is_pytorchs_loss_over_k_recipe():
    # The micro-batch losses are weighted n_i / (k n_1), PyTorch's loss / k for equal sizes: the
    # fp16 backward sees no larger gradients than in the plain recipe, so it overflows as often.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(640, 8, generator=g)
    y = 10 * x.sum(1, keepdim=True)

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        return model, torch.optim.SGD(model.parameters(), lr=1e-3), torch.amp.GradScaler("cpu")

    def loss(model, i):
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.nn.functional.mse_loss(model(x[16 * i:16 * i + 16]).float(), y[16 * i:16 * i + 16])

    ref, ref_opt, ref_scaler = fresh()
    for w in range(10):
        for i in range(4 * w, 4 * w + 4):
            ref_scaler.scale(loss(ref, i) / 4).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad()
    model, opt, scaler = fresh()
    guard = gt.GradGuard(model, opt, scaler=scaler)
    acc = gt.Accumulator(model, opt, 4, guard=guard)
    for i in range(40):
        acc.backward(scaler.scale(loss(model, i)), batch_size=16)
    assert 0 < guard.overflows < 10 and scaler.get_scale() == ref_scaler.get_scale()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
