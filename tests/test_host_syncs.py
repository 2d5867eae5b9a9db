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
from gradtools.policies import SpikeDetector, ZClip

_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}


def _to_cpu(args, kwargs) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or (func is torch.Tensor.cpu) or (func is torch.Tensor.to and _to_cpu(args, kwargs)):
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


def _count(fn):
    with HostReads() as mode:
        out = fn()
    return mode.calls, out


@pytest.mark.parametrize("clipper", [None, "zclip", 0.5], ids=["no clipper", "zclip", "fixed"])
def test_a_guarded_step_reads_one_number(clipper):
    model = tiny_mlp(sizes=(5, 7, 7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = gt.GradGuard(model, opt, spike=SpikeDetector(min_history=2),
                         clipper=None if clipper is None else gt.Clipper(clipper))
    for step in range(4):
        backward(model, seed=step, scale=10.0)
        calls, result = _count(guard.step)
        assert result.stepped and calls == ["__float__"], calls  # the global norm, once


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
        assert stepped and calls == ["__float__"], calls


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
    assert calls[0] == "__float__"
