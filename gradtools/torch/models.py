"""PyTorch models built from :mod:`gradtools.models` weights, and a full-batch trainer."""

from __future__ import annotations

import numpy as np
import torch

from gradtools import _checks

__all__ = ["mlp", "train_full_batch"]

_ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "linear": torch.nn.Identity,
                "leaky_relu": lambda: torch.nn.LeakyReLU(0.01)}


def mlp(weights, activation: str = "relu", batchnorm: bool = False, dropout: float = 0.0) -> torch.nn.Sequential:
    """An MLP whose Linear layers hold ``weights`` (from ``gradtools.models.init_mlp``).

    Hidden layers use ``activation``; the last layer is linear. Without batch
    norm or dropout, layer ``k``'s parameters are named ``"{2k}.weight"`` and
    ``"{2k}.bias"``. ``batchnorm`` inserts ``BatchNorm1d`` (eps 1e-3, as Keras)
    before each hidden activation; ``dropout`` adds ``Dropout(p)`` after it.
    """
    _checks.choice("activation", activation, set(_ACTIVATIONS))
    dropout = _checks.in_range("dropout", dropout, 0.0, 1.0, high_open=True)
    layers = []
    for i, (kernel, bias) in enumerate(weights):
        kernel = np.asarray(kernel, dtype=np.float32)
        lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
            lin.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
        layers.append(lin)
        if i < len(weights) - 1:
            if batchnorm:
                layers.append(torch.nn.BatchNorm1d(kernel.shape[1], eps=1e-3))
            layers.append(_ACTIVATIONS[activation]())
            if dropout:
                layers.append(torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers)


def _loss_fn(loss: str):
    _checks.choice("loss", loss, {"mse", "crossentropy"})
    return torch.nn.MSELoss() if loss == "mse" else torch.nn.CrossEntropyLoss()


def train_full_batch(model, x, y, lr: float, steps: int, loss: str = "mse", clip_norm: float | None = None,
                     momentum: float = 0.0):
    """Full-batch SGD for ``steps`` steps; returns the loss before each step (floats).

    Training goes on after the loss turns non-finite, so a curve shows what
    really happens. ``clip_norm`` clips the global norm before each step.
    """
    lr = _checks.positive("lr", lr)
    steps = _checks.integer("steps", steps, minimum=1)
    from gradtools.torch.clip import clip_grad_norm_

    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    fn = _loss_fn(loss)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = fn(model(xt), yt)
        value.backward()
        if clip_norm is not None:
            clip_grad_norm_(model, clip_norm)
        opt.step()
        losses.append(value.detach())
    return [float(v) for v in losses]
