"""Half-precision gradients (float16, bfloat16): exact non-finite counts, and norms that overflow the dtype."""

import math

import pytest
import torch

import gradtools.torch as gt
from gradtools.torch.norms import count_nonfinite_entries


@pytest.mark.parametrize("dtype, n", [(torch.float16, 3000), (torch.float16, 70000), (torch.bfloat16, 257),
                                      (torch.bfloat16, 1001), (torch.float32, 2**24 + 3)])
def test_nonfinite_entries_are_counted_exactly_in_int64(dtype, n):
    g = torch.full((n,), math.nan, dtype=dtype)
    g[::2] = math.inf
    counts = count_nonfinite_entries([g, torch.ones(3, dtype=dtype)])
    assert counts.dtype == torch.int64 and counts.tolist() == [n, 0]


def test_the_guard_names_the_exact_count_of_an_all_nan_float16_weight():
    model = torch.nn.Linear(65, 63).half()  # 4095 entries: not a float16 number
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.GradGuard(model, opt, action="raise")
    model.weight.grad = torch.full((63, 65), math.nan, dtype=torch.float16)
    model.bias.grad = torch.zeros(63, dtype=torch.float16)
    with pytest.raises(gt.NonFiniteGradientError, match=r"'weight' \(4095 non-finite entries in all\)"):
        guard.step()


@pytest.mark.parametrize("action", ["skip", "zero", "raise"])
def test_finite_float16_gradients_whose_norm_exceeds_65504_are_clipped_not_zeroed(action):
    model = torch.nn.Linear(100, 1).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gt.GradGuard(model, opt, action=action, clipper=gt.Clipper(1.0))
    model.weight.grad = torch.full((1, 100), 10000.0, dtype=torch.float16)  # norm 1e5 > 65504, entries finite
    model.bias.grad = torch.zeros(1, dtype=torch.float16)
    result = guard.step()
    assert (result.stepped, result.reason) == (True, "ok")
    assert float(result.stats.total) == pytest.approx(1e5, rel=1e-6)
    after = torch.linalg.vector_norm(model.weight.grad.float())
    assert float(after) == pytest.approx(1.0, rel=2e-3)  # clipped to 1 (float16 rounding), not multiplied by 0


def test_clip_grad_norm_keeps_torchs_float16_result():
    # torch.nn.utils measures a float16 gradient in float16: an inf norm, and a zero coefficient. So do we.
    grads = [torch.full((100,), 10000.0, dtype=torch.float16) for _ in range(2)]
    ours = [g.clone().requires_grad_() for g in grads]
    theirs = [g.clone().requires_grad_() for g in grads]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    assert torch.equal(gt.clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert torch.equal(gt.get_total_norm(grads), torch.nn.utils.get_total_norm(grads))
