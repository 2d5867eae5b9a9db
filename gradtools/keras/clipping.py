"""What each clipping option does to the same gradients: Keras and PyTorch side by side."""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.runtime import import_keras

keras = import_keras()

__all__ = ["compare_clipping"]


def compare_clipping(grads, threshold: float) -> dict:
    """Apply Keras' ``clipnorm``, ``global_clipnorm``, ``clipvalue`` and PyTorch's
    ``clip_grad_norm_`` to copies of the same gradients.

    Keras' clipping is run through a real optimizer's clipping code, and PyTorch's
    through ``torch.nn.utils.clip_grad_norm_`` (skipped if PyTorch is missing).

    Args:
        grads (list of arrays): the gradients, one per variable.
        threshold (float): the same number given to every option.

    Returns:
        dict: option name -> {"grads": list of arrays, "global_norm": float,
        "cosine": cosine similarity of the clipped and original gradient}.
        ``clipnorm`` bounds every variable separately, so its global norm can reach
        ``threshold * sqrt(number of variables)``; ``clipvalue`` changes the direction.
    """
    threshold = _checks.positive("threshold", threshold)
    grads = [np.asarray(g, dtype=np.float32) for g in grads]
    if not grads:
        raise ValueError("grads is empty")
    flat = np.concatenate([g.ravel() for g in grads]).astype(np.float64)

    def summary(clipped):
        c = np.concatenate([np.asarray(g).ravel() for g in clipped]).astype(np.float64)
        cos = float(c @ flat / (np.linalg.norm(c) * np.linalg.norm(flat))) if np.linalg.norm(c) > 0 else 0.0
        return {"grads": [np.asarray(g) for g in clipped], "global_norm": float(np.linalg.norm(c)), "cosine": cos}

    out = {"none": summary(grads)}
    for option in ("clipnorm", "global_clipnorm", "clipvalue"):
        opt = keras.optimizers.SGD(learning_rate=1.0, **{option: threshold})
        clipped = opt._clip_gradients([keras.ops.convert_to_tensor(g) for g in grads])
        out[f"keras {option}"] = summary([keras.ops.convert_to_numpy(g) for g in clipped])
    try:
        import torch
    except ImportError:  # pragma: no cover
        return out
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape))
        p.grad = torch.from_numpy(g.copy())
        params.append(p)
    torch.nn.utils.clip_grad_norm_(params, threshold)
    out["torch clip_grad_norm_"] = summary([p.grad.numpy() for p in params])
    return out
