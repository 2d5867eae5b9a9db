"""Clipping and spike policies, free of any deep-learning framework.

A policy sees one number per optimiser step, the global gradient norm, and
answers with a clip threshold (``step``) or a verdict (``SpikeDetector.step``).
The maths lives here once, in each policy's ``update(state, norm, xp)``: a pure
function of the running state (a dict of arrays) over the few operations of an
``xp`` namespace (:mod:`gradtools._ops`). ``step()`` runs it with NumPy, the
reference; :mod:`gradtools.torch` runs the very same function with PyTorch
operations on the gradients' device, so that a clipped, guarded step reads
nothing back to the host and compiles with ``torch.compile(fullgraph=True)``.

Every policy has ``state_dict()`` / ``load_state_dict()`` (plain Python values,
so ``json`` and ``torch.save`` both work) and ``get_config()`` /
``from_config()``. A run resumed from a state dict takes exactly the decisions
the uninterrupted run takes. Inside a step the state lives in arrays of the
framework that runs it; ``state_dict()`` reads them into Python numbers.

Non-finite norms are never recorded: one NaN would otherwise poison every
later threshold. Nor are norms of exactly 0 (a loss weight warmed up from 0, a
fully masked batch): they carry no scale, and a history of zeros would clip
every later gradient to 0. A zero gradient needs no clipping anyway. Deciding
what to do with a non-finite gradient is the job of a guard
(``gradtools.torch.GradGuard``), not of a clipping policy.

A policy of your own needs only ``step(norm)`` and ``get_config()`` (see
:func:`register_policy`); such a policy runs on the host, so the PyTorch clipper
reads the norm to call it. Define ``init_state`` and ``update`` instead, as the
policies here do, and it runs on the device too.
"""

from __future__ import annotations

import math

import numpy as np

from gradtools import _checks
from gradtools._ops import NUMPY, masked_mean_var, ring_from, ring_list, ring_push

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


def _informative(g, xp):
    """A norm worth remembering: finite and not exactly 0 (see the module docstring)."""
    return xp.isfinite(g) & (g != 0.0)


class Stateful:
    """Running state held as arrays of one framework at a time, exported as plain Python values.

    Subclasses define ``init_state(xp)`` (a dict of arrays, ``"steps"`` included),
    ``_export(state)`` / ``_import(state_dict)`` (NumPy arrays <-> plain values) and
    their own maths over the state.
    """

    #: Names of the plain values in ``state_dict()`` beyond ``type``, ``config`` and ``steps``.
    _state_keys: tuple[str, ...] = ()

    def __init__(self):
        self._xp = NUMPY
        self._s = self.init_state(NUMPY)

    def init_state(self, xp) -> dict:
        return {"steps": xp.asarray(0, xp.int)}

    def arrays(self, xp=NUMPY) -> dict:
        """The running state as arrays of ``xp``, moved there (through NumPy) if held elsewhere.

        State held in a pinned namespace (TensorFlow variables that a traced Keras step
        captured) does not move: it is read (``state_dict()``, ``step()``) and written
        (``load_state_dict()``) in place.
        """
        if self._xp.key != xp.key:
            if getattr(self._xp, "pinned", False):
                raise RuntimeError(f"this {type(self).__name__}'s state lives in {self._xp.key[0]} variables that "
                                   f"a compiled step updates; it cannot also run in {xp.key[0]}: give each "
                                   "optimizer a policy (or spike detector) of its own")
            host = {k: self._xp.to_numpy(v) for k, v in self._s.items()}
            self._s, self._xp = {k: xp.from_numpy(v) for k, v in host.items()}, xp
        return self._s

    def _store(self, new: dict) -> None:
        """Write NumPy values into the state where it lives (in place when it is pinned)."""
        xp = self._xp
        if getattr(xp, "pinned", False):
            xp.assign(self._s, new)
        else:
            self._s = {**self._s, **{k: xp.from_numpy(np.asarray(v)) for k, v in new.items()}}

    def _host_step(self, fn, *args):
        """``fn(state, *args)`` with NumPy (``args`` end with the namespace) on a host copy of the
        state; the new state is stored where the state lives; returns ``fn``'s other result."""
        out, new = NUMPY.run(fn, self._host() if getattr(self._xp, "pinned", False) else self.arrays(NUMPY),
                             *args)
        self._store(new)
        return out

    def _host(self) -> dict:
        return {k: self._xp.to_numpy(v) for k, v in self._s.items()}

    @property
    def steps(self) -> int:
        """Steps seen (a read from the device when the state lives there)."""
        return int(self._xp.to_numpy(self._s["steps"]))

    @steps.setter
    def steps(self, value: int) -> None:
        self._store({"steps": np.asarray(value, dtype=np.int64)})

    def _export(self, state: dict) -> dict:
        return {}

    def _import(self, state_dict: dict) -> dict:
        return {}

    def get_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define get_config(): the settings that rebuild it "
                                  "(return {} if it has none), for saving and for state dicts")

    @classmethod
    def from_config(cls, config: dict):
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        return cls(**config)

    def state_dict(self) -> dict:
        host = self._host()
        return {"type": type(self).__name__, "config": self.get_config(), "steps": int(host["steps"]),
                **self._export(host)}

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
        steps = _checks.integer("state_dict['steps']", state_dict["steps"], minimum=0)
        fresh = self.init_state(NUMPY)
        fresh.update(self._import(state_dict))
        fresh["steps"] = np.asarray(steps, dtype=np.int64)
        self._store(fresh)  # where the state lives

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Policy(Stateful):
    """Base class: ``step(norm) -> threshold`` plus state and config handling.

    A subclass defines ``update(state, norm, xp) -> (threshold, new_state)`` over
    the operations of ``xp`` (see :mod:`gradtools._ops`); ``step`` runs it with
    NumPy. A subclass may instead override ``step`` alone: it then runs on the host.
    """

    update = None  # (state, norm, xp) -> (threshold, new state); None: a host-only policy

    def on_device(self) -> bool:
        """Whether the policy's maths can run as array operations (``update``), not only ``step``."""
        return type(self).update is not None and type(self).step is Policy.step

    def step(self, norm) -> float:
        g = _norm_value(norm)
        if type(self).update is None:  # pragma: no cover - a subclass that overrides neither
            raise NotImplementedError(f"{type(self).__name__} must define step() or update()")
        return float(self._host_step(self.update, np.float64(g), NUMPY))


