"""Gradient clipping: drop-in ``torch.nn.utils`` twins, AGC, and policy-driven clipping.

* :func:`clip_grad_norm_` and :func:`clip_grad_value_` take the same arguments,
  return the same values and have the same effect as their ``torch.nn.utils``
  namesakes, but reject bad thresholds with a clear error instead of silently
  zeroing or NaN-ing every gradient. Like them they read ``parameters`` once (a
  generator works), and no parameters, or none with a gradient, give what they give:
  ``tensor(0.)`` from :func:`clip_grad_norm_`, ``None`` from the others. One
  deliberate difference: the threshold must be a Python number, not a tensor.
* :func:`adaptive_clip_grad_` is unit-wise adaptive gradient clipping (AGC,
  Brock et al., 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization").
* :func:`unit_ratios` measures what AGC acts on, ``||G_i|| / max(||W_i||, eps)`` per unit;
  :func:`direction_change` the angle by which a clip turned the gradient.
* :class:`~gradtools.torch.clip.Clipper` applies any policy from :mod:`gradtools.policies` and
  reports the norm before and after.
"""

from __future__ import annotations

import math

import torch

from gradtools import _checks
from gradtools._ops import select
from gradtools.stats import ClipperBase, ClipResult, GradStats
from gradtools.torch._ops import ops_on
from gradtools.torch.norms import (
    _all_reduce,
    _foreach_norms,
    _named_parameters,
    _raise_nonfinite,
    _stack,
    _total,
    device_groups,
    is_dtensor,
    local,
    measure,
    named_grads,
)

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "adaptive_clip_grad_", "Clipper", "ClipResult",
           "unit_ratios", "direction_change"]


def _once(parameters):
    """A list of an iterable of parameters (``model.parameters()`` is a generator, read twice here)."""
    if isinstance(parameters, (torch.nn.Module, torch.Tensor, list, tuple)):
        return parameters
    try:
        return list(parameters)
    except TypeError:
        return parameters  # not iterable: _named_parameters raises the clear error


def _grads_for_clip(parameters):
    """The gradients to clip (none: ``[]``, as ``torch.nn.utils`` has it)."""
    return [p.grad for _, p in _named_parameters(parameters) if p.grad is not None]


def _local_grads(parameters):
    """This rank's part of each gradient (the gradients themselves unless they are DTensors)."""
    return [local(g) for g in _grads_for_clip(parameters)]


@torch.no_grad()
def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor, foreach: bool | None = None) -> None:
    """Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)`` in place.

    The coefficient is applied even when it is 1, which avoids a host sync on
    accelerators (the same choice ``torch.nn.utils`` makes).
    """
    grads = _local_grads(parameters)
    if not grads:
        return
    _scale_(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0), foreach)


def _scale_(grads: list, coef: torch.Tensor, foreach: bool | None) -> None:
    """Multiply ``grads`` by the 0-d ``coef`` in place, one foreach call per device and dtype."""
    for idx, use_foreach in device_groups(grads, foreach):
        group = [grads[i] for i in idx]
        c = coef if coef.device == group[0].device else coef.to(group[0].device)
        if use_foreach:
            torch._foreach_mul_(group, c)
        else:
            for g in group:
                g.mul_(c)


