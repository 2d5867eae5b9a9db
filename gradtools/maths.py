"""NumPy toys and small formulas shared by chapters and tests.

* :func:`divergence_step`: the first step at which a loss curve blew up.
* :func:`gd_quadratic`: gradient descent on ``f(x) = x^T A x / 2``.
* :func:`stability_threshold`: the largest stable learning rate, ``2 / lambda_max``
  (and ``2 (1 + beta) / lambda_max`` with heavy-ball momentum).
* :func:`angle_between`: the angle between two gradients (how much clipping turned one).
* :func:`max_abs_diff`: the largest difference between two sets of weights (two runs, two frameworks).
"""

from __future__ import annotations

import math

import numpy as np

from gradtools import _checks

__all__ = ["divergence_step", "gd_quadratic", "stability_threshold", "nesterov_threshold", "quadratic_diverges",
           "bisect_threshold", "power_iteration", "rnn_cliff", "angle_between", "max_abs_diff"]


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


def nesterov_threshold(lambda_max: float, momentum: float) -> float:
    """Largest stable learning rate of Nesterov momentum on a quadratic: ``2 (1 + b) / ((1 + 2 b) lambda_max)``.

    Nesterov evaluates the gradient at the look-ahead point, which makes its bound
    *lower* than plain gradient descent's ``2 / lambda_max`` for every ``b > 0``.
    """
    lambda_max = _checks.positive("lambda_max", lambda_max)
    momentum = _checks.in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    return 2.0 * (1.0 + momentum) / ((1.0 + 2.0 * momentum) * lambda_max)


def quadratic_diverges(A, lr: float, momentum: float = 0.0, nesterov: bool = False, steps: int = 2000,
                       seed: int = 0) -> bool:
    """True if (momentum) GD on ``x^T A x / 2`` ends farther from the minimum than it started.

    The iteration of :func:`gd_quadratic` is linear in the state ``(x, v)``, so the
    last iterate is ``M**steps`` applied to ``(x0, 0)``; ``M**steps`` comes from
    repeated squaring (about ``2 log2(steps)`` matrix products instead of ``steps``
    matrix-vector products). ``x0`` is standard normal, drawn from ``seed``.
    """
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix, got shape {A.shape}")
    lr = _checks.positive("lr", lr)
    steps = _checks.integer("steps", steps, minimum=0)
    momentum = _checks.in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    n = A.shape[0]
    eye = np.eye(n)
    # v' = b v - lr A x;  x' = x + v' (heavy ball) or x + b v' - lr A x (Nesterov)
    step = np.block([
        [eye - lr * (1 + momentum) * A if nesterov else eye - lr * A,
         (momentum ** 2 if nesterov else momentum) * eye],
        [-lr * A, momentum * eye]])
    x0 = np.random.default_rng(seed).standard_normal(n)
    with np.errstate(over="ignore", invalid="ignore"):  # a divergent run overflows, by design
        end = np.linalg.norm((np.linalg.matrix_power(step, steps) @ np.concatenate([x0, np.zeros(n)]))[:n])
    return bool(not np.isfinite(end) or end > np.linalg.norm(x0))


def bisect_threshold(diverges, low: float, high: float, rtol: float = 1e-4, max_iter: int = 100) -> float:
    """The boundary between ``diverges(lr) == False`` (at ``low``) and ``True`` (at ``high``).

    Args:
        diverges (callable): ``diverges(lr) -> bool``, assumed monotone in ``lr``.
        low, high (float): a stable and a divergent learning rate.
        rtol (float): stop when ``high / low - 1 < rtol``.
    """
    low = _checks.positive("low", low)
    high = _checks.positive("high", high)
    if diverges(low) or not diverges(high):
        raise ValueError(f"low={low} must converge and high={high} must diverge")
    for _ in range(max_iter):
        if high / low - 1 < rtol:
            break
        mid = math.sqrt(low * high)
        if diverges(mid):
            high = mid
        else:
            low = mid
    return math.sqrt(low * high)


