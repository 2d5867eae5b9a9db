"""Clipping and spike policies, free of any deep-learning framework.

A policy sees one number per optimiser step, the global gradient norm, and
answers with a clip threshold (``step``) or a verdict (``SpikeDetector.step``).
The maths lives here once; :mod:`gradtools.torch` and :mod:`gradtools.keras`
only measure norms and rescale gradients.

Every policy has ``state_dict()`` / ``load_state_dict()`` (plain Python values,
so ``json`` and ``torch.save`` both work) and ``get_config()`` /
``from_config()``. A run resumed from a state dict takes exactly the decisions
the uninterrupted run takes.

Non-finite norms are never recorded: one NaN would otherwise poison every
later threshold. Nor are norms of exactly 0 (a loss weight warmed up from 0, a
fully masked batch): they carry no scale, and a history of zeros would clip
every later gradient to 0. A zero gradient needs no clipping anyway. Deciding what to do with a non-finite gradient is the job of a
guard (``gradtools.torch.GradGuard``), not of a clipping policy.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from gradtools import _checks

__all__ = ["Policy", "FixedThreshold", "AutoClip", "ZClip", "SpikeDetector", "get_policy", "register_policy",
           "registered_policies", "policy_config", "policy_from_config"]

INF = math.inf


def _norm_value(value, name: str = "norm") -> float:
    """A float from a Python number, NumPy scalar or 0-d tensor (may be nan/inf)."""
    if isinstance(value, (bool, str)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})") from None


def _informative(value: float) -> bool:
    """A norm worth remembering: finite and not exactly 0 (see the module docstring)."""
    return math.isfinite(value) and value != 0.0


class Policy:
    """Base class: ``step(norm) -> threshold`` plus state and config handling."""

    #: Names of the attributes that make up the state (beyond ``steps``).
    _state_keys: tuple[str, ...] = ()

    def __init__(self):
        self.steps = 0

    # --- to be provided by subclasses -------------------------------------------------
    def step(self, norm) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- shared machinery ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict):
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        return cls(**config)

    def state_dict(self) -> dict:
        state = {"type": type(self).__name__, "config": self.get_config(), "steps": self.steps}
        for key in self._state_keys:
            value = getattr(self, key)
            state[key] = list(value) if isinstance(value, deque) else value
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        kind = state_dict.get("type")
        if kind != type(self).__name__:
            raise ValueError(f"state_dict is for {kind!r}, not {type(self).__name__!r}")
        missing = [k for k in ("config", "steps", *self._state_keys) if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing keys {missing} for {type(self).__name__}")
        if state_dict["config"] != self.get_config():
            raise ValueError(
                f"state_dict config {state_dict['config']!r} does not match this "
                f"{type(self).__name__}'s config {self.get_config()!r}"
            )
        self.steps = _checks.integer("state_dict['steps']", state_dict["steps"], minimum=0)
        self._load_state(state_dict)

    def _load_state(self, state: dict) -> None:
        for key in self._state_keys:
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class FixedThreshold(Policy):
    """Clip the global norm to a constant ``max_norm`` (Pascanu et al., 2013).

    Args:
        max_norm (float): the threshold, > 0.

    Example:
        >>> FixedThreshold(1.0).step(5.0)
        1.0
    """

    def __init__(self, max_norm: float):
        super().__init__()
        self.max_norm = _checks.positive("max_norm", max_norm)

    def get_config(self) -> dict:
        return {"max_norm": self.max_norm}

    def step(self, norm) -> float:
        _norm_value(norm)
        self.steps += 1
        return self.max_norm


class AutoClip(Policy):
    """AutoClip (Seetharaman et al., 2020): clip to a percentile of past norms.

    At every step the observed global norm is appended to a history (bounded
    to the last ``history_size`` values), and the threshold is the
    ``percentile``-th percentile of that history, current norm included, with
    linear interpolation (``numpy.percentile``'s default). The paper keeps the
    whole history; a bound keeps memory constant on long runs.

    Args:
        percentile (float): in (0, 100], default 10 (the paper's choice).
        history_size (int): how many norms to remember, default 10000.

    Example:
        >>> p = AutoClip(percentile=50)
        >>> [p.step(n) for n in (1.0, 3.0, 2.0)]
        [1.0, 2.0, 2.0]
    """

    _state_keys = ("history",)

    def __init__(self, percentile: float = 10.0, history_size: int = 10000):
        super().__init__()
        self.percentile = _checks.in_range("percentile", percentile, 0.0, 100.0, low_open=True)
        self.history_size = _checks.integer("history_size", history_size, minimum=1)
        self.history: deque = deque(maxlen=self.history_size)

    def get_config(self) -> dict:
        return {"percentile": self.percentile, "history_size": self.history_size}

    def _load_state(self, state):
        history = [float(x) for x in state["history"]]
        if len(history) > self.history_size:
            raise ValueError(
                f"state_dict['history'] holds {len(history)} norms, more than history_size={self.history_size}"
            )
        self.history = deque(history, maxlen=self.history_size)

    def threshold(self) -> float:
        """The current threshold without recording anything (inf if no history)."""
        if not self.history:
            return INF
        return float(np.percentile(np.fromiter(self.history, dtype=np.float64), self.percentile))

    def step(self, norm) -> float:
        value = _norm_value(norm)
        self.steps += 1
        if _informative(value):
            self.history.append(value)
        return self.threshold()


class ZClip(Policy):
    """ZClip (Kumar et al., 2025): z-score clipping against EMA statistics.

    During the first ``warmup_steps`` steps the norms are collected (and only
    ``max_norm`` applies, if given). Then mean ``mu`` and variance ``var`` are
    initialised from them and, each step, with ``std = sqrt(var)`` and
    ``z = (g - mu) / (std + eps)``:

    * if ``z <= z_thresh`` nothing is clipped;
    * otherwise the threshold is ``mu + z_thresh * std / (z / z_thresh)``
      (``clip_option="adaptive_scaling"``, the paper's default: the larger the
      outlier the harder it is pulled back) or ``mu`` (``clip_option="mean"``).

    The EMA is then updated with the norm after clipping ``g'``:
    ``mu <- alpha*mu + (1-alpha)*g'`` and ``var <- alpha*var + (1-alpha)*(g'-mu)^2``
    (with the new ``mu``), as in the authors' reference code.

    Args:
        alpha (float): EMA factor in (0, 1), default 0.97.
        z_thresh (float): z-score threshold > 0, default 2.5.
        warmup_steps (int): steps before clipping starts, >= 1, default 25.
        clip_option (str): ``"adaptive_scaling"`` (default) or ``"mean"``.
        max_norm (float or None): an absolute ceiling applied at every step, warm-up
            included; default None, no ceiling. The authors' reference code defaults to
            ``max_grad_norm=1.0``, a threshold in the units of the loss (with the loss
            multiplied by 10 it clips every step); pass ``max_norm=1.0`` to get it.
        eps (float): added to the standard deviation, default 1e-6.

    Example:
        >>> z = ZClip(warmup_steps=3)
        >>> [z.step(n) for n in (1.0, 1.1, 0.9)]
        [inf, inf, inf]
        >>> round(z.step(10.0), 4)
        1.0046
    """

    _state_keys = ("buffer", "mean", "var")

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_option: str = "adaptive_scaling",
        max_norm: float | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.alpha = _checks.in_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.z_thresh = _checks.positive("z_thresh", z_thresh)
        self.warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1)
        self.clip_option = _checks.choice("clip_option", clip_option, {"adaptive_scaling", "mean"})
        self.max_norm = None if max_norm is None else _checks.positive("max_norm", max_norm)
        self.eps = _checks.positive("eps", eps)
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def get_config(self) -> dict:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "clip_option": self.clip_option,
            "max_norm": self.max_norm,
            "eps": self.eps,
        }

    def _load_state(self, state):
        self.buffer = [float(x) for x in state["buffer"]]
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = None if state["var"] is None else float(state["var"])

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    def _ceiling(self, threshold: float) -> float:
        return threshold if self.max_norm is None else min(threshold, self.max_norm)

    def step(self, norm) -> float:
        g = _norm_value(norm)
        self.steps += 1
        if not _informative(g):
            return self._ceiling(INF)
        if not self.initialized:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.buffer = []
            return self._ceiling(INF)
        std = math.sqrt(self.var)
        z = (g - self.mean) / (std + self.eps)
        threshold = INF
        if z > self.z_thresh:
            if self.clip_option == "adaptive_scaling":
                threshold = self.mean + self.z_thresh * std / (z / self.z_thresh)
            else:
                threshold = self.mean
        effective = min(g, threshold)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        return self._ceiling(threshold)


class SpikeDetector(Policy):
    """Flag a step whose gradient norm (and optionally loss) is an outlier.

    Keeps the last ``window`` accepted values. Once ``min_history`` values are
    there, a value is a spike when ``(x - mean) / (std + eps) > z_thresh`` and
    ``x > min_ratio * mean``: the second condition keeps a flat history, whose
    standard deviation is tiny, from flagging ordinary noise (for a negative
    mean, a loss such as a negative log-likelihood: ``x - mean > (min_ratio - 1) |mean|``).
    Non-finite values are always spikes. Spikes are not added to the window, so
    one bad step does not raise the bar for the next. A value of exactly 0 (a
    loss weight warmed up from 0, a fully masked batch) carries no scale: it is
    neither a spike nor remembered, so a history of zeros cannot make every
    later value a spike. This is the test behind
    "skip the step" in large-scale training (OLMo-core skips on a z-score of
    the loss or gradient norm).

    Args:
        window (int): values remembered, default 100.
        z_thresh (float): z-score above which a value is a spike, default 6.0.
        min_history (int): values needed before anything but non-finite is flagged, default 10.
        min_ratio (float): a spike is also at least this multiple of the window mean, default 1.5.
        eps (float): added to the standard deviation, default 1e-12.

    Example:
        >>> d = SpikeDetector(window=5, z_thresh=3, min_history=3)
        >>> [d.step(x) for x in (1.0, 1.1, 0.9, 50.0, 1.0)]
        [False, False, False, True, False]
    """

    _state_keys = ("norms", "losses", "spikes")

    def __init__(self, window: int = 100, z_thresh: float = 6.0, min_history: int = 10, min_ratio: float = 1.5,
                 eps: float = 1e-12):
        super().__init__()
        self.window = _checks.integer("window", window, minimum=2)
        self.z_thresh = _checks.positive("z_thresh", z_thresh)
        self.min_history = _checks.integer("min_history", min_history, minimum=2)
        if self.min_history > self.window:
            raise ValueError(f"min_history must be <= window ({self.window}), got {min_history!r}")
        self.min_ratio = _checks.non_negative("min_ratio", min_ratio)
        self.eps = _checks.positive("eps", eps)
        self.norms: deque = deque(maxlen=self.window)
        self.losses: deque = deque(maxlen=self.window)
        self.spikes = 0

    def get_config(self) -> dict:
        return {"window": self.window, "z_thresh": self.z_thresh, "min_history": self.min_history,
                "min_ratio": self.min_ratio, "eps": self.eps}

    def _load_state(self, state):
        self.norms = deque((float(x) for x in state["norms"]), maxlen=self.window)
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.window)
        self.spikes = _checks.integer("state_dict['spikes']", state["spikes"], minimum=0)

    def zscore(self, value: float, history) -> float:
        """z-score of ``value`` against ``history`` (nan while history is too short)."""
        if len(history) < self.min_history:
            return math.nan
        arr = np.fromiter(history, dtype=np.float64)
        return float((value - arr.mean()) / (arr.std() + self.eps))

    def _is_outlier(self, value: float, history) -> bool:
        if not math.isfinite(value):
            return True
        if value == 0.0:
            return False
        z = self.zscore(value, history)
        if not (math.isfinite(z) and z > self.z_thresh):
            return False
        mean = float(np.mean(np.fromiter(history, dtype=np.float64)))
        if mean > 0:
            return value > self.min_ratio * mean
        # a negative mean (a log-likelihood loss): the same margin, (min_ratio - 1) |mean| above it
        return value - mean > (self.min_ratio - 1.0) * abs(mean)

    def step(self, norm, loss=None) -> bool:
        """Record ``norm`` (and ``loss``) and return True if this step is a spike."""
        g = _norm_value(norm)
        l_val = None if loss is None else _norm_value(loss, "loss")
        self.steps += 1
        spike = self._is_outlier(g, self.norms)
        if l_val is not None:
            spike = spike or self._is_outlier(l_val, self.losses)
        if spike:
            self.spikes += 1
            return True
        if g != 0.0:  # finite here: a non-finite value is a spike
            self.norms.append(g)
        if l_val is not None and l_val != 0.0:
            self.losses.append(l_val)
        return False


_REGISTRY: dict[str, type] = {}


def register_policy(cls=None, *, name: str | None = None):
    """Register a clipping policy class so that it can be found by name.

    Registered policies are what :func:`get_policy` accepts as strings and what
    :func:`policy_from_config` (used when a Keras model with a ``GradOptimizer`` is
    loaded, or a guard's state is restored) can rebuild. Use it as a decorator on
    a :class:`Policy` subclass; ``name`` defaults to the class name in lower case.

    Example:
        >>> @register_policy
        ... class Halve(Policy):
        ...     def get_config(self):
        ...         return {}
        ...     def step(self, norm):
        ...         self.steps += 1
        ...         return 0.5 * float(norm)
        >>> get_policy("halve").step(4.0)
        2.0
        >>> policy_from_config(policy_config(Halve())).__class__.__name__
        'Halve'
    """

    def register(klass):
        if not (isinstance(klass, type) and issubclass(klass, Policy)) or issubclass(klass, SpikeDetector):
            raise TypeError(f"register_policy needs a Policy subclass (not a SpikeDetector), got {klass!r}")
        key = (name or klass.__name__).lower()
        known = _REGISTRY.get(key)
        if known is not None and known is not klass and known.__qualname__ != klass.__qualname__:
            raise ValueError(f"a policy named {key!r} is already registered ({known.__module__}.{known.__qualname__})")
        _REGISTRY[key] = klass
        if klass.__name__.lower() != key:
            _REGISTRY[klass.__name__.lower()] = klass
        return klass

    return register if cls is None else register(cls)


for _cls in (FixedThreshold, AutoClip, ZClip):
    register_policy(_cls)


def registered_policies() -> list:
    """Names of the registered clipping policies, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str, arg: str = "policy") -> type:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"{arg} {name!r} is not a registered policy; known policies: {registered_policies()} "
                         f"(register a new one with gradtools.policies.register_policy)") from None


