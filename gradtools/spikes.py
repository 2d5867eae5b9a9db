"""Spike defences and their comparison, free of any deep-learning framework.

The maths of the per-tensor defences is written here once, over the ``xp``
namespace of :mod:`gradtools._ops`, and run by :mod:`gradtools.torch.spikes`
and :mod:`gradtools.keras.spikes` with their own operations:

* :func:`clipnorm_factors`: per-tensor norm clipping, what Keras' ``clipnorm``
  means (each tensor rescaled to a norm of at most ``max_norm``);
* :class:`AdaGC`: adaptive per-tensor clipping (Wang et al. 2025);
* :class:`SPAMSchedule` and :func:`spam_clip`: SPAM's spike-aware clipping of
  entries against Adam's second moment, its periodic momentum reset and the
  learning-rate warm-up after a reset (Huang et al. 2025).

The comparison half (:class:`Scenario`, :func:`default_scenarios`,
:func:`score_run`, :func:`table`) is what both frameworks' ``compare_defences``
share: the scenarios a run is disturbed by and the numbers that judge it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from gradtools import _checks
from gradtools._ops import NUMPY
from gradtools.policies import Stateful

__all__ = ["AdaGC", "AdaGCBase", "SPAMSchedule", "spam_clip", "clipnorm_factors", "Scenario", "default_scenarios",
           "score_run", "table", "DEFENCES", "OUTCOMES", "outcome"]

INF = math.inf


def clipnorm_factors(norms, max_norm: float, xp=NUMPY):
    """Per-tensor factors that bring each tensor's norm down to ``max_norm``: ``c / max(||g_i||, c)``.

    This is Keras' ``clipnorm`` (``keras.optimizers.Optimizer(clipnorm=c)``),
    which clips every gradient tensor on its own; a tensor already below ``c``
    gets exactly 1. A non-finite norm gets 0 (inf) or nan: deciding what to do
    with a non-finite gradient is a guard's job.
    """
    return max_norm / xp.maximum(norms, max_norm)


class AdaGC(Stateful):
    r"""AdaGC (Wang et al. 2025, arXiv 2502.11034): clip each tensor against the EMA of its own clipped norms.

    With ``g_{t,i}`` the gradient of tensor ``i`` at step ``t`` (counted from 1)
    and ``gamma_i`` its running reference:

    * warm-up, ``t < warmup_steps``: global absolute clipping,
      ``h_t = min(lambda_abs / (||g_t|| + eps), 1)`` for every tensor, and
      ``gamma_i <- min(gamma_i, ||h_t g_{t,i}||)`` (the first step sets it);
    * after: ``h_{t,i} = min(lambda_rel * gamma_i / ||g_{t,i}||, 1)`` and
      ``gamma_i <- beta * gamma_i + (1 - beta) * ||h_{t,i} g_{t,i}||``.

    The clipped gradient is ``h_{t,i} g_{t,i}``. The paper reports the spike
    score driven to zero in Llama-2 7B, Mixtral 8x1B and ERNIE 10B-A1.4B
    pretraining with ``lambda_rel = 1.05``, ``beta = 0.98`` and a 100-step warm-up.

    Two choices the paper leaves open, made as for the other policies of
    :mod:`gradtools.policies`: a step with a non-finite norm clips nothing and
    leaves ``gamma`` as it was (a guard deals with it), and a tensor whose
    gradient is exactly 0 this step leaves its ``gamma`` as it was (an unused
    embedding row block would otherwise drag its reference to 0 and then clip
    every later gradient of it to nothing).

    ``step(norms)`` runs the maths with NumPy and returns the factors ``h``;
    :mod:`gradtools.torch.spikes` and :mod:`gradtools.keras.spikes` run the same
    ``update`` on the device.

    Args:
        lambda_rel (float): relative threshold > 0, default 1.05.
        beta (float): EMA factor in [0, 1), default 0.98.
        warmup_steps (int): steps of global absolute clipping, >= 1, default 100.
        lambda_abs (float): the warm-up's global-norm threshold > 0, default 1.0.
        eps (float): added to the warm-up's global norm, default 1e-8.

    Example:
        >>> a = AdaGC(warmup_steps=2)
        >>> a.step([0.5, 1.0]).round(4).tolist()  # warm-up: global clip to 1
        [0.8944, 0.8944]
        >>> a.step([0.4, 10.0]).round(4).tolist()  # tensor 1 spikes: pulled back
        [1.0, 0.0939]
    """

    _state_keys = ("gamma",)

    def __init__(self, lambda_rel: float = 1.05, beta: float = 0.98, warmup_steps: int = 100,
                 lambda_abs: float = 1.0, eps: float = 1e-8):
        self.lambda_rel = _checks.positive("lambda_rel", lambda_rel)
        self.beta = _checks.in_range("beta", beta, 0.0, 1.0, high_open=True)
        self.warmup_steps = _checks.integer("warmup_steps", warmup_steps, minimum=1)
        self.lambda_abs = _checks.positive("lambda_abs", lambda_abs)
        self.eps = _checks.non_negative("eps", eps)
        self.size = 0
        super().__init__()

    def get_config(self) -> dict:
        return {"lambda_rel": self.lambda_rel, "beta": self.beta, "warmup_steps": self.warmup_steps,
                "lambda_abs": self.lambda_abs, "eps": self.eps}

    def init_state(self, xp) -> dict:
        return {**super().init_state(xp), "gamma": xp.full(self.size, INF)}

    def resize(self, n: int) -> None:
        """Hold a reference for ``n`` tensors (done at the first step; a fresh AdaGC has none)."""
        n = _checks.integer("n", n, minimum=1)
        if n == self.size:
            return
        if self.steps:
            raise ValueError(f"this AdaGC has seen {self.steps} steps of {self.size} tensors; it cannot "
                             f"clip {n}: give each model an AdaGC of its own")
        if getattr(self._xp, "pinned", False):
            raise RuntimeError("this AdaGC's state lives in variables a compiled step captured; it cannot resize")
        self.size = n
        self._s = self.init_state(NUMPY)
        self._xp = NUMPY

    def _export(self, state):
        return {"gamma": [float(x) for x in np.asarray(state["gamma"])]}

    def _import(self, state):
        gamma = [float(x) for x in state["gamma"]]
        if self.size and len(gamma) != self.size:
            raise ValueError(f"state_dict['gamma'] holds {len(gamma)} references; this AdaGC clips {self.size} "
                             "tensors")
        if not self.size:
            self.size = len(gamma)
            self._s, self._xp = self.init_state(NUMPY), NUMPY
        return {"gamma": np.asarray(gamma, dtype=np.float64)}

    gamma = property(lambda self: self._export(self._host())["gamma"],
                     doc="Each tensor's reference norm (inf until it has one).")

    def update(self, s, norms, xp):
        """``(factors, new_state)`` for this step's per-tensor ``norms`` (a float64 vector)."""
        steps = s["steps"] + 1
        warm = steps < self.warmup_steps
        total = xp.sqrt(xp.sum(norms * norms))
        finite = xp.isfinite(total)
        h_abs = xp.minimum(self.lambda_abs / (total + self.eps), 1.0)
        h_rel = xp.minimum(self.lambda_rel * s["gamma"] / norms, 1.0)
        factors = xp.where(warm, h_abs, h_rel)
        clipped = factors * norms
        gamma = xp.where(warm, xp.minimum(s["gamma"], clipped),
                         xp.where(xp.isfinite(s["gamma"]), self.beta * s["gamma"] + (1 - self.beta) * clipped,
                                  clipped))
        keep = finite & (norms != 0.0)
        return xp.where(finite, factors, 1.0), {"steps": steps, "gamma": xp.where(keep, gamma, s["gamma"])}

    def step(self, norms) -> np.ndarray:
        """The factors for one step's per-tensor ``norms`` (NumPy), and the state moved on."""
        norms = np.asarray(norms, dtype=np.float64)
        if norms.ndim != 1 or not norms.size:
            raise ValueError(f"norms must be a non-empty 1-D sequence of per-tensor norms, got shape {norms.shape}")
        self.resize(norms.size)
        return np.asarray(self._host_step(self.update, norms, NUMPY))


