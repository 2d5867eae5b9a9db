"""Per-layer gradient flow of any PyTorch model: the twin of :mod:`gradtools.keras.flow`.

:func:`layer_gradients` runs one forward and backward pass and returns, for
every weight matrix (a parameter with two or more dimensions: Linear, conv and
embedding weights; biases and norm scales are left out), the norm of its
gradient and of the matrix itself, input side first. It uses
``torch.autograd.grad``, so the parameters' ``.grad`` fields are left untouched.

Example:
    >>> import torch, gradtools.torch as gt
    >>> from gradtools.models import init_mlp
    >>> model = gt.mlp(init_mlp([4, 8, 8, 2], seed=0))
    >>> flow = gt.layer_gradients(model, torch.ones(16, 4), torch.zeros(16, 2))
    >>> flow.names
    ['0', '2', '4']
    >>> flow.grad_norms.shape, bool(model[0].weight.grad is None)
    ((3,), True)
"""

from __future__ import annotations

import torch

from gradtools.stats import LayerGradients
from gradtools.torch import _checks as _tchecks
from gradtools.torch.models import _loss_fn, batch_tensors, weight_penalty

__all__ = ["layer_gradients", "LayerGradients"]


def _weight_matrices(model) -> list:
    _tchecks.module("model", model)
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    if not pairs:
        raise ValueError(f"model ({type(model).__name__}) has no trainable weight matrices to measure")
    return [(n[: -len(".weight")] if n.endswith(".weight") else n, p) for n, p in pairs]


def layer_gradients(model, x, y, loss="mse", l1: float = 0.0, l2: float = 0.0) -> LayerGradients:
    """Gradient norm of every weight matrix of ``model`` on the batch ``(x, y)``.

    Args:
        model (torch.nn.Module): any model; run in its current mode (a new model
            is in training mode, like Keras' ``training=True``; batch norm then
            updates its running statistics, as in any training forward pass).
        x, y: the batch (arrays or tensors; moved to the model's device, floating
            data in the model's dtype, integer labels as int64).
        loss: ``"mse"``, ``"crossentropy"`` (integer labels, logits) or a callable
            ``loss(output, target)`` returning a scalar tensor.
        l1, l2 (float): add :func:`gradtools.torch.weight_penalty` to the loss, the
            twin of a Keras ``kernel_regularizer`` (default 0: none).

    Returns:
        :class:`gradtools.stats.LayerGradients` (NumPy float64 arrays, input side
        first, norms computed in float64). A weight matrix the loss does not reach
        gets a gradient norm of 0.
    """
    fn = _loss_fn(loss)
    pairs = _weight_matrices(model)
    params = [p for _, p in pairs]
    xt, yt = batch_tensors(x, y, params[0])
    value = fn(model(xt), yt)
    if l1 or l2:
        value = value + weight_penalty(model, l1=l1, l2=l2)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    with torch.no_grad():  # norms in float64: no overflow or underflow for tiny or huge gradients
        g = [torch.zeros((), device=p.device, dtype=torch.float64) if gr is None
             else torch.linalg.vector_norm(gr.double()) for gr, p in zip(grads, params)]
        w = [torch.linalg.vector_norm(p.double()) for p in params]
        g_norms, w_norms = torch.stack(g).cpu().numpy(), torch.stack(w).cpu().numpy()
    return LayerGradients([n for n, _ in pairs], g_norms, w_norms, float(value.detach()))
