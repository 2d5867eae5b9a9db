"""PyTorch models built from :mod:`gradtools.models` weights, and a full-batch trainer."""

from __future__ import annotations

import numpy as np
import torch

from gradtools import _checks
from gradtools.models import _norm_choice as _check_norm
from gradtools.models import _residual_weights
from gradtools.torch import _checks as _tchecks

__all__ = ["mlp", "residual_mlp", "ResidualMLP", "train_full_batch", "weight_penalty"]

_ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "linear": torch.nn.Identity,
                "leaky_relu": lambda: torch.nn.LeakyReLU(0.01)}


def _norm_layer(norm, width: int) -> torch.nn.Module:
    """The normalisation layer ``norm`` names, with Keras' epsilon (1e-3) so both frameworks agree."""
    if norm == "batch":
        return torch.nn.BatchNorm1d(width, eps=1e-3)
    if norm == "layer":
        return torch.nn.LayerNorm(width, eps=1e-3)
    return torch.nn.Identity()


def _linear(kernel, bias) -> torch.nn.Linear:
    kernel = np.asarray(kernel, dtype=np.float32)
    lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
        lin.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
    return lin


def mlp(weights, activation: str = "relu", norm: str | None = None, dropout: float = 0.0) -> torch.nn.Sequential:
    """An MLP whose Linear layers hold ``weights`` (from ``gradtools.models.init_mlp``).

    Hidden layers use ``activation``; the last layer is linear. Without a norm
    or dropout, layer ``k``'s parameters are named ``"{2k}.weight"`` and
    ``"{2k}.bias"``. ``norm="batch"`` inserts ``BatchNorm1d``, ``norm="layer"``
    ``LayerNorm`` (both with eps 1e-3, as Keras) before each hidden activation;
    ``dropout`` adds ``Dropout(p)`` after it. In training mode the network equals
    ``gradtools.keras.mlp`` from the same weights; in evaluation mode after some
    training, batch norm's running variance differs slightly (PyTorch updates it
    with the unbiased batch variance, Keras with the biased one).
    """
    _checks.choice("activation", activation, set(_ACTIVATIONS))
    norm = _check_norm(norm)
    dropout = _checks.in_range("dropout", dropout, 0.0, 1.0, high_open=True)
    layers = []
    for i, (kernel, bias) in enumerate(weights):
        layers.append(_linear(kernel, bias))
        if i < len(weights) - 1:
            if norm is not None:
                layers.append(_norm_layer(norm, np.shape(kernel)[1]))
            layers.append(_ACTIVATIONS[activation]())
            if dropout:
                layers.append(torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers)


class ResidualMLP(torch.nn.Module):
    """A stem, residual blocks with one-layer branches, a head: see :func:`residual_mlp`.

    Parameters: ``stem``, ``blocks.{i}`` (the branch Linear layers), ``norms.{i}``
    (when ``norm`` is set) and ``head``, registered in that order, so the weight
    matrices come input side first.
    """

    def __init__(self, weights, activation: str = "relu", norm: str | None = None, placement: str = "pre"):
        super().__init__()
        _checks.choice("activation", activation, set(_ACTIVATIONS))
        self.norm = _check_norm(norm)
        self.placement = _checks.choice("placement", placement, {"pre", "post"})
        weights, width = _residual_weights(weights)
        self.stem = _linear(*weights[0])
        self.blocks = torch.nn.ModuleList(_linear(*w) for w in weights[1:-1])
        # pre: a norm before every branch and one before the head; post: one after every addition
        count = len(self.blocks) + (self.placement == "pre")
        self.norms = torch.nn.ModuleList(_norm_layer(norm, width) for _ in range(count))
        self.head = _linear(*weights[-1])
        self.act = _ACTIVATIONS[activation]()

    def forward(self, x):
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            if self.placement == "pre":
                h = h + block(self.act(self.norms[i](h)))
            else:
                h = self.norms[i](h + block(self.act(h)))
        if self.placement == "pre":
            h = self.norms[-1](h)
        return self.head(self.act(h))


