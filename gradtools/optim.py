"""Optimisers side by side, framework-free: shared settings, spikes, traces.

PyTorch and Keras ship the same optimisers with different defaults, and some
of them compute the update in a different order:

* Adam: ``eps=1e-8`` in PyTorch, ``epsilon=1e-7`` in Keras. PyTorch adds it to
  ``sqrt(v_hat)``, Keras to ``sqrt(v)`` before the bias correction, so in the
  first ~``1 / (1 - beta_2)`` steps Keras' acts up to ``1 / sqrt(1 - beta_2 ** t)``
  times larger (it matters only for gradients below about 1e-6).
* AdamW: the same, and ``weight_decay=0.01`` against ``0.004``.
* RMSprop: ``alpha=0.99`` against ``rho=0.9``; PyTorch divides by
  ``sqrt(v) + eps``, Keras by ``sqrt(v + epsilon)``.
* Adagrad: ``initial_accumulator_value`` 0 against 0.1; ``eps=1e-10`` outside
  the root against ``epsilon=1e-7`` inside it.
* Nadam: PyTorch ramps the momentum as ``0.96 ** (0.004 t)`` (Dozat, 2016),
  Keras as ``0.96 ** t``, with no setting to change it.
* SGD with momentum: PyTorch keeps the rate outside the velocity
  (``b = beta b + g``, ``w -= lr b``), Keras inside it (``v = beta v - lr g``,
  ``w += v``). At a constant rate the two are the same; after the rate changes,
  Keras' velocity still carries the old rate for about ``1 / (1 - beta)`` steps.

:data:`SETTINGS` fixes one value for each, and ``make_optimizer`` in both
backends passes it explicitly, so the same name means the same update rule:
where Keras puts epsilon inside the square root it receives ``eps ** 2``, so
both divide by about ``max(sqrt(v), eps)``; PyTorch's NAdam gets
``momentum_decay=1.0``, Keras' fixed ramp. Two differences remain, because
neither framework has a setting for them: momentum under a *changing* rate, and
Adam's epsilon in its first ~1000 steps for gradients below about 1e-6. At a
constant rate and ordinary gradient sizes the two frameworks' updates agree to
float32 precision.

:func:`spike_gradients` draws a gradient sequence with one spike;
:class:`TrainTrace` is what the backends' ``train`` returns.

Example:
    >>> from gradtools.optim import adam_step_bound, spike_gradients
    >>> g = spike_gradients(steps=5, dim=3, spike_at=2, factor=1000.0)
    >>> [round(float((row ** 2).sum() ** 0.5)) for row in g]
    [1, 1, 1000, 1, 1]
    >>> round(adam_step_bound(0.9, 0.999), 3)
    3.162
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gradtools import _checks

__all__ = ["SETTINGS", "OPTIMIZER_NAMES", "check_name", "settings", "spike_gradients", "adam_step_bound",
           "check_run", "TrainTrace"]

#: The hyperparameters both backends pass explicitly, per optimiser name.
SETTINGS = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9},
    "adagrad": {"initial_accumulator_value": 0.0, "eps": 1e-10},
    "rmsprop": {"rho": 0.99, "eps": 1e-8},
    "adam": {"beta_1": 0.9, "beta_2": 0.999, "eps": 1e-8},
    "adamw": {"beta_1": 0.9, "beta_2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
    # Keras' Nadam ramps its momentum as 0.96**t; Dozat (2016) and PyTorch's default,
    # 0.96**(0.004 t), are 250 times slower. Keras has no knob, so PyTorch follows it.
    "nadam": {"beta_1": 0.9, "beta_2": 0.999, "eps": 1e-8, "momentum_decay": 1.0},
}
OPTIMIZER_NAMES = tuple(SETTINGS)


def check_name(name) -> str:
    """An optimiser name from :data:`SETTINGS`, or a ValueError naming ``name``."""
    return _checks.choice("name", name, set(SETTINGS))


_CHECKS = {
    "momentum": lambda k, v: _checks.in_range(k, v, 0.0, 1.0, high_open=True),
    "beta_1": lambda k, v: _checks.in_range(k, v, 0.0, 1.0, high_open=True),
    "beta_2": lambda k, v: _checks.in_range(k, v, 0.0, 1.0, high_open=True),
    "rho": lambda k, v: _checks.in_range(k, v, 0.0, 1.0, high_open=True),
    "eps": _checks.positive,
    "weight_decay": _checks.non_negative,
    "initial_accumulator_value": _checks.non_negative,
    "momentum_decay": _checks.positive,
}


def settings(name: str, overrides: dict) -> dict:
    """:data:`SETTINGS` for ``name`` with ``overrides`` applied and checked; unknown keys are refused."""
    base = dict(SETTINGS[check_name(name)])
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"{name} takes {sorted(base) or 'no settings'} besides lr, got {sorted(unknown)}")
    base.update({key: _CHECKS[key](key, value) for key, value in overrides.items()})
    return base


def spike_gradients(steps: int = 100, dim: int = 10, spike_at: int = 50, factor: float = 1000.0,
                    seed: int = 0) -> np.ndarray:
    """A sequence of gradients of norm 1 in random directions, one of them ``factor`` times longer.

    Returns a float32 array of shape (steps, dim); row ``spike_at`` has norm ``factor``.
    """
    steps = _checks.integer("steps", steps, minimum=1)
    dim = _checks.integer("dim", dim, minimum=1)
    spike_at = _checks.integer("spike_at", spike_at, minimum=0)
    if spike_at >= steps:
        raise ValueError(f"spike_at must be below steps={steps}, got {spike_at}")
    factor = _checks.positive("factor", factor)
    g = np.random.default_rng(seed).standard_normal((steps, dim))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g[spike_at] *= factor
    return g.astype(np.float32)


def adam_step_bound(beta_1: float = 0.9, beta_2: float = 0.999) -> float:
    """``(1 - beta_1) / sqrt(1 - beta_2)``: the largest step per coordinate, in units of lr,
    that one huge gradient can cause in Adam once the bias corrections are near 1
    (Kingma and Ba, 2015, section 2.1). 3.16 at the defaults."""
    beta_1 = _checks.in_range("beta_1", beta_1, 0.0, 1.0, high_open=True)
    beta_2 = _checks.in_range("beta_2", beta_2, 0.0, 1.0, low_open=True, high_open=True)
    return (1 - beta_1) / math.sqrt(1 - beta_2)


def check_run(steps, spike_at, spike_factor):
    """The run arguments of the backends' ``train``, validated: ``(steps, spike_at, spike_factor)``."""
    steps = _checks.integer("steps", steps, minimum=1)
    if spike_at is not None:
        spike_at = _checks.integer("spike_at", spike_at, minimum=0)
    return steps, spike_at, _checks.positive("spike_factor", spike_factor)