class AdaGCBase:
    """What ``gradtools.torch.AdaGC`` and ``gradtools.keras.AdaGC`` share: an :class:`AdaGC`
    policy (given, or built from ``**settings``) and its state dict; each framework's
    subclass measures, runs ``policy.update`` in its own operations and rescales."""

    def __init__(self, policy: AdaGC | None = None, **settings):
        if policy is not None and settings:
            raise ValueError(f"give either policy or settings, not both (got settings {sorted(settings)})")
        if policy is not None and not isinstance(policy, AdaGC):
            raise TypeError(f"policy must be a gradtools.spikes.AdaGC, got {type(policy).__name__}")
        self.policy = policy if policy is not None else AdaGC(**settings)

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.policy.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.policy!r})"


@dataclass(frozen=True)
class SPAMSchedule:
    """SPAM's settings and its step schedule (Huang et al. 2025, arXiv 2501.06842).

    At applied step ``s`` (counted from 1), with ``k = s mod reset_interval``:

    * **momentum reset**: when ``k == 0``, Adam's first and second moments are set
      to 0 before the step (the bias-correction step count goes on, as in the
      authors' code);
    * **spike-aware clipping**: when ``s >= settle_steps`` and ``k >= settle_steps``
      (not right after a reset, while ``v`` is still near 0), every entry with
      ``g**2 > threshold * v`` is replaced by ``sign(g) * sqrt(threshold * v)``,
      ``v`` being Adam's second moment before this step (:func:`spam_clip`);
    * **warm-up after a reset**: the learning rate is multiplied by
      ``1 - 0.99 * (1 + cos(pi * k / (warmup_steps + 1))) / 2`` while
      ``k < warmup_steps`` after the first reset (0.01 at the reset step, back to
      1 after ``warmup_steps``); before the first reset it is 1.

    Defaults are the paper's: ``threshold`` 5000 (theta), ``reset_interval`` 500
    (Delta T), ``warmup_steps`` 150 (N); ``settle_steps`` 20 is the authors' code's
    ``grad_accu_steps``; it must be at least 2, since at step 1 and at a reset ``v`` is 0
    and every entry would be clipped to 0. Stable-SPAM (arXiv 2502.17055) makes the thresholds
    adaptive; it is not implemented here.
    """

    threshold: float = 5000.0
    reset_interval: int = 500
    warmup_steps: int = 150
    settle_steps: int = 20

    def __post_init__(self):
        _checks.positive("threshold", self.threshold)
        _checks.integer("reset_interval", self.reset_interval, minimum=1)
        _checks.integer("warmup_steps", self.warmup_steps, minimum=0)
        # at least 2: at step 1 (and right after a reset) v is 0, and every entry would be clipped to 0
        _checks.integer("settle_steps", self.settle_steps, minimum=2)
        if self.warmup_steps >= self.reset_interval:
            raise ValueError(f"warmup_steps must be < reset_interval ({self.reset_interval}), got "
                             f"{self.warmup_steps!r}")

    def get_config(self) -> dict:
        return asdict(self)

    def at(self, step, xp=NUMPY):
        """``(reset, clip, lr_factor)`` at applied step ``step`` (from 1), as arrays of ``xp``."""
        k = step % self.reset_interval
        reset = k == 0
        clip = (step >= self.settle_steps) & (k >= self.settle_steps)
        ramp = 1.0 - 0.99 * (1.0 + xp.cos(math.pi * xp.astype(k, xp.float) / (self.warmup_steps + 1))) / 2.0
        warming = (step >= self.reset_interval) & (k < self.warmup_steps)
        return reset, clip, xp.where(warming, ramp, 1.0)