def residual_mlp(weights, activation: str = "relu", norm: str | None = None, placement: str = "pre") -> ResidualMLP:
    """A residual MLP whose Linear layers hold ``weights`` (from ``gradtools.models.init_residual_mlp``).

    ``h = stem(x)``; each block adds a one-layer branch, ``h = h + W act(N(h))``
    with ``placement="pre"`` (pre-norm, pre-activation) or ``h = N(h + W act(h))``
    with ``placement="post"`` (post-norm, as the original Transformer); the output
    is ``head(act(N(h)))`` (pre) or ``head(act(h))`` (post). ``N`` is batch norm,
    layer norm (eps 1e-3 as Keras) or nothing (``norm=None``). Without the skips,
    the pre-norm network is exactly ``mlp(weights, activation, norm)``.

    Example:
        >>> import torch
        >>> from gradtools.models import init_residual_mlp
        >>> w = init_residual_mlp(4, 8, blocks=3, out_features=2)
        >>> net = residual_mlp(w, norm="layer")
        >>> net(torch.ones(5, 4)).shape
        torch.Size([5, 2])
    """
    return ResidualMLP(weights, activation, norm, placement)


def weight_penalty(model, l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """``l1 * sum|W| + l2 * sum W**2`` over the weight matrices (parameters with 2+ dimensions).

    The PyTorch twin of Keras' ``kernel_regularizer=keras.regularizers.L1L2(l1, l2)``
    on every layer (biases and norm scales are not penalised). Its gradient adds
    ``l1 * sign(W)`` (at most ``l1`` per entry) and ``2 * l2 * W``. Add it to the loss.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[3.0, -4.0]]))
        >>> round(weight_penalty(lin, l1=0.1, l2=0.01).item(), 6)
        0.95
    """
    _tchecks.module("model", model)
    l1 = _checks.non_negative("l1", l1)
    l2 = _checks.non_negative("l2", l2)
    mats = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    total = torch.zeros((), dtype=mats[0].dtype if mats else torch.float32)
    for w in mats:
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.square().sum()
    return total


def _mse(pred, target):
    if target.shape != pred.shape:
        if pred.shape[-1:] == (1,) and target.shape == pred.shape[:-1]:
            target = target.unsqueeze(-1)  # (N,) targets for (N, 1) outputs, aligned as Keras aligns them
        else:
            raise ValueError(f"y has shape {tuple(target.shape)} but the model outputs {tuple(pred.shape)}: "
                             "mse needs the same shape (it would broadcast them)")
    return torch.nn.functional.mse_loss(pred, target)


def _loss_fn(loss):
    """``loss(output, target)``: ``"mse"``, ``"crossentropy"`` (integer labels, logits) or a callable."""
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be 'mse', 'crossentropy' or a callable, got {type(loss).__name__}")
    _checks.choice("loss", loss, {"mse", "crossentropy"})
    return _mse if loss == "mse" else torch.nn.functional.cross_entropy


def batch_tensors(x, y, like: torch.Tensor):
    """``x`` and ``y`` as tensors on ``like``'s device: floating data in ``like``'s dtype (float64 NumPy
    arrays into a float32 model, as Keras does), integer labels as int64 (what ``cross_entropy`` needs)."""
    out = []
    for a in (x, y):
        t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
        out.append(t.to(device=like.device, dtype=like.dtype if t.is_floating_point() else torch.int64))
    return out


def train_full_batch(model, x, y, lr: float, steps: int, loss: str = "mse", clip_norm: float | None = None,
                     momentum: float = 0.0):
    """Full-batch SGD for ``steps`` steps; returns the loss before each step (floats).

    Training goes on after the loss turns non-finite, so a curve shows what
    really happens. ``clip_norm`` clips the global norm before each step.
    """
    lr = _checks.positive("lr", lr)
    steps = _checks.integer("steps", steps, minimum=1)
    from gradtools.torch.clip import clip_grad_norm_

    params = list(model.parameters())
    xt, yt = batch_tensors(x, y, params[0])
    fn = _loss_fn(loss)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
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
