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