def spam_clip(g, v, threshold: float, xp=NUMPY):
    """SPAM's spike-aware clipping of one tensor: ``(clipped, spikes)``.

    Entries with ``g**2 > threshold * v`` (``v``: Adam's second moment, before this
    step's update) become ``sign(g) * sqrt(threshold * v)``; ``spikes`` is the
    boolean mask of the entries clipped.
    """
    bound = threshold * v
    spikes = g * g > bound
    root = xp.sqrt(bound)
    return xp.where(spikes, xp.where(g < 0, -root, root), g), spikes


# ---------------------------------------------------------------------- comparison
#: The defences both frameworks' ``compare_defences`` know, in the order of the table.
DEFENCES = ("none", "global_norm", "clipnorm", "value", "agc", "autoclip", "zclip", "adagc", "spam", "zskip")

#: Verdicts of one run, from best to worst (the figure's colours).
OUTCOMES = ("unharmed", "recovered", "slowed", "diverged")


@dataclass(frozen=True)
class Scenario:
    """A disturbance of an otherwise clean training run.

    Args:
        name (str): the row's name in the table.
        spike_steps (tuple of int): steps whose gradient of one tensor is multiplied by
            ``spike_scale`` after the backward pass (an injected gradient spike).
        spike_scale (float): the spike's factor.
        spike_tensor (int): which trainable tensor (in the model's order) spikes.
        corrupt_steps (tuple of int): steps whose inputs are multiplied by ``corrupt_scale``
            (a burst of corrupted batches).
        corrupt_scale (float): the corruption's factor.
        lr_scale (float): the learning rate's factor during the first ``lr_steps`` steps
            (too high, with no warm-up).
        lr_steps (int): steps the learning-rate factor lasts.
    """

    name: str
    spike_steps: tuple = ()
    spike_scale: float = 1.0
    spike_tensor: int = 0
    corrupt_steps: tuple = ()
    corrupt_scale: float = 1.0
    lr_scale: float = 1.0
    lr_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        for arg in ("spike_steps", "corrupt_steps"):
            steps = getattr(self, arg)
            if not isinstance(steps, (tuple, list)) or any(
                    not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in steps):
                raise ValueError(f"{arg} must be a tuple of step indices >= 0, got {steps!r}")
            object.__setattr__(self, arg, tuple(int(s) for s in steps))
        _checks.positive("spike_scale", self.spike_scale)
        _checks.integer("spike_tensor", self.spike_tensor, minimum=0)
        _checks.positive("corrupt_scale", self.corrupt_scale)
        _checks.positive("lr_scale", self.lr_scale)
        _checks.integer("lr_steps", self.lr_steps, minimum=0)

    @property
    def disturbed(self) -> tuple:
        """The steps this scenario disturbs, in order (empty for clean training)."""
        steps = set(self.spike_steps) | set(self.corrupt_steps)
        if self.lr_scale != 1.0:
            steps |= set(range(self.lr_steps))
        return tuple(sorted(steps))

    def spike_at(self, step: int) -> float:
        return self.spike_scale if step in self.spike_steps else 1.0

    def corrupt_at(self, step: int) -> float:
        return self.corrupt_scale if step in self.corrupt_steps else 1.0

    def lr_at(self, step: int) -> float:
        return self.lr_scale if step < self.lr_steps else 1.0


