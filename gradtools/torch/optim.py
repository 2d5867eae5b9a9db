"""Optimisers for PyTorch under the shared settings; update sizes; a traced training run.

* :func:`make_optimizer`: ``torch.optim`` optimisers by name with the settings of
  :data:`gradtools.optim.SETTINGS` (the same update rule as ``gradtools.keras.make_optimizer``).
* :func:`update_sizes`: the step each optimiser takes for a given gradient sequence.
* :func:`train`: full-batch training that records loss, gradient norm, update size
  and learning rate per step, can inject a gradient spike, can normalise the
  gradient (normalised gradient descent), and can clip it (any policy, AGC).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradtools import _checks
from gradtools.optim import TrainTrace, check_clipping, check_run, settings
from gradtools.torch import _checks as _tchecks
from gradtools.torch.clip import Clipper, adaptive_clip_grad_
from gradtools.torch.models import _loss_fn, batch_tensors, weight_penalty
from gradtools.torch.norms import get_total_norm

__all__ = ["make_optimizer", "update_sizes", "train"]


def make_optimizer(name: str, params, lr: float, **overrides) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimiser by name, with the book's shared settings.

    Args:
        name (str): one of ``gradtools.optim.OPTIMIZER_NAMES``: ``"sgd"``,
            ``"momentum"``, ``"nesterov"``, ``"adagrad"``, ``"rmsprop"``,
            ``"adam"``, ``"adamw"``, ``"nadam"``.
        params: the parameters (``model.parameters()``).
        lr (float): the learning rate.
        **overrides: settings to change, named as in ``gradtools.optim.SETTINGS``
            (``beta_2=0.99``, ``eps=1e-3``, ...).

    Example:
        >>> import torch, gradtools.torch as gt
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = gt.make_optimizer("adam", [w], lr=0.1)
        >>> opt.defaults["eps"], opt.defaults["betas"]
        (1e-08, (0.9, 0.999))
    """
    s = settings(name, overrides)
    lr = _checks.positive("lr", lr)
    params = list(params)
    if name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=s.get("momentum", 0.0), nesterov=name == "nesterov")
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=s["initial_accumulator_value"],
                                   eps=s["eps"])
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=s["rho"], eps=s["eps"])
    betas = (s["beta_1"], s["beta_2"])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=s["eps"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=s["eps"], weight_decay=s["weight_decay"])
    return torch.optim.NAdam(params, lr=lr, betas=betas, eps=s["eps"], momentum_decay=s["momentum_decay"])


def update_sizes(name: str, grads, lr: float = 0.01, normalize: bool = False, **overrides) -> np.ndarray:
    """``||Δw||`` at each step when optimiser ``name`` is fed the gradients ``grads``.

    The parameter (float64) starts at zero; ``grads`` is an array of shape
    (steps, dim), e.g. from :func:`gradtools.optim.spike_gradients`. ``normalize`` divides each
    gradient by its norm first (normalised gradient descent with ``"sgd"``).
    Returns a float64 array of length ``steps``.
    """
    # float64, so that ||w_after - w_before|| keeps its digits once ||w|| >> ||Δw||.
    grads = torch.as_tensor(np.asarray(grads, dtype=np.float64))
    if grads.ndim != 2:
        raise ValueError(f"grads must have shape (steps, dim), got {tuple(grads.shape)}")
    w = torch.nn.Parameter(torch.zeros(grads.shape[1], dtype=torch.float64))
    opt = make_optimizer(name, [w], lr, **overrides)
    sizes = []
    for g in grads:
        before = w.detach().clone()
        w.grad = g / g.norm() if normalize else g.clone()
        opt.step()
        sizes.append((w.detach() - before).norm())
    return torch.stack(sizes).numpy()