@torch.no_grad()
def clip_grad_norm_(
    parameters,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip the global gradient norm, like ``torch.nn.utils.clip_grad_norm_``.

    ``g <- g * min(1, max_norm / (||g|| + 1e-6))`` where ``||g||`` is the norm of
    all gradients together (Pascanu et al., 2013).

    Args:
        parameters: a Module, a Tensor, or an iterable (a generator is read once)
            of Tensors or of ``(name, tensor)`` pairs.
        max_norm (float): positive finite threshold.
        norm_type (float): p of the p-norm (``inf`` allowed), default 2.
        error_if_nonfinite (bool): raise ``RuntimeError`` if the norm is nan/inf.
        foreach (bool or None): use the foreach kernels (default: where supported).

    Returns:
        The total norm before clipping, a 0-d tensor; ``tensor(0.)`` when no
        parameter has a gradient, as in ``torch.nn.utils``.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> m(torch.ones(1, 2)).sum().backward()
        >>> float(clip_grad_norm_(m, max_norm=0.5)) > 0.5
        True
    """
    max_norm = _checks.positive("max_norm", max_norm)
    norm_type = _checks.norm_type("norm_type", norm_type)
    parameters = _once(parameters)
    grads = _grads_for_clip(parameters)
    if not grads:
        return torch.tensor(0.0)
    total = _total(_foreach_norms(grads, norm_type, foreach), norm_type, grads)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        _raise_nonfinite(norm_type)
    clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


@torch.no_grad()
def clip_grad_value_(parameters, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` in place.

    Same signature and effect as ``torch.nn.utils.clip_grad_value_``. Note that
    value clipping changes the gradient's direction, unlike norm clipping.
    """
    clip_value = _checks.positive("clip_value", clip_value)
    grads = _local_grads(parameters)
    for idx, use_foreach in device_groups(grads, foreach):
        group = [grads[i] for i in idx]
        if use_foreach:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    # Biases and gains: the whole vector is one unit. Weights: one unit per output
    # row (dim 0), the norm taken over every other dimension (fan-in, kernel).
    if x.ndim <= 1:
        return x.norm(2)
    return x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters, clip_factor: float = 0.01, eps: float = 1e-3, exclude=()) -> torch.Tensor:
    """Unit-wise adaptive gradient clipping (AGC; Brock et al., 2021).

    For every unit i (a row of a weight matrix, a filter of a convolution), with
    the limit ``L_i = clip_factor * max(||W_i||, eps)``: ``G_i`` is left alone if
    ``||G_i|| < L_i``, else ``G_i <- G_i * L_i / max(||G_i||, 1e-6)``, exactly as in
    timm's ``adaptive_clip_grad``.

    Args:
        parameters: a Module or iterable of Tensors or ``(name, tensor)`` pairs.
        clip_factor (float): lambda, default 0.01 (the paper's value for batch size 4096;
            larger batches want smaller values).
        eps (float): floor on the weight norm so zero-initialised weights can move, default 1e-3.
        exclude (iterable of str): names (or name prefixes) to leave alone; the paper
            does not clip the final classifier, e.g. ``exclude=("fc",)``.

    Returns:
        The number of units whose gradient was scaled down, as a 0-d int64 tensor on
        the gradients' device: nothing is read to the host (``int(n)`` reads it).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 3)
        >>> m(torch.ones(1, 2)).sum().backward()
        >>> int(adaptive_clip_grad_(m, clip_factor=1e-3, exclude=("bias",)))
        3
    """
    clip_factor = _checks.positive("clip_factor", clip_factor)
    eps = _checks.positive("eps", eps)
    exclude = _checks.names("exclude", exclude)
    counts, whole, sharded = [], [], []
    for name, p in _named_parameters(parameters):
        if p.grad is None or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if is_dtensor(p) and _sharded(p):
            sharded.append(p)
            if p.ndim <= 1:  # one unit split across the ranks: its norms need the others' shards
                whole.append(p)
                continue
            if any(_sharded(p, dim) for dim in range(1, p.ndim)):
                raise NotImplementedError(
                    f"adaptive_clip_grad_ needs whole units (rows) on each rank: parameter {name!r} is sharded "
                    f"as {p.placements} (FSDP2's fully_shard shards dim 0, which keeps rows whole)")
        counts.append(_agc_(local(p.grad), _unitwise_norm(local(p.detach())), _unitwise_norm(local(p.grad)),
                            clip_factor, eps))
    if not sharded:
        return _stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64)
    return _agc_sharded(whole, sharded, counts, clip_factor, eps)


def _sharded(p, dim: int | None = None) -> bool:
    """Whether the DTensor ``p`` is sharded (along tensor dimension ``dim``, if given)."""
    return any(type(pl).__name__ == "Shard" and (dim is None or pl.dim == dim) for pl in p.placements)


def _agc_(g, w_norm, g_norm, clip_factor, eps) -> torch.Tensor:
    """Scale ``g`` unit by unit against the weights' unit norms; the count of units scaled down (on the device)."""
    max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
    # timm's rule: a unit under its limit is left alone, also when the limit is below the 1e-6 floor
    scale = torch.where(g_norm < max_norm, 1.0, max_norm / g_norm.clamp(min=1e-6))
    g.mul_(scale.to(g.dtype))
    return (scale < 1.0).sum()


def _agc_sharded(whole, sharded, counts, clip_factor, eps) -> torch.Tensor:
    """The sharded rest of AGC in one collective: the squared norms of the units split across ranks,
    and this rank's count of clipped rows, summed over the ranks."""
    import torch.distributed as dist

    device = local(sharded[0].grad).device
    rows = _stack(counts).sum().double() if counts else torch.zeros((), dtype=torch.float64, device=device)
    parts = [local(p.detach()).double().pow(2).sum() for p in whole] + [
        local(p.grad).double().pow(2).sum() for p in whole]
    total = _all_reduce(_stack(parts + [rows]), whole + whole + [sharded[0]], dist.ReduceOp.SUM)
    n = len(whole)
    count = total[-1].round().to(torch.int64)
    for i, p in enumerate(whole):
        w_norm, g_norm = total[i].sqrt().to(p.dtype), total[n + i].sqrt().to(p.dtype)
        count = count + _agc_(local(p.grad), w_norm, g_norm, clip_factor, eps)
    return count


