"""Accumulation, LR range test, sharpness, monitor."""

import numpy as np
import pytest
import torch

import gradtools.torch as gt
from torch_helpers import tiny_mlp


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


@pytest.mark.parametrize("sizes", [[6, 6, 6, 6], [10, 3, 7, 4], [5, 5, 5, 5, 4]])
def test_accumulation_equals_large_batch(sizes):
    x, y = _data(sum(sizes))
    big, acc_model = tiny_mlp(), tiny_mlp()
    torch.nn.functional.mse_loss(big(x), y).backward()
    opt = torch.optim.SGD(acc_model.parameters(), lr=0.0)  # lr 0: inspect the gradient at the boundary
    grads = {}
    orig_step = opt.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in acc_model.named_parameters()})
        return orig_step(*a, **k)

    opt.step = capture
    acc = gt.Accumulator(acc_model, opt, accumulation_steps=len(sizes))
    start = 0
    for i, n in enumerate(sizes):
        xb, yb = x[start:start + n], y[start:start + n]
        stepped = acc.backward(torch.nn.functional.mse_loss(acc_model(xb), yb), batch_size=n)
        assert stepped == (i == len(sizes) - 1)
        start += n
    for name, p in big.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7)


def test_partial_last_window_and_clip_at_boundary():
    x, y = _data(10)
    big, model = tiny_mlp(), tiny_mlp()
    torch.nn.functional.mse_loss(big(x[6:]), y[6:]).backward()
    gt.clip_grad_norm_(big, 0.05)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ref_opt = torch.optim.SGD(big.parameters(), lr=1.0)
    ref_opt.step()
    acc = gt.Accumulator(model, opt, accumulation_steps=4, clipper=gt.Clipper(0.05))
    # first window: 3 micro-batches of 2 (partial after the data ends), then flush
    for i in range(3):
        acc.backward(torch.nn.functional.mse_loss(model(x[2 * i:2 * i + 2]), y[2 * i:2 * i + 2]), batch_size=2)
    assert acc.flush() and acc.optimizer_steps == 1
    assert not acc.flush()
    # second window, closed with last=True after 2 micro-batches, compare to a clipped large batch
    model2 = tiny_mlp()
    opt2 = torch.optim.SGD(model2.parameters(), lr=1.0)
    acc2 = gt.Accumulator(model2, opt2, accumulation_steps=4, clipper=gt.Clipper(0.05))
    acc2.backward(torch.nn.functional.mse_loss(model2(x[6:8]), y[6:8]), batch_size=2)
    assert acc2.backward(torch.nn.functional.mse_loss(model2(x[8:]), y[8:]), batch_size=2, last=True)
    assert acc2.last_clip.clipped
    for a, b in zip(model2.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lr_range_test_restores_and_suggests():
    x, y = _data(64)
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # give Adam some state to restore
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    before_params = {k: v.clone() for k, v in model.state_dict().items()}
    before_state = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    result = gt.lr_range_test(model, opt, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                              [(x, y)], start_lr=1e-5, end_lr=100.0, num_steps=60)
    assert result.diverged_at is not None and result.diverged_at < 59
    assert 1e-5 < result.suggested_lr < result.lrs[result.diverged_at]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_params[k])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], before_state[k])
    assert opt.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="end_lr must be greater than start_lr"):
        gt.lr_range_test(model, opt, lambda m, b: m(b).sum(), [x], start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="batches is empty"):
        gt.lr_range_test(model, opt, lambda m, b: m(b).sum(), [])


def test_sharpness_matches_exact_hessian_of_linear_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    y = torch.randn(50, 1, generator=g)
    model = torch.nn.Linear(4, 1, bias=False)
    lam = gt.top_hessian_eigenvalue(model, lambda m: torch.nn.functional.mse_loss(m(x), y), iters=100, tol=1e-10)
    exact = np.linalg.eigvalsh(2 * (x.T @ x).numpy() / 50).max()  # Hessian of mean squared error
    assert lam == pytest.approx(exact, rel=1e-4)