def train(model, optimizer, x, y, steps: int, loss: str = "mse", scheduler=None, spike_at: int | None = None,
          spike_factor: float = 1000.0, normalize: bool = False, l1: float = 0.0, l2: float = 0.0,
          clip=None, agc: float | None = None) -> TrainTrace:
    """Full-batch training, step by step, with an optional gradient spike.

    Each step computes the loss on ``(x, y)``, backpropagates, multiplies every
    gradient by ``spike_factor`` at step ``spike_at`` (a stand-in for one bad
    batch), divides the gradient by its global norm if ``normalize``, clips it
    (``clip``, then ``agc``), steps the optimizer and then ``scheduler``.
    Training goes on after the loss turns non-finite, so a trace shows what
    really happens.

    Args:
        model (torch.nn.Module): the model; trained in place.
        optimizer (torch.optim.Optimizer): over ``model.parameters()``.
        x, y: the whole training set (arrays or tensors).
        steps (int): optimizer steps.
        loss: ``"mse"``, ``"crossentropy"`` (integer labels, logits) or a
            callable ``loss(output, target)``.
        scheduler: an ``LRScheduler`` on ``optimizer``, stepped after every step.
        spike_at (int or None): the step whose gradient is multiplied.
        spike_factor (float): the multiplier, default 1000.
        normalize (bool): normalised gradient descent (``g / ||g||``).
        l1, l2 (float): add :func:`gradtools.torch.weight_penalty` to the loss
            (Keras' ``L1L2`` kernel regularizer; default 0, none). This is an L2
            *penalty*: under Adam it differs from decoupled weight decay (AdamW).
        clip: clip the global norm with a :class:`~gradtools.torch.Clipper` of this
            policy: a positive number (a fixed threshold, ``clip_grad_norm_``), a
            registered name (``"autoclip"``, ``"zclip"``) or a
            :mod:`gradtools.policies` policy, whose state advances with the run
            (pass a fresh one per run). Default None, no clipping.
        agc (float or None): then clip unit-wise with :func:`adaptive_clip_grad_`
            at this ``clip_factor``. Default None.

    Returns:
        :class:`gradtools.optim.TrainTrace`; the per-step values stay on the
        device until the end of the run (with ``clip``, the policy reads each
        step's norm: one host sync per step).
    """
    _tchecks.module("model", model)
    _tchecks.optimizer("optimizer", optimizer, closure=False)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("optimizer must step without a closure; LBFGS re-evaluates the loss itself, "
                        "which would bypass the spike and the normalisation")
    steps, spike_at, spike_factor = check_run(steps, spike_at, spike_factor)
    l1, l2 = _checks.non_negative("l1", l1), _checks.non_negative("l2", l2)
    policy, agc = check_clipping(clip, agc, normalize)
    clipper = None if policy is None else Clipper(policy)
    fn = _loss_fn(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    xt, yt = batch_tensors(x, y, params[0])
    rows, clips = [], []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        value = fn(model(xt), yt)
        if l1 or l2:
            value = value + weight_penalty(model, l1, l2)
        value.backward()
        grads = [p.grad for p in params if p.grad is not None]
        with torch.no_grad():
            if step == spike_at:
                torch._foreach_mul_(grads, spike_factor)
            norm = get_total_norm(grads)
            # a finite gradient whose float32 sum of squares overflows: its norm in float64
            norm = torch.where(norm.isfinite(), norm, get_total_norm([g.double() for g in grads]).to(norm.dtype))
            if normalize:
                torch._foreach_div_(grads, norm)
            clips.append(_clip(model, clipper, agc))
            before = torch._foreach_mul(params, 1.0)
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        with torch.no_grad():
            update = get_total_norm(torch._foreach_sub(params, before))
        rows.append((value.detach(), norm, update, lr, get_total_norm(before)))
        if scheduler is not None:
            scheduler.step()
    trace = TrainTrace.from_rows(rows)
    for threshold, clipped in clips:
        trace.thresholds.append(threshold)
        trace.clipped.append(bool(clipped))
    return trace


def _clip(model, clipper, agc):
    """Clip the model's gradients as ``train`` does: ``(threshold, clipped)``, ``clipped`` maybe on the device."""
    threshold, clipped = math.inf, torch.zeros((), dtype=torch.bool)
    if clipper is not None:
        result = clipper(model)
        # the decision, norm > threshold, on the host: the same flag as gradtools.keras.train's
        threshold = float(result.threshold)
        clipped = torch.tensor(float(result.norm_before) > threshold)
    if agc is not None:
        clipped = clipped | (adaptive_clip_grad_(model, agc) > 0)
    return threshold, clipped