class FixedThreshold(Policy):
    """Clip the global norm to a constant ``max_norm`` (Pascanu et al., 2013).

    Args:
        max_norm (float): the threshold, > 0.

    Example:
        >>> FixedThreshold(1.0).step(5.0)
        1.0
    """

    def __init__(self, max_norm: float):
        self.max_norm = _checks.positive("max_norm", max_norm)
        super().__init__()

    def get_config(self) -> dict:
        return {"max_norm": self.max_norm}

    def update(self, s, norm, xp):
        # a Python number: the device rescales by exactly torch.nn.utils.clip_grad_norm_'s factor
        return self.max_norm, {"steps": s["steps"] + 1}


class AutoClip(Policy):
    """AutoClip (Seetharaman et al., 2020): clip to a percentile of past norms.

    At every step the observed global norm is appended to a history (bounded
    to the last ``history_size`` values), and the threshold is the
    ``percentile``-th percentile of that history, current norm included, with
    linear interpolation (``numpy.percentile``'s default): with the ``n`` norms
    sorted, ``v = (n - 1) * percentile / 100`` and the threshold lies between
    the ``floor(v)``-th and the next. The paper keeps the whole history; a bound
    keeps memory constant on long runs, and the history is a fixed-size buffer,
    so that the same operations run on a device.

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
        self.percentile = _checks.in_range("percentile", percentile, 0.0, 100.0, low_open=True)
        self.history_size = _checks.integer("history_size", history_size, minimum=1)
        super().__init__()

    def get_config(self) -> dict:
        return {"percentile": self.percentile, "history_size": self.history_size}

    def init_state(self, xp) -> dict:
        return {**super().init_state(xp), "history": xp.full(self.history_size, INF), "count": xp.asarray(0, xp.int)}

    def _export(self, state):
        return {"history": ring_list(state["history"], state["count"])}

    def _import(self, state):
        history = [float(x) for x in state["history"]]
        if len(history) > self.history_size:
            raise ValueError(
                f"state_dict['history'] holds {len(history)} norms, more than history_size={self.history_size}"
            )
        buf, count = ring_from(history, self.history_size)
        return {"history": buf, "count": count}

    @property
    def history(self) -> list:
        """The remembered norms, oldest first (read from the device when the state lives there)."""
        return self._export(self._host())["history"]

    def threshold(self) -> float:
        """The current threshold without recording anything (inf if no history)."""
        host = self._host()
        return float(NUMPY.run(self._percentile, host["history"], host["count"], NUMPY))

    def _percentile(self, buf, count, xp):
        n = xp.minimum(count, self.history_size)
        ordered = xp.sort(buf)  # unused slots hold inf and sort last
        v = xp.astype(n - 1, xp.float) * (self.percentile / 100.0)
        lo = xp.maximum(xp.floor_int(v), 0)
        hi = xp.minimum(lo + 1, xp.maximum(n - 1, 0))
        a, b = xp.take(ordered, lo), xp.take(ordered, hi)
        t = v - xp.astype(lo, xp.float)
        diff = b - a
        value = xp.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)  # numpy's own lerp
        return xp.where(n > 0, value, INF)

    def update(self, s, norm, xp):
        history, count = ring_push(s["history"], s["count"], norm, _informative(norm, xp), xp)
        return self._percentile(history, count, xp), {"steps": s["steps"] + 1, "history": history, "count": count}


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
        self.alpha = _checks.in_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.z_thresh = _checks.positive("z_thresh", z_thresh)
        self.warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1)
        self.clip_option = _checks.choice("clip_option", clip_option, {"adaptive_scaling", "mean"})
        self.max_norm = None if max_norm is None else _checks.positive("max_norm", max_norm)
        self.eps = _checks.positive("eps", eps)
        super().__init__()

    def get_config(self) -> dict:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "clip_option": self.clip_option,
            "max_norm": self.max_norm,
            "eps": self.eps,
        }

    def init_state(self, xp) -> dict:
        return {**super().init_state(xp), "buffer": xp.full(self.warmup_steps, 0.0), "count": xp.asarray(0, xp.int),
                "mean": xp.asarray(math.nan, xp.float), "var": xp.asarray(math.nan, xp.float),
                "initialized": xp.asarray(False)}

    def _export(self, state):
        if bool(state["initialized"]):
            return {"buffer": [], "mean": float(state["mean"]), "var": float(state["var"])}
        return {"buffer": ring_list(state["buffer"], state["count"]), "mean": None, "var": None}

    def _import(self, state):
        buffer = [float(x) for x in state["buffer"]]
        if len(buffer) >= self.warmup_steps:
            raise ValueError(f"state_dict['buffer'] holds {len(buffer)} norms; a ZClip with "
                             f"warmup_steps={self.warmup_steps} holds fewer")
        buf, count = ring_from(buffer, self.warmup_steps, fill=0.0)
        if state["mean"] is None or state["var"] is None:
            return {"buffer": buf, "count": count}
        return {"buffer": buf, "count": count, "mean": np.asarray(float(state["mean"])),
                "var": np.asarray(float(state["var"])), "initialized": np.asarray(True)}

    mean = property(lambda self: self._export(self._host())["mean"], doc="The EMA mean (None during warm-up).")
    var = property(lambda self: self._export(self._host())["var"], doc="The EMA variance (None during warm-up).")
    buffer = property(lambda self: self._export(self._host())["buffer"], doc="The warm-up norms collected so far.")
    initialized = property(lambda self: self.mean is not None, doc="Whether the warm-up is over.")

    def update(self, s, norm, xp):
        keep = _informative(norm, xp)
        ready = s["initialized"]
        # warm-up: collect, and initialise mean and variance from the buffer once it is full
        buffer, count = ring_push(s["buffer"], s["count"], norm, keep & ~ready, xp)
        done = ~ready & (count >= self.warmup_steps)
        first_mean, first_var, _ = masked_mean_var(buffer, count, xp)
        # clipping against the EMA statistics
        std = xp.sqrt(s["var"])
        z = (norm - s["mean"]) / (std + self.eps)
        if self.clip_option == "adaptive_scaling":
            outlier = s["mean"] + self.z_thresh * std / (z / self.z_thresh)
        else:
            outlier = s["mean"]
        active = ready & keep
        threshold = xp.where(active & (z > self.z_thresh), outlier, INF)
        clipped = xp.minimum(norm, threshold)
        mean = self.alpha * s["mean"] + (1 - self.alpha) * clipped
        var = self.alpha * s["var"] + (1 - self.alpha) * (clipped - mean) ** 2
        if self.max_norm is not None:
            threshold = xp.minimum(threshold, self.max_norm)
        return threshold, {
            "steps": s["steps"] + 1,
            "buffer": buffer,
            "count": xp.where(done, 0, count),
            "mean": xp.where(active, mean, xp.where(done, first_mean, s["mean"])),
            "var": xp.where(active, var, xp.where(done, first_var, s["var"])),
            "initialized": ready | done,
        }


class SpikeDetector(Stateful):
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
        self.window = _checks.integer("window", window, minimum=2)
        self.z_thresh = _checks.positive("z_thresh", z_thresh)
        self.min_history = _checks.integer("min_history", min_history, minimum=2)
        if self.min_history > self.window:
            raise ValueError(f"min_history must be <= window ({self.window}), got {min_history!r}")
        self.min_ratio = _checks.non_negative("min_ratio", min_ratio)
        self.eps = _checks.positive("eps", eps)
        super().__init__()

    def get_config(self) -> dict:
        return {"window": self.window, "z_thresh": self.z_thresh, "min_history": self.min_history,
                "min_ratio": self.min_ratio, "eps": self.eps}

    def init_state(self, xp) -> dict:
        zero = xp.asarray(0, xp.int)
        return {**super().init_state(xp), "norms": xp.full(self.window, 0.0), "norm_count": zero,
                "losses": xp.full(self.window, 0.0), "loss_count": zero, "spikes": zero}

    def _export(self, state):
        return {"norms": ring_list(state["norms"], state["norm_count"]),
                "losses": ring_list(state["losses"], state["loss_count"]), "spikes": int(state["spikes"])}

    def _import(self, state):
        norms, norm_count = ring_from(state["norms"], self.window, fill=0.0)
        losses, loss_count = ring_from(state["losses"], self.window, fill=0.0)
        spikes = _checks.integer("state_dict['spikes']", state["spikes"], minimum=0)
        return {"norms": norms, "norm_count": norm_count, "losses": losses, "loss_count": loss_count,
                "spikes": np.asarray(spikes, dtype=np.int64)}

    norms = property(lambda self: self._export(self._host())["norms"], doc="The accepted norms, oldest first.")
    losses = property(lambda self: self._export(self._host())["losses"], doc="The accepted losses, oldest first.")
    spikes = property(lambda self: int(self._xp.to_numpy(self._s["spikes"])), doc="Spikes flagged so far.")

    def zscore(self, value: float, history) -> float:
        """z-score of ``value`` against ``history`` (nan while history is too short)."""
        history = [float(x) for x in history]
        if len(history) < self.min_history:
            return math.nan
        buf, count = ring_from(history, len(history))
        mean, var, _ = masked_mean_var(buf, count, NUMPY)
        return float((value - mean) / (np.sqrt(var) + self.eps))

    def _outlier(self, value, buf, count, xp):
        mean, var, n = masked_mean_var(buf, count, xp)
        z = (value - mean) / (xp.sqrt(var) + self.eps)
        above = xp.where(mean > 0, value > self.min_ratio * mean,
                         value - mean > (self.min_ratio - 1.0) * xp.abs(mean))
        return ~xp.isfinite(value) | ((value != 0.0) & (n >= self.min_history) & (z > self.z_thresh) & above)

    def update(self, s, norm, xp, loss=None):
        """``(spike, new_state)``: the verdict on this step's norm (and loss) as a boolean array."""
        spike = self._outlier(norm, s["norms"], s["norm_count"], xp)
        new = {"steps": s["steps"] + 1}
        if loss is not None:
            spike = spike | self._outlier(loss, s["losses"], s["loss_count"], xp)
            new["losses"], new["loss_count"] = ring_push(s["losses"], s["loss_count"], loss, ~spike & (loss != 0.0),
                                                         xp)
        new["norms"], new["norm_count"] = ring_push(s["norms"], s["norm_count"], norm, ~spike & (norm != 0.0), xp)
        new["spikes"] = s["spikes"] + xp.where(spike, 1, 0)
        return spike, {**s, **new}

    def step(self, norm, loss=None) -> bool:
        """Record ``norm`` (and ``loss``) and return True if this step is a spike."""
        g = np.float64(_norm_value(norm))
        l_val = None if loss is None else np.float64(_norm_value(loss, "loss"))
        return bool(self._host_step(self.update, g, NUMPY, l_val))


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