def test_hessian_vector_product_equals_the_exact_hessian_times_v():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 3, generator=g), torch.randn(30, 1, generator=g)
    model = torch.nn.Linear(3, 1, bias=False)
    params = list(model.parameters())
    loss = torch.nn.functional.mse_loss(model(x), y)
    v = [torch.randn(1, 3, generator=g)]
    exact = (2 * (x.T @ x) / 30) @ v[0].T
    np.testing.assert_allclose(gt.hessian_vector_product(loss, params, v)[0].T.numpy(), exact.numpy(), rtol=1e-5)
    grads = torch.autograd.grad(loss, params, create_graph=True)  # kept across products, as the power iteration does
    for _ in range(2):
        np.testing.assert_allclose(gt.hessian_vector_product(loss, params, v, grads)[0].T.numpy(), exact.numpy(),
                                   rtol=1e-5)


def test_monitor_records_on_sampled_steps_only():
    x, y = _data(16)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gt.Monitor(model, every=3, track_updates=True)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        mon.record()
        opt.step()
        mon.after_step()
    h = mon.history
    assert h["step"] == [1, 4, 7, 10]
    assert set(h["norms"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(v == 0 for vals in h["nonfinite"].values() for v in vals)
    assert len(h["update_ratio"]["0.weight"]) == 4 and all(0 < r < 1 for r in h["update_ratio"]["0.weight"])
    assert h["total_norm"][0] == pytest.approx(np.sqrt(sum(v[0] ** 2 for v in h["norms"].values())), rel=1e-5)


def test_monitor_keeps_each_parameters_name_when_a_layer_is_frozen():
    x, y = _data(16)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gt.Monitor(model, track_updates=True)
    truth = []
    for step in range(4):
        if step == 2:
            model[0].requires_grad_(False)  # freeze the first layer
            model[0].weight.grad = model[0].bias.grad = None
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        truth.append({n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None})
        mon.record()
        opt.step()
        mon.after_step()
    h = mon.history
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        want = [t.get(name, float("nan")) for t in truth]
        np.testing.assert_allclose(h["norms"][name], want, rtol=1e-6)
    assert h["nonfinite"]["0.weight"] == [0, 0, None, None] and h["nonfinite"]["2.bias"] == [0, 0, 0, 0]
    assert h["update_ratio"]["0.weight"][2:] == [0.0, 0.0] and min(h["update_ratio"]["2.weight"]) > 0


def test_accumulator_counts_only_the_steps_it_took():
    x, y = _data(16)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gt.Accumulator(model, opt, 2, guard=gt.GradGuard(model, opt))
    stepped = []
    for w in range(3):
        for k in range(2):
            xb = x[8 * k:8 * k + 8].clone()
            if w == 1:
                xb[0, 0] = float("nan")  # poisons the second window
            stepped.append(acc.backward(torch.nn.functional.mse_loss(model(xb), y[:8]), batch_size=8))
    assert stepped == [False, True, False, False, False, True]
    assert acc.windows == 3 and acc.optimizer_steps == 2 and acc.last_guard.reason == "ok"


def test_clipper_state_carries_its_norm_type_and_norm_type_must_be_a_norm():
    a = gt.Clipper(1.0, norm_type=float("inf"))
    b = gt.Clipper(1.0)
    b.load_state_dict(a.state_dict())
    assert b.norm_type == float("inf")
    with pytest.raises(ValueError, match=r"state_dict\['norm_type'\] must be a number >= 1 or inf"):
        b.load_state_dict({**a.state_dict(), "norm_type": 0.5})
    with pytest.raises(ValueError, match=r"norm_type must be a number >= 1 or inf \(a p-norm\), got 0.5"):
        gt.Clipper(1.0, norm_type=0.5)


def test_lr_range_test_draws_batches_lazily():
    x, y = _data(64)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    drawn, used = [0], []

    def loader():  # a one-shot stream: the sweep must draw one batch per step, never ahead
        for i in range(30):
            drawn[0] += 1
            yield i, (x[i % 8 * 8:(i % 8 + 1) * 8], y[i % 8 * 8:(i % 8 + 1) * 8])

    def loss_fn(m, batch):
        used.append((batch[0], drawn[0]))
        return torch.nn.functional.mse_loss(m(batch[1][0]), batch[1][1])

    r = gt.lr_range_test(model, opt, loss_fn, loader(), start_lr=1e-4, end_lr=1e-2, num_steps=50)
    assert [i for i, _ in used] == list(range(30)) and all(d == i + 1 for i, d in used)
    assert len(r.lrs) == 30 and r.diverged_at is None  # the stream ended the sweep
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16])]  # a list is re-iterated
    r = gt.lr_range_test(model, opt, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches,
                         start_lr=1e-4, end_lr=1e-2, num_steps=5)
    assert len(r.lrs) == 5