@torch.no_grad()
def unit_ratios(parameters, eps: float = 1e-3) -> dict:
    """Per unit, the gradient-to-weight ratio AGC compares with its clip factor.

    ``||G_i|| / max(||W_i||, eps)`` for every unit i (a row of a weight matrix, a
    filter; a bias or gain is one unit), as in :func:`adaptive_clip_grad_`: at
    ``clip_factor=c`` AGC scales down exactly the units whose ratio is above ``c``.

    Args:
        parameters: a Module or iterable of Tensors or ``(name, tensor)`` pairs.
        eps (float): floor on the weight norm, default 1e-3.

    Returns:
        dict: parameter name -> float64 NumPy array, one ratio per unit (parameters
        without a gradient are left out).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 3)
        >>> m(torch.ones(1, 2)).sum().backward()
        >>> {k: v.shape for k, v in unit_ratios(m).items()}
        {'weight': (3,), 'bias': (1,)}
    """
    eps = _checks.positive("eps", eps)
    out = {}
    for name, p in _named_parameters(parameters):
        if p.grad is None:
            continue
        ratio = _unitwise_norm(p.grad.double()) / _unitwise_norm(p.detach().double()).clamp(min=eps)
        out[name] = ratio.reshape(-1).cpu().numpy()
    return out


