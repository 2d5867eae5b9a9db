"""Host reads in the PyTorch hot paths, counted.

On an accelerator every read of a tensor's value from Python (``float``,
``bool``, ``item``, ``tolist``...) and every copy to the CPU blocks until the
device has caught up. This machine has no GPU, so the test counts the calls
that would block there: a ``TorchFunctionMode`` sees every tensor method call,
including the conversions, and a ``.to()``/``.cpu()`` whose target is the CPU
counts as a copy to the host (on a CPU-only machine all tensors are on the
host already, which only makes the count conservative).
"""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch_helpers import backward, tiny_mlp

import gradtools.torch as gt
from gradtools.policies import AutoClip, SpikeDetector, ZClip

_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}


def _to_cpu(args, kwargs) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func in _READS or (func is torch.Tensor.cpu) or (func is torch.Tensor.to and _to_cpu(args, kwargs)):
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


_MODE = []


@pytest.fixture(autouse=True)
def as_on_an_accelerator(monkeypatch):
    """The guard decides with NumPy when the gradients are on the CPU, where reading the norm costs
    nothing; these tests count what it reads where reads cost: with the maths on the device."""
    monkeypatch.setattr(gt.GradGuard, "host_maths_on_cpu", False)


def test_on_the_cpu_the_guard_reads_the_norm_once_and_decides_with_numpy(monkeypatch):
    monkeypatch.setattr(gt.GradGuard, "host_maths_on_cpu", True)
    model = tiny_mlp(sizes=(5, 7, 7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = gt.GradGuard(model, opt, spike=SpikeDetector(min_history=2), clipper=gt.Clipper("zclip"))
    for step in range(4):
        backward(model, seed=step, scale=10.0)
        calls, result = _count(guard.step)
        # the first step also moves the state, made as tensors for decide(), to NumPy: free here
        assert result.stepped and (calls == ["__float__"] or step == 0), calls


def _count(fn):
    with HostReads() as mode:
        _MODE.append(mode)
        try:
            out = fn()
        finally:
            _MODE.pop()
    return mode.calls, out


def _uncounted(step):
    """The optimizer's own step, not counted: its reads are PyTorch's (Adam reads its step count,
    kept on the CPU for that reason), not the guard's."""

    def wrapped(*args, **kwargs):
        mode = _MODE[-1] if _MODE else None
        if mode is not None:
            mode.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            if mode is not None:
                mode.paused = False

    return wrapped


@pytest.mark.parametrize("clipper", [None, "zclip", 0.5], ids=["no clipper", "zclip", "fixed"])
def test_a_guarded_step_reads_one_number_the_verdict(clipper):
    model = tiny_mlp(sizes=(5, 7, 7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = gt.GradGuard(model, opt, spike=SpikeDetector(min_history=2),
                         clipper=None if clipper is None else gt.Clipper(clipper))
    for step in range(4):
        backward(model, seed=step, scale=10.0)
        calls, result = _count(guard.step)
        assert result.stepped and calls == ["__int__"], calls  # the verdict, once


def test_a_guarded_accumulated_window_reads_one_number():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acc = gt.Accumulator(model, opt, 2, guard=gt.GradGuard(model, opt), clipper=gt.Clipper(ZClip(warmup_steps=2)))
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))

    def window():
        acc.backward(model(x[:4]).pow(2).mean(), batch_size=4)
        return acc.backward(model(x[4:]).pow(2).mean(), batch_size=4)

    for _ in range(3):
        calls, stepped = _count(window)
        assert stepped and calls == ["__int__"], calls


def test_agc_and_unread_statistics_read_nothing():
    model = tiny_mlp(sizes=(5, 7, 7, 3))
    backward(model, scale=100.0)
    calls, n = _count(lambda: gt.adaptive_clip_grad_(model, clip_factor=0.01))
    assert calls == [] and int(n) > 0
    mon = gt.Monitor(model, count_nonfinite=False)
    calls, _ = _count(mon.record)
    assert calls == []
    calls, _ = _count(lambda: gt.clip_grad_norm_(model, 1.0))
    assert calls == []


def test_a_nonfinite_step_may_read_more_but_names_the_culprit():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.GradGuard(model, opt)
    backward(model)
    model[2].weight.grad[0, 0] = math.nan
    calls, result = _count(guard.step)
    assert not result.stepped and result.stats.first_nonfinite() == "2.weight"
    assert calls[0] == "__int__"


POLICIES = {"none": lambda: None, "fixed": lambda: 0.5, "zclip": lambda: ZClip(warmup_steps=3),
            "autoclip": lambda: AutoClip(percentile=50)}


def _run(action, policy, sync, faults, limit=10):
    model = tiny_mlp(sizes=(5, 7, 7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.step = _uncounted(opt.step)
    made = POLICIES[policy]()
    guard = gt.GradGuard(model, opt, action=action, spike=SpikeDetector(min_history=3, window=5), sync=sync,
                         clipper=None if made is None else gt.Clipper(made), check_every=1000,
                         max_consecutive_skips=limit)
    reads, results = [], []
    for step, fault in enumerate(faults):
        backward(model, seed=step, scale=1000.0 if fault == "spike" else 1.0)
        if fault == "nan":
            model[2].weight.grad[1, 1] = math.nan
        calls, result = _count(guard.step)
        reads.append(calls)
        results.append(result)
    return model, opt, guard, reads, results


FAULTS = ["ok"] * 5 + ["nan", "ok", "spike", "ok", "nan", "ok"]


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("action", ["skip", "zero"])
def test_without_sync_a_guarded_clipped_step_reads_nothing_and_does_what_the_synced_guard_does(action, policy):
    a = _run(action, policy, sync=True, faults=FAULTS)
    b = _run(action, policy, sync=False, faults=FAULTS)
    # the first step reads one flag: Adam creates its state there, and a skipped step must leave none
    # (no tensor operation deletes a dictionary entry); then no host read in 10 steps, NaN and spike
    # steps included
    assert b[3][0] == ["__bool__"] and all(calls == [] for calls in b[3][1:]), b[3]
    # the synced guard reads one integer a step; a non-finite norm costs more reads (the entries are
    # counted, to tell non-finite entries from a float32 norm that overflowed)
    assert all(calls == ["__int__"] for calls, fault in zip(a[3], FAULTS) if fault != "nan"), a[3]
    assert [r.reason for r in b[4]] == [r.reason for r in a[4]]
    assert [r.reason for r in a[4]].count("spike") == 1
    assert "nonfinite" in [r.reason for r in a[4]] or action == "zero"
    for p, q in zip(a[0].parameters(), b[0].parameters()):  # skipped steps were undone exactly
        assert torch.equal(p, q)
    for sa, sb in zip(a[1].state.values(), b[1].state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a[2].state_dict() == b[2].state_dict()


def test_without_sync_an_error_surfaces_at_the_next_read_or_check():
    model, opt, guard, reads, results = _run("raise", "zclip", sync=False, faults=["ok", "ok", "nan", "ok"])
    assert reads == [["__bool__"]] + [[]] * 3  # the first step reads one flag: the optimizer made its state
    with pytest.raises(gt.NonFiniteGradientError, match=r"non-finite gradient at step 3: first in parameter '2.weight'"):
        results[-1].stepped
    guard.check()  # reported once
    model, opt, guard, reads, results = _run("skip", "none", sync=False, faults=["ok", "nan", "nan", "ok"], limit=3)
    guard.check()  # two in a row: nothing to report
    model, opt, guard, reads, results = _run("skip", "none", sync=False, faults=["ok", "nan", "nan", "nan", "ok"],
                                             limit=3)
    assert reads == [["__bool__"]] + [[]] * 4 and guard.skipped == 3
    with pytest.raises(gt.TooManySkipsError, match="skipped 3 consecutive steps .the last at step 4"):
        guard.check()


def test_with_sync_decide_then_apply_reads_one_integer_a_step_taken():
    model = tiny_mlp(sizes=(5, 7, 7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.step = _uncounted(opt.step)
    guard = gt.GradGuard(model, opt, spike=SpikeDetector(min_history=3, window=5), clipper=gt.Clipper(ZClip()))
    reads = []
    for step in range(6):
        backward(model, seed=step)
        reads.append(_count(lambda: guard.apply(guard.decide()))[0])
    assert reads == [["__int__"]] * 6