def rnn_cliff(w, b, steps: int = 30, x0: float = 0.5, target: float = 0.5):
    """Pascanu et al. (2013)'s single-unit RNN ``x_t = w * sigmoid(x_{t-1}) + b``.

    Evaluates the loss ``(x_T - target)^2`` and its exact gradient with respect to
    ``(w, b)`` (back-propagation through time, vectorised) on arrays ``w``, ``b`` of
    any common shape. Near the bifurcation of the map the loss changes abruptly: the
    "cliff" whose wall has enormous gradients.

    Returns:
        (loss, dloss_dw, dloss_db), arrays of the broadcast shape.
    """
    steps = _checks.integer("steps", steps, minimum=1)
    w, b = np.broadcast_arrays(np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64))
    x = np.full(w.shape, float(x0))
    dx_dw = np.zeros(w.shape)
    dx_db = np.zeros(w.shape)
    for _ in range(steps):
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + np.exp(-x))
        ds = s * (1.0 - s)
        dx_dw, dx_db = s + w * ds * dx_dw, 1.0 + w * ds * dx_db
        x = w * s + b
    loss = (x - target) ** 2
    return loss, 2 * (x - target) * dx_dw, 2 * (x - target) * dx_db


def gd_quadratic(A, x0, lr: float, steps: int = 100, momentum: float = 0.0, nesterov: bool = False):
    """Iterates of (heavy-ball or Nesterov) gradient descent on ``f(x) = x^T A x / 2``.

    Heavy ball: ``v <- b v - lr g(x)``, ``x <- x + v``. Nesterov, in the form that
    ``torch.optim.SGD(nesterov=True)`` and ``keras.optimizers.SGD(nesterov=True)``
    both implement: ``v <- b v - lr g(x)``, ``x <- x + b v - lr g(x)`` (Sutskever's
    look-ahead form tracks the shifted point ``x + b v`` of the same dynamics).

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
            g = A @ x
            v = momentum * v - lr * g
            x = x + (momentum * v - lr * g if nesterov else v)
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
    rng = np.random.default_rng(_checks.integer("seed", seed, minimum=0))
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


def _flat64(arrays, arg: str) -> np.ndarray:
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    try:
        parts = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be an array or a list of arrays, got {type(arrays).__name__}") from None
    if not parts:
        raise ValueError(f"{arg} is empty")
    return np.concatenate(parts)


def angle_between(a, b, names: tuple = ("a", "b")) -> float:
    """The angle in degrees between two gradients, each an array or a list of arrays taken as one vector.

    Computed in float64 with Kahan's formula ``2 atan2(||a/|a| - b/|b|||, ||a/|a| + b/|b|||)``,
    which stays accurate near 0 and 180 degrees where ``arccos`` of the cosine does not: a
    rescaled gradient (global-norm clipping) gives 0 to about 1e-6 degrees.

    Args:
        a, b: the gradients, with the same number of entries.
        names: what errors call ``a`` and ``b`` (the backends pass ``("before", "after")``).

    Raises:
        ValueError: if the sizes differ, or either is zero or not finite (no direction).

    Example:
        >>> round(angle_between([[1.0, 0.0]], [[3.0, 3.0]]), 6)
        45.0
    """
    na, nb = names
    fa, fb = _flat64(a, na), _flat64(b, nb)
    if fa.size != fb.size:
        raise ValueError(f"{na} has {fa.size} entries but {nb} has {fb.size}")
    for arg, f in ((na, fa), (nb, fb)):
        if not np.all(np.isfinite(f)):
            raise ValueError(f"{arg} has non-finite entries: it has no direction")
    units = []
    for arg, f in ((na, fa), (nb, fb)):
        peak = np.max(np.abs(f))
        if peak == 0:
            raise ValueError(f"{arg} is zero: it has no direction")
        f = f / peak  # the norm of tiny (or huge) values neither underflows nor overflows
        units.append(f / np.linalg.norm(f))
    ua, ub = units
    return math.degrees(2.0 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def max_abs_diff(a, b, names: tuple = ("a", "b")) -> float:
    """The largest absolute difference between two lists of arrays of matching shapes, in float64.

    How far apart two runs' weights ended (accumulated vs large batch, PyTorch vs
    Keras in the same layout): 0.0 for equal weights, ``nan`` if either holds a NaN.

    Raises:
        ValueError: if the lists differ in length or two arrays in shape.

    Example:
        >>> max_abs_diff([[1.0, 2.0], [3.0]], [[1.0, 2.5], [3.0]])
        0.5
    """
    na, nb = names
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"{na} has {len(a)} arrays but {nb} has {len(b)}")
    if not a:
        raise ValueError(f"{na} is empty")
    out = 0.0
    for i, (u, v) in enumerate(zip(a, b)):
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
        if u.shape != v.shape:
            raise ValueError(f"{na}[{i}] has shape {u.shape} but {nb}[{i}] has shape {v.shape}")
        if u.size:
            d = float(np.max(np.abs(u - v)))
            if math.isnan(d):  # max() below would drop it
                return math.nan
            out = max(out, d)
    return out
