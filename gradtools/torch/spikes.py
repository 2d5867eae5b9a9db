"""Spike defences for PyTorch: per-tensor clipping, AdaGC, SPAM, and a runner that compares them all.

The maths is :mod:`gradtools.spikes`' (written once, run here as tensor
operations on the gradients' device: no value is read back to the host);
:mod:`gradtools.keras.spikes` runs the same maths in TensorFlow, with the same
names and the same decisions on the same gradients.

* :func:`clip_grad_norm_per_tensor_`: each tensor to a norm of at most
  ``max_norm`` (what Keras' ``clipnorm`` means);
* :class:`AdaGC`: each tensor against the EMA of its own clipped norms;
* :class:`SPAM`: a wrapper around ``torch.optim.Adam``/``AdamW`` that clips
  gradient entries against the optimizer's own second moment and resets its
  moments periodically;
* :func:`compare_defences`: every defence on the same seeded scenarios.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from gradtools import _checks
from gradtools import spikes as _spikes
from gradtools.policies import AutoClip, SpikeDetector, ZClip
from gradtools._ops import NUMPY
from gradtools.spikes import SPAMSchedule, clipnorm_factors, spam_clip
from gradtools.torch._ops import ops_on
from gradtools.torch.clip import Clipper, _grads_for_clip, _once, adaptive_clip_grad_
from gradtools.torch.norms import measure

__all__ = ["clip_grad_norm_per_tensor_", "AdaGC", "SPAM", "compare_defences"]


def _grads(parameters) -> list:
    return _grads_for_clip(_once(parameters))


def _norms64(grads) -> torch.Tensor:
    """Per-tensor norms, float64 (the guard's measurement: foreach kernels, overflow-safe)."""
    return measure(grads)[0].to(torch.float64)


@torch.no_grad()
def clip_grad_norm_per_tensor_(parameters, max_norm: float) -> torch.Tensor:
    """Clip each gradient tensor on its own to a norm of at most ``max_norm``, in place.

    ``g_i <- g_i * max_norm / max(||g_i||, max_norm)``: Keras' ``clipnorm``
    (``gradtools.keras.clip_grad_norm_per_tensor`` gives the same factors).
    Unlike ``torch.nn.utils.clip_grad_norm_``, which rescales all gradients by one
    factor from their joint norm, a tensor below ``max_norm`` is left exactly as it is.

    Args:
        parameters: a Module, a Tensor, or an iterable of Tensors or ``(name, tensor)`` pairs.
        max_norm (float): positive finite threshold.

    Returns:
        The per-tensor norms before clipping (a float64 vector; empty without gradients).

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> m(torch.ones(1, 2)).sum().backward()  # weight gradient norm sqrt(2), bias 1
        >>> clip_grad_norm_per_tensor_(m, 1.0).tolist()
        [1.414..., 1.0]
        >>> round(float(m.weight.grad.norm()), 4), float(m.bias.grad)
        (1.0, 1.0)
    """
    max_norm = _checks.positive("max_norm", max_norm)
    grads = _grads(parameters)
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    norms = _norms64(grads)
    factors = clipnorm_factors(norms, max_norm, ops_on(norms.device))
    for g, f in zip(grads, factors):
        g.mul_(f.to(g.dtype))
    return norms


class AdaGC(_spikes.AdaGCBase):
    """AdaGC (Wang et al. 2025, arXiv 2502.11034): clip each tensor against the EMA of its own clipped norms.

    The rule and its defaults are :class:`gradtools.spikes.AdaGC`'s (``lambda_rel``
    1.05, ``beta`` 0.98, a ``warmup_steps`` of 100 with global clipping at
    ``lambda_abs``); this object measures the per-tensor norms, runs that maths on
    the gradients' device and rescales the gradients in place. Call it after
    ``backward()`` and before ``optimizer.step()``, every step, on the same tensors.

    Args:
        policy (gradtools.spikes.AdaGC or None): the state and settings; default a new one
            built from ``**settings``.
        **settings: ``lambda_rel``, ``beta``, ``warmup_steps``, ``lambda_abs``, ``eps``.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> adagc = AdaGC(warmup_steps=1)
        >>> m(torch.ones(1, 2)).sum().backward()
        >>> adagc(m).tolist()  # the first step sets each tensor's reference
        [1.0, 1.0]
        >>> m.weight.grad.mul_(10.0)
        tensor(...)
        >>> [round(f, 3) for f in adagc(m).tolist()]  # the weight's 10x spike
        [0.105, 1.0]
    """

    @torch.no_grad()
    def __call__(self, parameters) -> torch.Tensor:
        """Clip this step's gradients in place; returns the factors applied (a float64 vector)."""
        grads = _grads(parameters)
        if not grads:
            return torch.zeros(0, dtype=torch.float64)
        self.policy.resize(len(grads))
        norms = _norms64(grads)
        ops = ops_on(norms.device)
        state = self.policy.arrays(ops)
        factors, new = self.policy.update(state, norms, ops)
        ops.assign(state, new)
        for g, f in zip(grads, factors):
            g.mul_(f.to(g.dtype))
        return factors



_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class SPAM:
    """SPAM (Huang et al. 2025, arXiv 2501.06842) around a ``torch.optim.Adam`` or ``AdamW``.

    Each ``step()`` takes the schedule of :class:`gradtools.spikes.SPAMSchedule` at
    applied step ``s``: on a reset step it zeroes the wrapped optimizer's own moments
    (``exp_avg``, ``exp_avg_sq``, and ``max_exp_avg_sq`` with ``amsgrad``); on a
    clipping step it replaces every gradient entry with ``g**2 > threshold * v``
    (``v``: the optimizer's ``exp_avg_sq``) by ``sign(g) * sqrt(threshold * v)``
    (:func:`gradtools.spikes.spam_clip`); during the warm-up after a reset it scales
    each group's learning rate for that one step (weight decay included). The
    optimizer's bias-correction step count is left alone, as in the authors' code.

    It stands in for the optimizer: ``param_groups``, ``state``, ``zero_grad()``,
    ``add_param_group()``, and a ``state_dict()`` that holds the optimizer's and SPAM's
    step count, so a run resumed from it takes the same resets and clips. Nothing is
    read back to the host: the schedule depends only on the step count. A learning-rate
    scheduler takes the wrapped optimizer, ``StepLR(opt.optimizer, ...)``: SPAM's
    warm-up scales the rate the scheduler set, for one step, and puts it back.

    Args:
        optimizer (torch.optim.Adam or torch.optim.AdamW): the optimizer whose moments SPAM uses.
        threshold (float): theta, default 5000.
        reset_interval (int): Delta T, steps between momentum resets, default 500.
        warmup_steps (int): learning-rate warm-up after each reset, default 150.
        settle_steps (int): steps after a reset (and at the start) with no clipping, >= 2, default 20.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> adam = torch.optim.Adam(m.parameters(), lr=0.1)
        >>> opt = SPAM(adam, reset_interval=3, warmup_steps=1, settle_steps=2)
        >>> for _ in range(3):
        ...     opt.zero_grad(); m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> float(opt.state[m.weight]["exp_avg"].abs().sum()) > 0, opt.resets
        (True, 1)
    """

    def __init__(self, optimizer, threshold: float = 5000.0, reset_interval: int = 500, warmup_steps: int = 150,
                 settle_steps: int = 20):
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"optimizer must be a torch.optim.Adam or AdamW (SPAM acts on their moments), got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.schedule = SPAMSchedule(float(_checks.positive("threshold", threshold)), reset_interval,
                                     warmup_steps, settle_steps)
        self.steps = 0
        self.resets = 0

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def _pairs(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p, self.optimizer.state.get(p, {})

    @torch.no_grad()
    def step(self, closure=None):
        """Reset, clip and step as the schedule says; returns what the optimizer's ``step`` returns."""
        s = self.steps + 1
        reset, clip, factor = (x.item() for x in NUMPY.run(self.schedule.at, np.int64(s), NUMPY))
        if reset:
            for _, state in self._pairs():
                for key in _MOMENTS:
                    if key in state:
                        state[key].zero_()
            self.resets += 1
        if clip:
            for p, state in self._pairs():
                v = state.get("exp_avg_sq")
                if v is not None:
                    clipped, _ = spam_clip(p.grad, v.to(p.grad.dtype), self.schedule.threshold, ops_on(p.device))
                    p.grad.copy_(clipped)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        if factor != 1.0:
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * factor
        try:
            out = self.optimizer.step(closure)
        finally:
            for g, lr in zip(self.optimizer.param_groups, lrs):
                g["lr"] = lr
        self.steps = s
        return out

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "spam": {"steps": self.steps, "resets": self.resets, "config": self.schedule.get_config()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "spam"}:
            raise ValueError("state_dict must be what SPAM.state_dict() returns (keys 'optimizer' and 'spam'), "
                             f"got {type(state_dict).__name__} with keys {sorted(state_dict) if isinstance(state_dict, dict) else None}")
        spam = state_dict["spam"]
        if spam.get("config") != self.schedule.get_config():
            raise ValueError(f"state_dict is from a SPAM with {spam.get('config')}, this one has "
                             f"{self.schedule.get_config()}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.steps = _checks.integer("state_dict['spam']['steps']", spam["steps"], minimum=0)
        self.resets = _checks.integer("state_dict['spam']['resets']", spam["resets"], minimum=0)

    def __repr__(self) -> str:
        return f"SPAM({type(self.optimizer).__name__}, {self.schedule}, steps={self.steps})"


# ---------------------------------------------------------------------- the comparison
def _second_moments(optimizer, params) -> list:
    return [optimizer.state[p]["exp_avg_sq"].detach().clone() if "exp_avg_sq" in optimizer.state.get(p, {})
            else torch.zeros_like(p) for p in params]


def _run_one(model_fn, init, batches, loss_fn, steps, lr, settings, defence, scenario, limits):
    from gradtools.torch.guard import GradGuard

    model = model_fn()
    model.load_state_dict(init)
    params = [p for p in model.parameters() if p.requires_grad]
    if scenario.spike_tensor >= len(params):
        raise ValueError(f"scenario {scenario.name!r} has spike_tensor={scenario.spike_tensor}, but the model has "
                         f"{len(params)} trainable tensors")
    adam = torch.optim.Adam(params, lr=lr)
    optimizer, pre, guard = adam, None, None
    if defence == "global_norm":
        pre = lambda: torch.nn.utils.clip_grad_norm_(params, limits["global_norm"])  # noqa: E731
    elif defence == "clipnorm":
        pre = lambda: clip_grad_norm_per_tensor_(params, limits["clipnorm"])  # noqa: E731
    elif defence == "value":
        pre = lambda: torch.nn.utils.clip_grad_value_(params, limits["value"])  # noqa: E731
    elif defence == "agc":
        pre = lambda: adaptive_clip_grad_(params)  # noqa: E731
    elif defence in ("autoclip", "zclip"):
        clipper = Clipper(AutoClip() if defence == "autoclip" else ZClip(warmup_steps=settings["zclip_warmup"]))
        pre = lambda: clipper(params)  # noqa: E731
    elif defence == "adagc":
        adagc = AdaGC(warmup_steps=settings["adagc_warmup"])
        pre = lambda: adagc(params)  # noqa: E731
    elif defence == "spam":
        optimizer = SPAM(adam, **settings["spam"].get_config())
    elif defence == "zskip":
        guard = GradGuard(model, adam, spike=SpikeDetector(window=settings["zskip_window"],
                                                          min_history=settings["zskip_min_history"]),
                          max_consecutive_skips=steps)
    losses = np.full(steps, np.nan)
    times, stats, skipped = [], [], 0
    disturbed = scenario.disturbed
    v_before = v_after = None
    for t in range(steps):
        start = time.perf_counter()
        for g in adam.param_groups:
            g["lr"] = lr * scenario.lr_at(t)
        x, y = _spikes.batch_at(batches, t)
        c = scenario.corrupt_at(t)
        loss = loss_fn(model(x * c if c != 1.0 else x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c != 1.0:  # the clean batch's loss, in evaluation mode (no batch-norm statistics move)
            model.eval()
            with torch.no_grad():
                loss = loss_fn(model(x), y)
            model.train()
        value = float(loss.detach())  # the curve is the point: one read per step, in every run alike
        losses[t] = value
        if not np.isfinite(value):
            break
        if defence == "none" and not disturbed:
            with torch.no_grad():
                norms = _norms64([p.grad for p in params])
                stats.append([float(norms.norm()), float(norms.max()),
                              float(max(p.grad.abs().max() for p in params))])
        k = scenario.spike_at(t)
        if k != 1.0:
            params[scenario.spike_tensor].grad.mul_(k)
        if disturbed and t == disturbed[0]:
            v_before = _second_moments(adam, params)
        if pre is not None:
            pre()
        if guard is not None:
            skipped += not guard.step().stepped
        else:
            optimizer.step()
        if disturbed and t == disturbed[-1]:
            v_after = _second_moments(adam, params)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times[3:])) if len(times) > 3 else float("nan")
    return _spikes.Run(losses, [v.numpy() for v in v_before] if v_before is not None else None,
                       [v.numpy() for v in v_after] if v_after is not None else None, step_time, skipped,
                       np.asarray(stats) if stats else None)


def compare_defences(model_fn, batches, loss_fn, *, steps: int = 200, lr: float = 1e-3, scenarios=None,
                     defences=_spikes.DEFENCES, thresholds=None, seed: int = 0, spike_tensor: int = 0,
                     return_curves: bool = False, progress=None):
    """Train once per defence and scenario from the same weights and batches; judge each run.

    Every run uses ``torch.optim.Adam(lr)`` (the scenario may scale the learning rate),
    starts from the weights of ``model_fn()`` built once under ``torch.manual_seed(seed)``,
    and sees the same batches. The defences (names of :data:`gradtools.spikes.DEFENCES`):
    ``none``; ``global_norm`` (``torch.nn.utils.clip_grad_norm_``), ``clipnorm``
    (:func:`clip_grad_norm_per_tensor_`) and ``value`` (``torch.nn.utils.clip_grad_value_``)
    at fixed thresholds (default: twice the clean run's median, :func:`gradtools.spikes.calibrate`);
    ``agc`` (clip factor 0.01); ``autoclip`` (10th percentile); ``zclip``; ``adagc``;
    ``spam``; ``zskip`` (skip a step whose gradient norm has a z-score above 6, as
    OLMo-core does, with :class:`gradtools.torch.GradGuard`). Warm-ups and SPAM's reset
    interval are scaled to the run (:func:`gradtools.spikes.scaled_settings`).

    Args:
        model_fn: builds a fresh ``torch.nn.Module``.
        batches: ``batches(step) -> (x, y)``, or a sequence of ``(x, y)`` used in turn.
        loss_fn: ``loss_fn(outputs, y) -> scalar tensor``.
        steps (int): steps per run, >= 10, default 200.
        lr (float): Adam's learning rate, default 1e-3.
        scenarios (list of gradtools.spikes.Scenario or None): default
            :func:`gradtools.spikes.default_scenarios`.
        defences (sequence of str): which defences, default all.
        thresholds (dict or None): ``global_norm``, ``clipnorm`` and ``value`` thresholds.
        seed (int): the seed of the initial weights, default 0.
        spike_tensor (int): the trainable tensor the default scenarios' spikes hit, default 0.
        return_curves (bool): also return ``{(scenario, defence): loss curve}``.
        progress (callable or None): called with ``(scenario, defence)`` before each run.

    Returns:
        One record per scenario and defence (a pandas DataFrame when pandas is installed):
        ``framework``, ``scenario``, ``defence``, ``diverged``, ``final_loss``, ``final_rel``
        (over the clean undefended run), ``steps_lost`` (until back within 10 % of the clean
        curve), ``outcome``, ``v_growth`` (max over tensors of ``||v||`` after the
        disturbance over before it, Adam's second moment), ``skipped`` and ``time_rel``
        (median time per step over ``none``'s in the same scenario).
    """
    if isinstance(model_fn, torch.nn.Module):
        raise TypeError(f"model_fn must build a fresh model each call (e.g. lambda: MyNet()), got a "
                        f"{type(model_fn).__name__} instance: every run starts from the same weights")
    steps, lr, seed = _spikes.comparison_arguments(model_fn, batches, loss_fn, steps, lr, seed,
                                                   "loss_fn(outputs, y)")
    torch.manual_seed(seed)
    init = copy.deepcopy(model_fn().state_dict())
    settings = _spikes.scaled_settings(steps)

    def run_one(defence, scenario, limits):
        return _run_one(model_fn, init, batches, loss_fn, steps, lr, settings, defence, scenario, limits)

    return _spikes.compare(run_one, "torch", steps, scenarios, defences, thresholds, return_curves, spike_tensor,
                           progress)
