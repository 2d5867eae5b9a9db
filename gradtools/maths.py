"""NumPy toys and small formulas shared by chapters and tests.

* :func:`divergence_step`: the first step at which a loss curve blew up.
* :func:`gd_quadratic`: gradient descent on ``f(x) = x^T A x / 2``.
* :func:`stability_threshold`: the largest stable learning rate, ``2 / lambda_max``
  (and ``2 (1 + beta) / lambda_max`` with heavy-ball momentum).
"""

from __future__ import annotations

import math

import numpy as np

from gradtools import _checks

__all__ = ["divergence_step", "gd_quadratic", "stability_threshold", "power_iteration"]


def divergence_step(losses, blowup: float = 1e6) -> int | None:
    """Index of the first loss that is non-finite or above ``blowup``; None if none.

    Example:
        >>> divergence_step([1.0, 3.0, float("inf"), float("nan")])
        2
    """
    blowup = _checks.positive("blowup", blowup, allow_inf=True)
    for i, value in enumerate(losses):
        v = float(value)
        if not math.isfinite(v) or v > blowup:
            return i
    return None


def stability_threshold(lambda_max: float, momentum: float = 0.0) -> float:
    """Largest stable learning rate on a quadratic with top curvature ``lambda_max``.

    Plain GD: ``x <- (I - lr A) x`` contracts iff ``|1 - lr * lambda| < 1`` for every
    eigenvalue, i.e. ``lr < 2 / lambda_max``. Heavy-ball momentum ``beta`` moves the
    bound to ``2 (1 + beta) / lambda_max``.
    """
    lambda_max = _checks.positive("lambda_max", lambda_max)
    momentum = _checks.in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    return 2.0 * (1.0 + momentum) / lambda_max


def gd_quadratic(A, x0, lr: float, steps: int = 100, momentum: float = 0.0, nesterov: bool = False):
    """Iterates of (heavy-ball or Nesterov) gradient descent on ``f(x) = x^T A x / 2``.

    Returns an array of shape (steps + 1, dim): the trajectory, starting at ``x0``.
    """
    A = np.asarray(A, dtype=np.float64)
    x = np.asarray(x0, dtype=np.float64).copy()
    lr = _checks.positive("lr", lr)
    steps = _checks.integer("steps", steps, minimum=0)
    momentum = _checks.in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    v = np.zeros_like(x)
    out = [x.copy()]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            if nesterov:
                g = A @ (x + momentum * v)
            else:
                g = A @ x
            v = momentum * v - lr * g
            x = x + v
            out.append(x.copy())
    return np.array(out)


def power_iteration(matvec, shapes, iters: int = 20, tol: float = 1e-4, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of a symmetric operator given only ``matvec``.

    ``matvec`` maps a list of float64 arrays (one per parameter, with ``shapes``)
    to a list of arrays of the same shapes: a Hessian-vector product in
    ``gradtools.torch`` and ``gradtools.keras``. Stops when the Rayleigh quotient
    changes by less than ``tol`` (relative).
    """
    iters = _checks.integer("iters", iters, minimum=1)
    tol = _checks.positive("tol", tol)
    rng = np.random.default_rng(seed)
    v = [rng.standard_normal(s) for s in shapes]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v))
    v = [x / norm for x in v]
    estimate = 0.0
    for _ in range(iters):
        hv = [np.asarray(h, dtype=np.float64) for h in matvec(v)]
        new = sum(float((h * x).sum()) for h, x in zip(hv, v))
        norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
        if norm == 0.0:
            return 0.0
        v = [h / norm for h in hv]
        converged = abs(new - estimate) <= tol * max(abs(new), 1e-12)
        estimate = new
        if converged:
            break
    return estimate