def direction_change(before, after) -> float:
    """The angle in degrees between two gradients, each a list of tensors taken as one vector.

    Global-norm clipping rescales the gradient and leaves the angle at 0;
    per-variable (Keras ``clipnorm``), value and unit-wise clipping turn it. See
    :func:`gradtools.maths.angle_between` (float64, accurate near 0).

    Example:
        >>> import torch
        >>> g = [torch.tensor([3.0, 0.5])]
        >>> before = [t.clone() for t in g]
        >>> round(direction_change(before, [t.clamp(-1, 1) for t in g]), 2)
        17.1
    """
    from gradtools.maths import angle_between

    def host(tensors, arg):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if not isinstance(tensors, (list, tuple)):
            raise TypeError(f"{arg} must be a tensor or a list of tensors, got {type(tensors).__name__}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                hint = " (a parameter without a gradient? leave it out)" if t is None else ""
                raise TypeError(f"{arg}[{i}] must be a tensor, got {type(t).__name__}{hint}")
        return [t.detach().double().cpu().numpy() for t in tensors]

    return angle_between(host(before, "before"), host(after, "after"), names=("before", "after"))


def _nothing_to_clip(threshold: float) -> ClipResult:
    zero = torch.tensor(0.0)
    return ClipResult(zero, zero, threshold, False)


def policy_threshold(policy, total: torch.Tensor, norm: float | None = None, mask=None):
    """This step's threshold from ``policy``, computed on ``total``'s device (no host read), or
    on the host for a policy that defines only ``step()`` (one read of the norm). With ``mask``
    (a boolean tensor) the policy's state moves only where it holds, and the threshold is inf
    elsewhere. A fixed threshold stays a Python number."""
    if not policy.on_device():
        proceed = True if mask is None else bool(mask)
        return policy.step(float(total) if norm is None else norm) if proceed else math.inf
    xp = ops_on(total.device)
    state = policy.arrays(xp)
    threshold, new = policy.update(state, total.detach().to(torch.float64), xp)
    if mask is None:
        xp.assign(state, new)
        return threshold
    xp.assign(state, select(mask, new, state, xp))
    return threshold if isinstance(threshold, float) else torch.where(mask, threshold, math.inf)


def _factor(threshold, total: torch.Tensor) -> torch.Tensor:
    """``min(1, threshold / (total + 1e-6))`` rounded exactly as ``torch.nn.utils.clip_grads_with_norm_``
    rounds it, which reads a tensor threshold to a Python number (``t / x`` is ``x.reciprocal() * t``,
    the number taken in the op's compute type): here the threshold stays on the device."""
    if not isinstance(threshold, torch.Tensor):
        return torch.clamp(threshold / (total + 1e-6), max=1.0)
    compute = torch.float32 if total.dtype in (torch.float16, torch.bfloat16) else total.dtype
    product = torch.reciprocal(total + 1e-6).to(compute) * threshold.to(compute)
    return torch.clamp(product.to(total.dtype), max=1.0)


class Clipper(ClipperBase):
    """Clip the global norm with any policy and report the norm before and after.

    The policy's maths runs as tensor operations on the gradients' device
    (:mod:`gradtools.policies`), so a call reads nothing back to the host and
    compiles with ``torch.compile(fullgraph=True)``; the result's fields are
    tensors, read when you read them. A policy of your own that defines only
    ``step()`` costs one read of the norm per call.

    Args:
        policy: a :class:`gradtools.policies.Policy`, a positive number
            (fixed threshold), ``"autoclip"`` or ``"zclip"``.
        norm_type (float): p of the p-norm, default 2.

    Example:
        >>> import torch
        >>> from gradtools.policies import AutoClip
        >>> m = torch.nn.Linear(2, 1)
        >>> clipper = Clipper(AutoClip(percentile=50))
        >>> m(torch.ones(1, 2)).sum().backward()   # the gradient's norm is sqrt(3)
        >>> r = clipper(m)   # threshold: the first norm itself
        >>> bool(r.clipped), 0 < float(r.norm_before - r.norm_after) < 1e-5
        (True, True)

    The factor is ``torch.nn.utils.clip_grad_norm_``'s, ``min(1, t / (norm + 1e-6))``,
    applied whenever the threshold ``t`` is finite, as in ``gradtools.keras``.
    Half-precision gradients are measured with float32 accumulation, so a float16
    norm above 65504 is a number, not inf.
    """

    @torch.no_grad()
    def __call__(self, parameters, stats=None, norm: float | None = None) -> ClipResult:
        """Ask the policy for this step's threshold and clip to it.

        With no gradients at all (every parameter frozen) nothing is clipped and the
        policy is not consulted: a zero norm would enter its history.
        """
        parameters = _once(parameters)
        if stats is None and not _grads_for_clip(parameters):
            return _nothing_to_clip(math.inf)
        parameters, stats = self._measure(parameters, stats)
        return self.clip_to(parameters, policy_threshold(self.policy, stats.total, norm), stats)

    def _measure(self, parameters, stats):
        """``(parameters, stats)``, measuring what the caller did not pass."""
        if stats is None or stats.norm_type != self.norm_type:
            names, grads = named_grads(parameters)
            norms, total, own = measure(grads, self.norm_type)
            stats = GradStats(names, norms, total, None, self.norm_type)
            stats.own_total = own
        return parameters, stats

    @torch.no_grad()
    def clip_to(self, parameters, threshold, stats=None, norm: float | None = None) -> ClipResult:
        """Clip to a threshold decided elsewhere (a number or a 0-d tensor), without consulting the policy.

        This is what :class:`~gradtools.torch.guard.GradGuard` calls: its decider asks the policy (so that a
        skipped step never enters the policy's history), then the clipper rescales.
        """
        parameters = _once(parameters)
        if stats is None and not _grads_for_clip(parameters):
            return _nothing_to_clip(threshold)
        parameters, stats = self._measure(parameters, stats)
        total = stats.total
        if isinstance(threshold, (int, float)) and math.isinf(threshold):
            return ClipResult(total, total, threshold, False)
        coef = self.rescale(parameters, threshold, total, getattr(stats, "own_total", None))
        return ClipResult(total, total * coef, threshold, coef < 1.0)  # the norm scales linearly

    @staticmethod
    def rescale(parameters, threshold, total: torch.Tensor, own: torch.Tensor | None = None,
                where: torch.Tensor | None = None) -> torch.Tensor:
        """Multiply the gradients by torch.nn.utils' factor ``min(1, threshold / (total + 1e-6))``,
        whatever the norm (no host read), and return the factor.

        ``own``: the norm in the gradients' own dtype (see :func:`~gradtools.torch.norms.device_norms`);
        the factor is computed from it, as ``torch.nn.utils`` does, wherever it is finite.
        ``where``: a boolean 0-d tensor; where it is false the factor is 1 (a step not taken
        keeps the gradients it was decided on, NaN factor or not)."""
        coef = _factor(threshold, total)
        if own is not None and own is not total:
            coef = torch.where(torch.isfinite(own), _factor(threshold, own).to(coef.dtype), coef)
        if where is not None:
            coef = torch.where(where, coef, torch.ones_like(coef))
        _scale_(_local_grads(parameters), coef, None)
        return coef
