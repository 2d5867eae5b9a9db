"""Small PyTorch experiments shared by chapters and tests: quadratics, RNN gradients, sharpness during GD."""

from __future__ import annotations

import numpy as np
import torch

from gradtools import _checks
from gradtools.torch.sharpness import top_hessian_eigenvalue

__all__ = ["sgd_on_quadratic", "rnn", "rnn_input_gradients", "sharpness_during_gd", "activation_gradients"]


def sgd_on_quadratic(A, x0, lr: float, steps: int = 300, momentum: float = 0.0, nesterov: bool = False) -> float:
    """Run ``torch.optim.SGD`` on ``x^T A x / 2``; return ``||x_T|| / ||x_0||`` (inf if it overflowed)."""
    lr = _checks.positive("lr", lr)
    x = torch.tensor(np.asarray(x0, dtype=np.float64), requires_grad=True)
    At = torch.as_tensor(np.asarray(A, dtype=np.float64))
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum, nesterov=nesterov)
    for _ in range(steps):
        with torch.no_grad():  # the exact gradient, A x: no autograd graph per step
            x.grad = At @ x
        opt.step()
    ratio = float(x.detach().norm() / torch.as_tensor(np.asarray(x0, dtype=np.float64)).norm())
    return ratio if np.isfinite(ratio) else float("inf")


class _RNN(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        hidden = w["W_rec"].shape[0]
        self.rnn = torch.nn.RNN(w["W_in"].shape[0], hidden, nonlinearity="tanh", batch_first=True)
        self.out = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rnn.weight_ih_l0.copy_(torch.from_numpy(w["W_in"].T.copy()))
            self.rnn.weight_hh_l0.copy_(torch.from_numpy(w["W_rec"].T.copy()))
            self.rnn.bias_ih_l0.copy_(torch.from_numpy(w["b"]))
            self.rnn.bias_hh_l0.zero_()
            self.out.weight.copy_(torch.from_numpy(w["W_out"].T.copy()))
            self.out.bias.copy_(torch.from_numpy(w["b_out"]))
        # One bias, as Keras' SimpleRNN has: a trainable second bias would get the same
        # gradient as the first and move the sum twice as fast.
        self.rnn.bias_hh_l0.requires_grad_(False)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def rnn(weights) -> torch.nn.Module:
    """A vanilla tanh RNN with a linear read-out of the last state, from ``gradtools.models.init_rnn``.

    ``torch.nn.RNN`` has two biases; the second (``bias_hh_l0``) stays 0 and frozen,
    so the model trains exactly as the Keras twin (``SimpleRNN``, one bias).
    """
    return _RNN(weights)


def rnn_input_gradients(weights, x, y) -> np.ndarray:
    """``||dL/dx_t||`` for every time step t (mean over the batch) of an MSE loss on the last output.

    How much the loss can still "hear" step t: it vanishes or explodes with the
    distance ``T - t`` as the recurrent Jacobians multiply.
    """
    model = rnn(weights)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    torch.nn.functional.mse_loss(model(xt), torch.as_tensor(np.asarray(y))).backward()
    return xt.grad.norm(dim=2).mean(dim=0).double().numpy()


def sharpness_during_gd(model, loss_fn, lr: float, steps: int, every: int = 50, iters: int = 20):
    """Full-batch GD with ``torch.optim.SGD``; sharpness every ``every`` steps.

    Returns a dict with ``step`` and ``sharpness`` (sampled) and ``loss`` (every step).
    """
    lr = _checks.positive("lr", lr)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = {"step": [], "sharpness": [], "loss": []}
    for s in range(steps + 1):
        if s % every == 0:
            out["step"].append(s)
            out["sharpness"].append(top_hessian_eigenvalue(model, loss_fn, iters=iters, tol=1e-3))
        if s == steps:
            break
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        out["loss"].append(loss.detach())
    out["loss"] = [float(v) for v in out["loss"]]
    return out


def activation_gradients(model, x, y, loss: str = "mse") -> np.ndarray:
    """``||dL/dh_l||`` for the output ``h_l`` of every hidden activation of an MLP from :func:`mlp`.

    This is the quantity the product of Jacobians acts on. (Weight gradients
    ``dL/dW_l = delta_l h_{l-1}^T`` mix it with the forward activations, which can
    hide a vanishing backward signal.)
    """
    _checks.choice("loss", loss, {"mse", "crossentropy"})
    outs = []

    def keep(module, inputs, output):  # returns None: the output itself is left as it is
        output.retain_grad()
        outs.append(output)

    hooks = [m.register_forward_hook(keep)
             for m in model if isinstance(m, (torch.nn.ReLU, torch.nn.Tanh, torch.nn.LeakyReLU))]
    try:
        pred = model(torch.as_tensor(np.asarray(x)))
        target = torch.as_tensor(np.asarray(y))
        value = torch.nn.functional.mse_loss(pred, target) if loss == "mse" else \
            torch.nn.functional.cross_entropy(pred, target)
        value.backward()
    finally:
        for h in hooks:
            h.remove()
    return np.array([float(o.grad.norm()) for o in outs])