def check_clipping(clip, agc, normalize):
    """The clipping arguments of the backends' ``train``: ``(policy or None, agc or None)``."""
    from gradtools.policies import get_policy

    policy = None if clip is None else get_policy(clip, "clip")
    agc = None if agc is None else _checks.positive("agc", agc)
    if normalize and (policy is not None or agc is not None):
        raise ValueError("normalize=True divides the gradient by its norm, so there is nothing left to clip: "
                         f"pass clip={clip!r}, agc={agc!r} or normalize=True, not both")
    return policy, agc


@dataclass
class TrainTrace:
    """One training run, step by step (lists of floats, index = step).

    ``losses``: the loss before each step; ``grad_norms``: the global gradient
    norm the optimiser received (after any injected spike, before normalising);
    ``update_norms``: ``||w_after - w_before||`` over all weights; ``lrs``: the
    learning rate each step used; ``weight_norms``: the global norm of the
    weights before each step; ``thresholds``: the global-norm threshold each
    step used (``inf``: none, as without ``clip=``); ``clipped``: whether the
    step's norm was above its threshold or, with ``agc=``, any unit was scaled
    down. A norm equal to its threshold (AutoClip's first) is not clipped,
    whatever the last bit of the factor in either framework. The factor is
    ``torch.nn.utils``' ``min(1, c / (norm + 1e-6))`` in both frameworks, which
    also shortens a gradient at its threshold by about ``1e-6 / norm`` (more, for
    norms near 1e-6 and below); Keras' own ``global_clipnorm`` uses
    ``min(1, c / norm)``, the same step at any larger norm.
    """

    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    update_norms: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    weight_norms: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)
    clipped: list = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows) -> "TrainTrace":
        """A trace from per-step ``(loss, grad_norm, update_norm, lr[, weight_norm])`` rows of device scalars."""
        trace = cls()
        for loss, norm, update, lr, *weight in rows:
            trace.losses.append(float(loss))
            trace.grad_norms.append(float(norm))
            trace.update_norms.append(float(update))
            trace.lrs.append(float(lr))
            if weight:
                trace.weight_norms.append(float(weight[0]))
        return trace

    @property
    def diverged_at(self) -> int | None:
        """The first step whose loss is non-finite or above 1e6, or None."""
        from gradtools.maths import divergence_step

        return divergence_step(self.losses)

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1]) if self.losses else math.nan