def test_the_accumulator_keeps_stepping_after_a_caught_guard_error():
    x, y = _data(16)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gt.Accumulator(model, opt, 2, guard=gt.GradGuard(model, opt, action="raise"))
    stepped = []
    for w in range(3):
        for k in range(2):
            xb = x[8 * k:8 * k + 8].clone()
            if w == 1 and k == 1:
                xb[0, 0] = float("nan")
            try:
                stepped.append(acc.backward(torch.nn.functional.mse_loss(model(xb), y[:8]), batch_size=8))
            except gt.NonFiniteGradientError:
                stepped.append("error")
                assert all(p.grad is None for p in model.parameters())  # the bad window is gone
    assert stepped == [False, True, False, "error", False, True]
    assert (acc.micro_step, acc.samples, acc.windows, acc.optimizer_steps) == (0, 0, 3, 2)


@pytest.mark.parametrize("with_guard", [False, True])
def test_the_accumulators_monitor_records_the_window_mean_gradient_before_clipping(with_guard):
    x, y = _data(24)
    model, big = tiny_mlp(), tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gt.Monitor(model, track_updates=True)
    clipper = gt.Clipper(1e-3)
    guard = gt.GradGuard(model, opt) if with_guard else None
    acc = gt.Accumulator(model, opt, 3, clipper=clipper, guard=guard, monitor=monitor)
    for k, n in enumerate((8, 8, 8)):
        acc.backward(torch.nn.functional.mse_loss(model(x[8 * k:8 * k + n]), y[8 * k:8 * k + n]), batch_size=n)
    torch.nn.functional.mse_loss(big(x), y).backward()  # the large-batch gradient of the same window
    want = float(torch.nn.utils.get_total_norm([p.grad for p in big.parameters()]))
    h = monitor.history
    assert h["step"] == [1] and h["total_norm"][0] == pytest.approx(want, rel=1e-5) and want > 1e-2
    assert h["update_ratio"]["0.weight"][0] > 0  # after_step ran after the optimizer step
    if with_guard:
        assert guard.monitor is monitor
    with pytest.raises(ValueError, match="monitor and guard.monitor are both set and differ"):
        gt.Accumulator(model, opt, 3, guard=gt.GradGuard(model, opt, monitor=gt.Monitor(model)), monitor=monitor)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(clipper=1.0), TypeError, "clipper must be a gradtools Clipper or None, got float"),
    (dict(guard=gt.Clipper(1.0)), TypeError, "guard must be a gradtools.torch.GradGuard or None, got Clipper"),
])
def test_the_accumulator_checks_its_clipper_and_guard(kwargs, exc, message):
    model = tiny_mlp()
    with pytest.raises(exc, match=message):
        gt.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, **kwargs)


def test_the_accumulator_averages_and_clears_model_parameters_the_optimizer_does_not_own():
    x, y = _data(16)
    model, big = tiny_mlp(), tiny_mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.0)  # the first layer stays trainable but is not stepped
    monitor = gt.Monitor(model)
    acc = gt.Accumulator(model, opt, 2, monitor=monitor)
    for w in range(2):
        for k in range(2):
            acc.backward(torch.nn.functional.mse_loss(model(x[8 * k:8 * k + 8]), y[8 * k:8 * k + 8]), batch_size=8)
    torch.nn.functional.mse_loss(big(x), y).backward()
    want = float(big[0].weight.grad.norm())
    assert monitor.history["norms"]["0.weight"] == pytest.approx([want, want], rel=1e-5)
    assert model[0].weight.grad is None


def test_sharpness_treats_a_parameter_the_loss_does_not_use_as_zero_curvature():
    x, y = _data(16)
    model = tiny_mlp()
    head = torch.nn.Linear(3, 1)  # an auxiliary head, trainable but unused by this loss
    both = torch.nn.ModuleDict({"body": model, "aux": head})
    with_aux = gt.top_hessian_eigenvalue(both, lambda m: torch.nn.functional.mse_loss(m["body"](x), y))
    alone = gt.top_hessian_eigenvalue(model, lambda m: torch.nn.functional.mse_loss(m(x), y))
    assert with_aux == pytest.approx(alone, rel=1e-3) and alone > 0