def get_policy(policy, arg: str = "policy") -> Policy:
    """Turn ``policy`` into a clipping policy; errors name the argument ``arg``.

    Accepts a :class:`Policy`, a positive number (a :class:`FixedThreshold`),
    or the name of a registered policy, built with its defaults: ``"autoclip"``,
    ``"zclip"``, or one added with :func:`register_policy`. ``"zclip"`` has the
    paper's alpha, z-score threshold and clip option but, unlike the authors' code,
    no absolute ceiling (theirs clips at 1.0 by default; see :class:`ZClip`).

    Example:
        >>> get_policy(2.0)
        FixedThreshold(max_norm=2.0)
        >>> get_policy("zclip").z_thresh
        2.5
    """
    if isinstance(policy, Policy) and not isinstance(policy, SpikeDetector):
        return policy
    if isinstance(policy, str):
        if policy.lower() == "fixedthreshold":
            raise ValueError(f"{arg} 'fixedthreshold' needs a threshold: pass the number itself, e.g. 1.0")
        return _lookup(policy, arg)()
    if _checks._is_real(policy):
        return FixedThreshold(_checks.positive(arg, policy))
    raise TypeError(f"{arg} must be a Policy, a positive number or a registered name "
                    f"{registered_policies()}, got {policy!r}")


def policy_config(policy) -> dict:
    """``{"type": name, "config": {...}}``: what :func:`policy_from_config` rebuilds (JSON-safe)."""
    if not isinstance(policy, Policy) or isinstance(policy, SpikeDetector):
        raise TypeError(f"policy must be a clipping Policy, got {policy!r}")
    return {"type": type(policy).__name__, "config": policy.get_config()}


def policy_from_config(config: dict) -> Policy:
    """A policy from :func:`policy_config`'s output; its class must be registered."""
    if not isinstance(config, dict) or "type" not in config:
        raise TypeError(f"config must be a dict with a 'type' key, got {config!r}")
    return _lookup(config["type"]).from_config(config.get("config", {}))
