"""Gradient clipping for Keras 3, the twin of :mod:`gradtools.torch.clip`.

Keras gradients are values, not attributes of the variables, so where PyTorch
clips in place (``clip_grad_norm_``) these functions return the clipped list
(``clip_grad_norm``); the maths and the results are the same, checked against
PyTorch in the tests. Every function works eagerly and inside a ``tf.function``.

* :func:`clip_grad_norm` clips the global norm, as ``torch.nn.utils.clip_grad_norm_``
  and Keras' ``global_clipnorm`` do (not as Keras' per-variable ``clipnorm``);
* :func:`clip_grad_value` clamps every entry, as ``clipvalue``;
* :func:`adaptive_clip_grad` is unit-wise adaptive clipping (AGC, Brock et al. 2021);
* :class:`~gradtools.keras.clip.Clipper` applies any policy of :mod:`gradtools.policies`;
* :func:`unit_ratios` measures what AGC acts on, per unit; :func:`direction_change`
  the angle by which a clip turned the gradient (the twins of ``gradtools.torch``'s).
* :func:`compare_clipping` runs Keras' three options and PyTorch's on the same gradients.

Example:
    >>> import numpy as np, gradtools.keras as gk
    >>> grads = [np.full((2, 2), 3.0, np.float32), np.full(2, 4.0, np.float32)]
    >>> clipped, total = gk.clip_grad_norm(grads, max_norm=1.0)
    >>> round(float(total), 3), round(float(gk.get_total_norm(clipped)), 3)
    (8.246, 1.0)
"""

from __future__ import annotations

import math

import numpy as np

from gradtools import _checks
from gradtools.keras.norms import _check_grads, _map_values, _norms, _variables, variable_names
from gradtools.runtime import import_keras
from gradtools.stats import ClipperBase, ClipResult, GradStats

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["clip_grad_norm", "clip_grads_with_norm", "clip_grad_value", "adaptive_clip_grad", "Clipper",
           "ClipResult", "compare_clipping", "unit_ratios", "direction_change"]


def clip_grads_with_norm(grads, max_norm, total_norm) -> list:
    """Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)``; ``max_norm`` may be a tensor."""
    grads = _check_grads(grads)
    coef = tf.minimum(tf.cast(max_norm, tf.float32) / (tf.cast(total_norm, tf.float32) + 1e-6), 1.0)
    return [_map_values(lambda t: t * tf.cast(coef, t.dtype), g) for g in grads]


def clip_grad_norm(grads, max_norm: float, norm_type: float = 2.0):
    """Clip the global gradient norm; returns ``(clipped grads, total norm before)``.

    The twin of ``torch.nn.utils.clip_grad_norm_``:
    ``g <- g * min(1, max_norm / (||g|| + 1e-6))`` with ``||g||`` the norm of all
    gradients together (Pascanu et al., 2013).
    """
    max_norm = _checks.positive("max_norm", max_norm)
    norm_type = _checks.norm_type("norm_type", norm_type)
    grads = _check_grads(grads)
    total = _norms(grads, norm_type)[1]
    return clip_grads_with_norm(grads, max_norm, total), total


def clip_grad_value(grads, clip_value: float) -> list:
    """Clamp every entry to ``[-clip_value, clip_value]`` (this changes the direction)."""
    clip_value = _checks.positive("clip_value", clip_value)
    return [_map_values(lambda t: tf.clip_by_value(t, -tf.cast(clip_value, t.dtype), tf.cast(clip_value, t.dtype)), g)
            for g in _check_grads(grads)]


def _excluded(name: str, exclude) -> bool:
    wrapped = f"/{name}/"
    return any(name == e or name.startswith(e + "/") or f"/{e}/" in wrapped for e in exclude)


def _paired(grads, variables):
    """``(grads, variables, names)``: one gradient per variable, of the variable's shape."""
    grads = _check_grads(grads)
    try:
        names = variable_names(variables)
    except (AttributeError, TypeError):
        raise TypeError(f"variables must be a Model, a layer or a list of variables, got "
                        f"{type(variables).__name__}") from None
    variables = _variables(variables)
    if len(variables) != len(grads):
        raise ValueError(f"grads has {len(grads)} tensors but variables has {len(variables)}")
    for i, (g, v, name) in enumerate(zip(grads, variables, names)):
        if not tf.TensorShape(g.shape).is_compatible_with(v.shape):  # in a graph, a dimension may be unknown
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but its variable {name!r} has shape "
                             f"{tuple(v.shape)}")
    return grads, variables, names


def _unit_norm(t, keepdims: bool = False):
    """Per unit (an output column of a kernel; a vector is one unit), the 2-norm, as AGC takes it.

    ``keepdims`` keeps a kernel's reduced axes, so the norms broadcast against it.
    """
    if len(t.shape) <= 1:
        return tf.sqrt(tf.reduce_sum(tf.square(t)))
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=list(range(len(t.shape) - 1)), keepdims=keepdims))


