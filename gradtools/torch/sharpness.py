"""Sharpness: the top eigenvalue of the loss Hessian, by power iteration on HVPs.

Gradient descent with learning rate ``lr`` is stable on a quadratic only if
``lambda_max < 2 / lr``. For neural networks, Cohen et al. (2021, "Gradient
Descent on Neural Networks Typically Occurs at the Edge of Stability") observed
that full-batch GD drives ``lambda_max`` up to about ``2 / lr`` and keeps it
there. This module measures ``lambda_max`` with Hessian-vector products
(double back-propagation, Pearlmutter 1994), never forming the Hessian; the
power iteration is :func:`gradtools.maths.power_iteration`, shared with Keras.
"""

from __future__ import annotations

import torch

from gradtools.maths import power_iteration
from gradtools.torch import _checks as _tchecks

__all__ = ["hessian_vector_product", "top_hessian_eigenvalue"]


def hessian_vector_product(loss: torch.Tensor, params: list, vector: list, grads=None) -> list:
    """``H v`` for the Hessian of ``loss`` with respect to ``params``.

    ``grads``: the first derivatives taken with ``create_graph=True``, when the caller
    keeps them across several products (as the power iteration does). A parameter
    the loss does not use gets a zero product.
    """
    if grads is None:
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector))
    if not dot.requires_grad:  # a loss linear in the parameters: its Hessian is 0
        return [torch.zeros_like(p) for p in params]
    # A parameter the loss does not use (an auxiliary head) has zero rows in the Hessian.
    return list(torch.autograd.grad(dot, params, retain_graph=True, materialize_grads=True))


def top_hessian_eigenvalue(model, loss_fn, iters: int = 20, tol: float = 1e-4, seed: int = 0) -> float:
    """Largest-magnitude Hessian eigenvalue of ``loss_fn(model)`` by power iteration.

    Args:
        model (torch.nn.Module): the model; its parameters are not changed.
        loss_fn (callable): ``loss_fn(model) -> 0-d tensor`` on a fixed batch.
        iters (int): maximum iterations, default 20.
        tol (float): stop when the relative change of the estimate is below this.
        seed (int): seed of the random start vector.

    Returns:
        The eigenvalue estimate (a Python float).
    """
    _tchecks.module("model", model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")
    loss = loss_fn(model)
    grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)

    def matvec(vectors):
        vs = [torch.as_tensor(v, dtype=p.dtype, device=p.device) for v, p in zip(vectors, params)]
        return [h.detach().cpu().double().numpy() for h in hessian_vector_product(loss, params, vs, grads)]

    return power_iteration(matvec, [tuple(p.shape) for p in params], iters, tol, seed)