def default_scenarios(steps: int, spike_tensor: int = 0, spikes=(10.0, 100.0, 1000.0), lr_scale: float = 10.0,
                      lr_steps: int | None = None) -> list:
    """The issue's scenarios for a run of ``steps`` steps.

    Clean training; one injected spike on tensor ``spike_tensor`` at 40 % of the run
    (two steps in a row) for each factor in ``spikes``; a burst of three corrupted
    batches (inputs x100) at the same point; and a learning rate ``lr_scale`` times
    too high, with no warm-up, for the first ``lr_steps`` steps (default: 100, or a
    quarter of a shorter run).
    """
    steps = _checks.integer("steps", steps, minimum=10)
    at = int(0.4 * steps)
    lr_steps = min(100, steps // 4) if lr_steps is None else _checks.integer("lr_steps", lr_steps, minimum=1)
    out = [Scenario("clean")]
    out += [Scenario(f"spike x{s:g}", spike_steps=(at, at + 1), spike_scale=float(s), spike_tensor=spike_tensor)
            for s in spikes]
    out.append(Scenario("corrupt x100", corrupt_steps=(at, at + 1, at + 2), corrupt_scale=100.0))
    out.append(Scenario(f"lr x{lr_scale:g}", lr_scale=float(lr_scale), lr_steps=lr_steps))
    return out


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def score_run(losses, clean, scenario: Scenario, tolerance: float = 0.1) -> dict:
    """Judge one run's loss curve against the clean, undefended run with the same seed.

    Returns ``diverged`` (a non-finite loss, or a final loss above the first one),
    ``final_rel`` (final loss over the clean run's; the final loss is the mean of the
    last tenth of the steps), ``steps_lost`` (steps after the first disturbed one
    until the smoothed curve is back within ``tolerance`` of the smoothed clean curve
    for good; 0 if it never left, nan if it never came back) and the ``outcome``
    (in clean training, a run that lags and catches up is ``"unharmed"``).
    """
    losses = np.asarray(losses, dtype=np.float64)
    clean = np.asarray(clean, dtype=np.float64)
    if losses.shape != clean.shape or losses.ndim != 1:
        raise ValueError(f"losses and clean must be 1-D curves of one length, got {losses.shape} and {clean.shape}")
    n = len(losses)
    tail = max(1, n // 10)
    finite = bool(np.all(np.isfinite(losses)))
    final = float(np.mean(losses[-tail:])) if finite else math.nan
    clean_final = float(np.mean(clean[-tail:]))
    diverged = not finite or final > losses[0]
    onset = scenario.disturbed[0] if scenario.disturbed else 0
    steps_lost = math.nan
    if finite:
        window = max(3, n // 20)
        above = _smooth(losses, window) > (1 + tolerance) * _smooth(clean, window)
        after = above[onset:]
        if not after[-1]:
            last = np.flatnonzero(after)
            steps_lost = 0 if not last.size else int(last[-1] + 1)
    record = {"diverged": diverged, "final_loss": final, "final_rel": final / clean_final if finite else math.inf,
              "steps_lost": steps_lost}
    record["outcome"] = outcome(record)
    if not scenario.disturbed and record["outcome"] == "recovered":
        record["outcome"] = "unharmed"  # nothing to recover from: it lagged, then caught up
    return record


def outcome(record: dict) -> str:
    """``"diverged"``, ``"slowed"`` (never back within the tolerance), ``"recovered"`` (back after
    some steps) or ``"unharmed"`` (never left it)."""
    if record["diverged"]:
        return "diverged"
    lost = record["steps_lost"]
    if lost is None or (isinstance(lost, float) and math.isnan(lost)):
        return "slowed"
    return "unharmed" if lost == 0 else "recovered"


def v_growth(before: list, after: list) -> float:
    """Max over tensors of ``||v_after|| / ||v_before||`` (Adam's second moments; nan if ``v`` was 0)."""
    ratios = []
    for b, a in zip(before, after):
        nb, na = float(np.linalg.norm(np.asarray(b, np.float64))), float(np.linalg.norm(np.asarray(a, np.float64)))
        if nb > 0:
            ratios.append(na / nb)
    return max(ratios) if ratios else math.nan


def table(records: list):
    """The records as a pandas DataFrame when pandas is installed, else the list itself."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is optional
        return records
    return pd.DataFrame.from_records(records)


@dataclass
class Run:
    """What one training run hands the comparison: its loss curve (the loss of each step's clean
    batch before the update; nan after a divergence), Adam's second moments around the disturbance,
    the median time per step, the steps a guard skipped, and the clean run's gradient statistics
    (global norm, largest per-tensor norm, largest entry, per step) that calibrate the fixed thresholds."""

    losses: np.ndarray
    v_before: list | None = None
    v_after: list | None = None
    step_time: float = math.nan
    skipped: int = 0
    grad_stats: np.ndarray | None = None


def calibrate(grad_stats: np.ndarray, factor: float = 2.0) -> dict:
    """Fixed thresholds that clean training rarely reaches: ``factor`` times the clean run's median of
    the global norm (``global_norm``), of the largest per-tensor norm (``clipnorm``) and of the largest
    entry (``value``)."""
    med = np.nanmedian(np.asarray(grad_stats, np.float64), axis=0)
    return {"global_norm": float(factor * med[0]), "clipnorm": float(factor * med[1]),
            "value": float(factor * med[2])}


def scaled_settings(steps: int) -> dict:
    """Warm-ups and SPAM's reset interval scaled to a short run, in the proportions of the papers'
    defaults (ZClip 25 steps, AdaGC 100, SPAM 500/150/20, OLMo-core's window 128): a 200-step
    comparison would otherwise never leave their warm-ups."""
    interval = max(20, steps // 4)
    return {"zclip_warmup": max(5, min(25, steps // 10)), "adagc_warmup": max(5, min(100, steps // 10)),
            "spam": SPAMSchedule(reset_interval=interval, warmup_steps=max(1, int(0.3 * interval)),
                                 settle_steps=max(2, int(0.04 * interval))),
            "zskip_window": max(10, min(128, steps // 4)), "zskip_min_history": max(5, min(20, steps // 10))}


def comparison_arguments(model_fn, batches, loss_fn, steps, lr, seed, loss_signature: str) -> tuple:
    """Check what both frameworks' ``compare_defences`` take; returns ``(steps, lr, seed)``."""
    lr = _checks.positive("lr", lr)
    seed = _checks.integer("seed", seed)
    steps = _checks.integer("steps", steps, minimum=10)
    if not callable(model_fn):
        raise TypeError(f"model_fn must be a callable that builds a model, got {type(model_fn).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable {loss_signature}, got {type(loss_fn).__name__}")
    if not callable(batches) and not len(batches):
        raise ValueError("batches must be a callable batches(step) or a non-empty sequence of (x, y)")
    first = batch_at(batches, 0)
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        where = "batches(0)" if callable(batches) else "batches[0]"
        raise ValueError(f"{where} must be an (x, y) pair, got {type(first).__name__}"
                         + (f" of length {len(first)}" if hasattr(first, "__len__") else "")
                         + ": pass a list of (x, y) batches, or a function of the step that returns one")
    return steps, lr, seed


def batch_at(batches, step: int):
    """Step ``step``'s ``(x, y)``: ``batches(step)``, or the sequence's entries in turn."""
    return batches(step) if callable(batches) else batches[step % len(batches)]


def compare(run_one, framework: str, steps: int, scenarios=None, defences=DEFENCES, thresholds=None,
            return_curves: bool = False, spike_tensor: int = 0, progress=None):
    """The comparison loop both frameworks' ``compare_defences`` share.

    ``run_one(defence, scenario, thresholds) -> Run`` trains once from the same initial
    weights. The clean, undefended run comes first: it is the reference every run is
    scored against, and it calibrates the fixed thresholds (:func:`calibrate`) unless
    ``thresholds`` gives them.
    """
    steps = _checks.integer("steps", steps, minimum=10)
    if isinstance(scenarios, Scenario):
        raise TypeError(f"scenarios must be a list of Scenario, got one Scenario ({scenarios.name!r}): "
                        "wrap it in a list")
    scenarios = default_scenarios(steps, spike_tensor) if scenarios is None else list(scenarios)
    if not scenarios or not all(isinstance(s, Scenario) for s in scenarios):
        raise TypeError(f"scenarios must be a non-empty list of gradtools.spikes.Scenario, got {scenarios!r}")
    if isinstance(defences, str) or not defences:
        raise ValueError(f"defences must be a non-empty sequence of names from {DEFENCES}, got {defences!r}")
    for d in defences:
        if d not in DEFENCES:
            raise ValueError(f"defences holds {d!r}, which is none of {DEFENCES}")
    for s in scenarios:
        bad = [t for t in s.disturbed if t >= steps]
        if bad:
            raise ValueError(f"scenario {s.name!r} disturbs step {bad[0]}, but the runs have steps={steps}")
    fixed = [d for d in defences if d in ("global_norm", "clipnorm", "value")]
    if thresholds is not None:
        if not isinstance(thresholds, dict):
            raise TypeError(f"thresholds must be a dict of the fixed defences' thresholds, got {thresholds!r}")
        missing = [d for d in fixed if d not in thresholds]
        if missing:
            raise ValueError(f"thresholds has no value for {missing}, which defences holds: give "
                             f"{fixed} (or thresholds=None, calibrated on the clean run)")
        for d in fixed:
            _checks.positive(f"thresholds[{d!r}]", thresholds[d])
    clean = Scenario("clean")
    baseline = run_one("none", clean, {})
    if not np.all(np.isfinite(baseline.losses)):
        raise RuntimeError("the clean run without a defence diverged: lower the learning rate, or the "
                           "comparison has no reference curve")
    limits = calibrate(baseline.grad_stats) if thresholds is None else dict(thresholds)
    records, curves = [], {}
    for scenario in scenarios:
        times = {}
        for defence in defences:
            if progress is not None:
                progress(scenario.name, defence)
            run = baseline if (defence == "none" and scenario == clean) else run_one(defence, scenario, limits)
            rec = {"framework": framework, "scenario": scenario.name, "defence": defence,
                   **score_run(run.losses, baseline.losses, scenario)}
            rec["v_growth"] = (v_growth(run.v_before, run.v_after) if run.v_before is not None else math.nan)
            rec["skipped"] = int(run.skipped)
            times[defence] = run.step_time
            rec["time_rel"] = run.step_time
            records.append(rec)
            curves[(scenario.name, defence)] = np.asarray(run.losses)
        base = times.get("none", math.nan)
        for rec in records[-len(defences):]:
            rec["time_rel"] = rec["time_rel"] / base if base and np.isfinite(base) else math.nan
    out = table(records)
    return (out, curves) if return_curves else out