def adaptive_clip_grad(grads, variables, clip_factor: float = 0.01, eps: float = 1e-3, exclude=()):
    """Unit-wise adaptive gradient clipping (AGC; Brock et al., 2021); returns ``(clipped, count)``.

    For every unit i, with the limit ``L_i = clip_factor * max(||W_i||, eps)``: ``G_i`` is left
    alone if ``||G_i|| < L_i``, else ``G_i <- G_i * L_i / max(||G_i||, 1e-6)`` (timm's rule). A Keras
    kernel is ``(..., fan_in, fan_out)``, so a unit is an output column (PyTorch's rows); biases
    and other vectors are one unit. ``count`` is the number of units scaled down (0-d tensor).

    Args:
        grads (list of tensors): the gradients.
        variables: the variables (a Model, a layer or a list) the gradients belong to.
        clip_factor (float): lambda, default 0.01.
        eps (float): floor on the weight norm, default 1e-3.
        exclude (iterable of str): variable paths, or layer names in them, to leave alone
            (the paper does not clip the final classifier), e.g. ``exclude=("dense_2",)``.
    """
    clip_factor = _checks.positive("clip_factor", clip_factor)
    eps = _checks.positive("eps", eps)
    exclude = _checks.names("exclude", exclude)
    grads, variables, names = _paired(grads, variables)
    out, count = [], tf.constant(0, tf.int64)
    for g, v, name in zip(grads, variables, names):
        if _excluded(name, exclude):
            out.append(g)
            continue
        dense = tf.convert_to_tensor(g)  # a unit spans every row of an Embedding's table
        w = tf.cast(v, dense.dtype)
        w_norm = tf.maximum(_unit_norm(w, keepdims=True), eps)
        g_norm = _unit_norm(dense, keepdims=True)
        limit = clip_factor * w_norm
        # timm's rule: a unit under its limit is left alone, also when the limit is below the 1e-6 floor
        scale = tf.where(g_norm < limit, tf.ones_like(g_norm), limit / tf.maximum(g_norm, 1e-6))
        count += tf.reduce_sum(tf.cast(scale < 1.0, tf.int64))
        out.append(_map_values(lambda t: t * scale, g))  # IndexedSlices stay sparse: a unit's scale is per column
    return out, count


def unit_ratios(grads, variables, eps: float = 1e-3) -> dict:
    """Per unit, the gradient-to-weight ratio AGC compares with its clip factor.

    ``||G_i|| / max(||W_i||, eps)`` for every unit i, as in :func:`adaptive_clip_grad`: at
    ``clip_factor=c`` AGC scales down exactly the units whose ratio is above ``c``. A
    Keras kernel's unit is an output column, so the values equal PyTorch's for the same
    Dense or recurrent layer (rows there). Every 2-D variable is read that way, so an
    Embedding table's units are its columns here and its rows in PyTorch.

    Args:
        grads (list of tensors): the gradients.
        variables: the variables (a Model, a layer or a list) they belong to.
        eps (float): floor on the weight norm, default 1e-3.

    Returns:
        dict: variable path -> float64 NumPy array, one ratio per unit.
    """
    eps = _checks.positive("eps", eps)
    grads, variables, names = _paired(grads, variables)
    out = {}
    for g, v, name in zip(grads, variables, names):
        g = tf.cast(tf.convert_to_tensor(g), tf.float64)
        w = tf.cast(tf.convert_to_tensor(v), tf.float64)
        out[name] = np.reshape((_unit_norm(g) / tf.maximum(_unit_norm(w), eps)).numpy(), -1)
    return out


def direction_change(before, after) -> float:
    """The angle in degrees between two gradients, each a list of tensors taken as one vector.

    Global-norm clipping leaves it at 0; ``clipnorm`` (per variable), value and
    unit-wise clipping turn the gradient. See :func:`gradtools.maths.angle_between`.
    """
    from gradtools.maths import angle_between

    def host(tensors, arg):
        if not isinstance(tensors, (list, tuple)):
            tensors = [tensors]
        out = []
        for i, t in enumerate(tensors):
            if t is None:
                raise TypeError(f"{arg}[{i}] is None (a variable without a gradient? leave it out)")
            try:
                out.append(np.asarray(tf.convert_to_tensor(t), dtype=np.float64))
            except (TypeError, ValueError):
                raise TypeError(f"{arg}[{i}] must be a tensor or an array, got {type(t).__name__}") from None
        return out

    return angle_between(host(before, "before"), host(after, "after"), names=("before", "after"))


class Clipper(ClipperBase):
    """Clip the global norm with any policy and report the norm before and after.

    The twin of ``gradtools.torch.Clipper``, for custom training loops (``GradOptimizer``
    uses one inside ``fit()``). Eager: the policy needs the norm as a Python number.

    Args:
        policy: a :class:`gradtools.policies.Policy`, a positive number (fixed
            threshold), or a registered name such as ``"autoclip"`` or ``"zclip"``.
        norm_type (float): p of the p-norm, default 2.

    Example:
        >>> import numpy as np, gradtools.keras as gk
        >>> clipper = gk.Clipper(2.0)
        >>> clipped, r = clipper([np.full(4, 2.0, np.float32)])  # (grads, ClipResult)
        >>> round(float(r.norm_before), 3), round(float(r.norm_after), 3), r.clipped
        (4.0, 2.0, True)
    """

    def _measure(self, grads, stats, norm):
        grads = _check_grads(grads)
        if stats is None or stats.norm_type != self.norm_type:
            norms, total = _norms(grads, self.norm_type)
            stats, norm = GradStats([str(i) for i in range(len(grads))], norms, total, None, self.norm_type), None
        return grads, stats, (float(stats.total) if norm is None else norm)

    def clip_to(self, grads, threshold: float, stats=None, norm: float | None = None):
        """Clip to a threshold decided elsewhere (a guard's decider), without consulting the policy."""
        grads, stats, norm = self._measure(grads, stats, norm)
        total = stats.total
        if not math.isfinite(threshold):
            return grads, ClipResult(total, total, threshold, False)
        # the rule of torch.nn.utils and of the in-graph guard, whatever the norm: min(1, threshold / (norm + 1e-6))
        coef = tf.minimum(threshold / (total + 1e-6), 1.0)
        # whether that factor is below 1, by the same float32 arithmetic on the norm already read
        clipped = bool(np.float32(threshold) / (np.float32(norm) + np.float32(1e-6)) < 1)
        return clip_grads_with_norm(grads, threshold, total), ClipResult(total, total * coef, threshold, clipped)


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
