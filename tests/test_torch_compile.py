"""torch.compile(fullgraph=True): the measurement, every clipping policy and the guard's decision
trace into one graph and decide as eager PyTorch does.

The unit tests compile with ``backend="aot_eager"`` (seconds on 2 cores); Inductor runs only in
``benchmarks/torch_overhead.py``.
"""

import copy
import math

import pytest
import torch
from torch_helpers import backward, tiny_mlp

import gradtools.torch as gt
from gradtools.policies import AutoClip, SpikeDetector, ZClip


def _compile(fn):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _grads(model, step):
    backward(model, seed=step, scale=100.0 if step == 6 else 1.0)  # a spike at step 6


def test_grad_stats_compiles_and_equals_eager():
    model = tiny_mlp(sizes=(5, 7, 7, 3))
    measure = _compile(lambda: gt.grad_stats(model))
    for step in range(3):
        _grads(model, step)
        got, want = measure(), gt.grad_stats(model)
        assert got.names == want.names
        torch.testing.assert_close(got.norms, want.norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(got.total, want.total, rtol=1e-6, atol=0)
        assert got.as_dict()["nonfinite"] == {n: 0 for n in want.names}


POLICIES = {"fixed": lambda: 0.5, "autoclip": lambda: AutoClip(percentile=50), "zclip": lambda: ZClip(warmup_steps=3)}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_clipping_policy_compiles_and_decides_as_eager(policy):
    eager_model = tiny_mlp(sizes=(5, 7, 7, 3))
    graph_model = copy.deepcopy(eager_model)
    eager, graph = gt.Clipper(POLICIES[policy]()), gt.Clipper(POLICIES[policy]())
    clip = _compile(lambda: graph(graph_model))
    clipped = []
    for step in range(9):
        _grads(eager_model, step)
        _grads(graph_model, step)
        a, b = eager(eager_model), clip()
        assert bool(a.clipped) == bool(b.clipped)
        clipped.append(bool(b.clipped))
        assert float(b.threshold) == pytest.approx(float(a.threshold), rel=1e-6) or math.isinf(float(a.threshold))
        torch.testing.assert_close(b.norm_before, a.norm_before, rtol=1e-6, atol=0)
        for p, q in zip(eager_model.parameters(), graph_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-12)
    assert clipped[6]  # the spike was clipped, in the graph as in eager
    assert eager.policy.state_dict()["steps"] == graph.policy.state_dict()["steps"] == 9


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("action", ["skip", "zero"])
def test_the_guards_decision_compiles_and_steps_as_eager(action, sync):
    def build():
        model = tiny_mlp(sizes=(5, 7, 7, 3))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        guard = gt.GradGuard(model, opt, action=action, spike=SpikeDetector(window=5, min_history=3),
                             clipper=gt.Clipper(ZClip(warmup_steps=3)), sync=sync)
        return model, opt, guard

    eager_model, _, eager = build()
    graph_model, _, graph = build()
    decide = _compile(graph.decide)  # the optimizer's own step stays outside the graph
    reasons = []
    for step in range(10):
        for model in (eager_model, graph_model):
            _grads(model, step)
            if step == 4:
                model[2].weight.grad[0, 0] = math.nan
        a = eager.step()
        b = decide()
        graph.apply(b)
        assert b.reason == a.reason
        reasons.append(b.reason)
        for p, q in zip(eager_model.parameters(), graph_model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert reasons[4] == ("zeroed" if action == "zero" else "nonfinite") and reasons[6] == "spike"
    # the state lives in tensors on the device from the guard's construction, updated in place:
    # ten steps, NaN and spike included, trace once (a recompilation per guard would soon reach
    # Dynamo's recompile limit, shared by every guard's decide)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert graph.state_dict()["skipped"] == eager.state_dict()["skipped"] >= 1


def test_a_new_guard_reuses_the_compiled_decision():
    """Dynamo caches graphs per function: a guard per run (a sweep, a notebook, a resumed job) must
    not trace ``decide`` again, or the ninth guard would reach the recompile limit and fail."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for seed in range(10):
        model = tiny_mlp(seed=seed, sizes=(5, 7, 7, 3))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        guard = gt.GradGuard(model, opt, spike=SpikeDetector(window=5, min_history=3),
                             clipper=gt.Clipper(ZClip(warmup_steps=3)), sync=False)
        decide = torch.compile(guard.decide, fullgraph=True, backend="aot_eager")
        for step in range(2):
            _grads(model, step)
            result = decide()
            guard.apply(result)
        assert result.stats.names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
