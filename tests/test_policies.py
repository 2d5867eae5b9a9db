"""Framework-free policies: hand-computed thresholds, state round trips, bad input."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradtools.policies import AutoClip, FixedThreshold, SpikeDetector, ZClip, get_policy

norms = st.lists(st.floats(min_value=1e-3, max_value=1e3, allow_nan=False), min_size=1, max_size=80)


def test_fixed_threshold():
    p = FixedThreshold(2.5)
    assert [p.step(n) for n in (0.1, 100.0, float("nan"))] == [2.5, 2.5, 2.5]
    assert repr(p) == "FixedThreshold(max_norm=2.5)"


def test_autoclip_hand_computed():
    p = AutoClip(percentile=25, history_size=4)
    # history [4] -> 4; [4,1] -> 1 + 0.25*3 = 1.75; [4,1,3] sorted [1,3,4]: pos 0.5 -> 2.0
    # [4,1,3,2] sorted [1,2,3,4]: pos 0.75 -> 1.75; then 10 pushes 4 out: [1,3,2,10] -> pos 0.75 -> 1.75
    assert [p.step(n) for n in (4, 1, 3, 2, 10)] == pytest.approx([4.0, 1.75, 2.0, 1.75, 1.75])
    assert list(p.history) == [1.0, 3.0, 2.0, 10.0]


def test_autoclip_ignores_nonfinite():
    p = AutoClip(percentile=50)
    assert p.step(float("nan")) == math.inf
    p.step(2.0)
    assert p.step(float("inf")) == 2.0
    assert list(p.history) == [2.0]


def test_zclip_hand_computed():
    z = ZClip(alpha=0.5, z_thresh=1.0, warmup_steps=2, eps=1e-12)
    assert z.step(1.0) == math.inf and z.step(3.0) == math.inf
    assert (z.mean, z.var) == (2.0, 1.0)  # from the warm-up buffer
    # g=2.5: z=0.5 <= 1, no clip; mean=2.25, var=0.5*1+0.5*(2.5-2.25)^2=0.53125
    assert z.step(2.5) == math.inf
    assert z.mean == pytest.approx(2.25) and z.var == pytest.approx(0.53125)
    # g=10: std=sqrt(.53125), z=(10-2.25)/std; threshold = mean + z_t*std/(z/z_t)
    std = math.sqrt(0.53125)
    zz = (10 - 2.25) / std
    expected = 2.25 + std / zz
    assert z.step(10.0) == pytest.approx(expected)
    # EMA updated with the clipped value, not 10.
    assert z.mean == pytest.approx(0.5 * 2.25 + 0.5 * expected)


def test_zclip_mean_option_and_ceiling():
    z = ZClip(warmup_steps=2, z_thresh=1.0, clip_option="mean", max_norm=5.0)
    assert z.step(1.0) == 5.0  # warm-up: only the ceiling applies
    z.step(3.0)
    assert z.step(100.0) == pytest.approx(2.0)  # clipped to the mean


@given(norms, st.integers(min_value=0, max_value=79))
def test_resumed_equals_uninterrupted(seq, cut):
    cut = min(cut, len(seq))
    for make in (lambda: AutoClip(percentile=30, history_size=7), lambda: ZClip(warmup_steps=3),
                 lambda: SpikeDetector(window=5, min_history=3, z_thresh=2.0)):
        full = make()
        expected = [full.step(n) for n in seq]
        first = make()
        got = [first.step(n) for n in seq[:cut]]
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
        resumed = make()
        resumed.load_state_dict(state)
        got += [resumed.step(n) for n in seq[cut:]]
        assert got == expected


@given(norms)
def test_autoclip_matches_numpy_percentile(seq):
    p = AutoClip(percentile=10, history_size=10000)
    for i, n in enumerate(seq):
        assert p.step(n) == pytest.approx(np.percentile(seq[: i + 1], 10), rel=1e-12)


def test_spike_detector():
    d = SpikeDetector(window=10, z_thresh=3.0, min_history=5)
    base = [1.0, 1.02, 0.98] * 7  # |z| <= 1.3 against any window of it
    flags = [d.step(x) for x in base]
    assert not any(flags)
    assert d.step(5.0) is True
    assert d.step(float("nan")) is True
    assert d.spikes == 2 and 5.0 not in d.norms
    assert d.step(1.0, loss=float("inf")) is True
    # A flat history: tiny std, so 1.2 has a huge z-score, but it is no spike.
    flat = SpikeDetector(window=10, z_thresh=3.0, min_history=5)
    for _ in range(6):
        flat.step(1.0)
    assert flat.step(1.2) is False and flat.step(1.6) is True


def test_a_history_of_zero_norms_tells_nothing_and_never_locks_the_detector():
    # A loss weight warmed up from 0, or fully masked batches: the gradient is exactly 0.
    d = SpikeDetector(window=10, z_thresh=3.0, min_history=5)
    assert not any(d.step(0.0) for _ in range(10))
    ramp = [0.01 * (i + 1) for i in range(20)]  # the warm-up then raises the weight
    assert not any(d.step(x) for x in ramp)
    assert d.step(10.0) is True and d.spikes == 1  # and spikes are caught again
    assert 0.0 not in d.norms and len(d.norms) == 10
    # the same for the loss
    d = SpikeDetector(window=10, z_thresh=3.0, min_history=5)
    assert not any(d.step(1.0, loss=0.0) for _ in range(10))
    assert not d.step(1.0, loss=0.5)


def test_state_dict_mismatch_errors():
    a = AutoClip(percentile=10)
    with pytest.raises(ValueError, match="ZClip"):
        a.load_state_dict(ZClip().state_dict())
    with pytest.raises(ValueError, match="config"):
        a.load_state_dict(AutoClip(percentile=20).state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        a.load_state_dict({"type": "AutoClip"})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        a.load_state_dict([1, 2])
    small = AutoClip(percentile=10, history_size=2)
    big = AutoClip(percentile=10, history_size=2)
    state = big.state_dict()
    state["history"] = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="history_size=2"):
        small.load_state_dict(state)


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: FixedThreshold(0), "max_norm must be a positive finite number, got 0"),
        (lambda: FixedThreshold(-1.0), "max_norm must be a positive finite number, got -1.0"),
        (lambda: FixedThreshold(float("nan")), "max_norm must be a positive finite number, got nan"),
        (lambda: FixedThreshold(float("inf")), "max_norm must be a positive finite number, got inf"),
        (lambda: AutoClip(percentile=0), r"percentile must be in \(0.0, 100.0\], got 0"),
        (lambda: AutoClip(percentile=101), r"percentile must be in"),
        (lambda: AutoClip(history_size=0), "history_size must be an int >= 1, got 0"),
        (lambda: ZClip(alpha=1.0), r"alpha must be in \(0.0, 1.0\), got 1.0"),
        (lambda: ZClip(clip_option="median"), "clip_option must be one of"),
        (lambda: ZClip(warmup_steps=0), "warmup_steps must be an int >= 1"),
        (lambda: SpikeDetector(window=5, min_history=6), r"min_history must be <= window \(5\), got 6"),
        (lambda: get_policy("fastclip"), "policy .fastclip. is not a registered policy"),
    ],
)
def test_bad_values(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: FixedThreshold("1.0"), r"max_norm must be a real number, got '1.0' \(str\)"),
        (lambda: FixedThreshold(True), "max_norm must be a real number, got True"),
        (lambda: AutoClip(history_size=2.5), "history_size must be an int, got 2.5"),
        (lambda: AutoClip().step("big"), "norm must be a real number, got 'big'"),
        (lambda: get_policy([1.0]), "policy must be a Policy"),
    ],
)
def test_bad_types(factory, message):
    with pytest.raises(TypeError, match=message):
        factory()


def test_get_policy_and_config_round_trip():
    assert isinstance(get_policy(1.0), FixedThreshold)
    assert isinstance(get_policy("AutoClip"), AutoClip)
    z = get_policy("zclip")
    assert (z.alpha, z.z_thresh, z.warmup_steps) == (0.97, 2.5, 25)  # paper defaults
    for p in (FixedThreshold(3.0), AutoClip(5, 100), ZClip(0.9, 3.0, 10), SpikeDetector(20, 4.0, 5, 2.0)):
        clone = type(p).from_config(p.get_config())
        assert clone.get_config() == p.get_config() and repr(clone) == repr(p)


@pytest.mark.parametrize("policy", [lambda: ZClip(warmup_steps=5), lambda: AutoClip(percentile=10)],
                         ids=["zclip", "autoclip"])
def test_zero_norms_never_lock_a_clipping_policy_at_zero(policy):
    # A loss weight warmed up from 0: the first norms are exactly 0, then the real ones come.
    p = policy()
    assert all(p.step(0.0) == math.inf for _ in range(30))
    rng = np.random.default_rng(0)
    thresholds = [p.step(n) for n in 1.0 + 0.1 * rng.standard_normal(40)]
    assert min(thresholds) > 0.5  # the policy learnt the scale of the real norms, not of the zeros
    assert p.steps == 70


def test_a_flat_history_of_negative_losses_does_not_flag_noise():
    d = SpikeDetector(window=20, min_history=5)
    for _ in range(20):
        d.step(1.0, loss=-100.0)
    assert not any(d.step(1.0, loss=-99.9) for _ in range(5))  # noise around a negative log-likelihood
    assert d.step(1.0, loss=50.0) is True  # a real jump is still caught


def test_a_policy_without_get_config_says_what_to_define():
    from gradtools.policies import Policy

    class Halve(Policy):
        def step(self, norm):
            return 0.5 * float(norm)

    with pytest.raises(NotImplementedError, match=r"Halve must define get_config\(\)"):
        Halve().get_config()
