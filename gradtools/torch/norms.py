"""Gradient statistics in one foreach pass, kept on the device.

``grad_stats`` gives, from a single ``torch._foreach_norm`` over the gradients,
the per-parameter norms (keyed by module path), the global norm (the norm of the
per-parameter norms, exactly as ``torch.nn.utils.get_total_norm`` computes it)
and the number of non-finite entries per parameter. Nothing is copied to the
host: read a field with ``float()`` / ``.tolist()`` or call ``as_dict()`` when a
human needs the numbers.

Non-finite entries are counted exactly only when they can exist: a finite
global norm proves that every entry is finite, so the counts are zeros without
touching the gradients again. Checking that costs one scalar read (free on CPU,
one small device-to-host copy on an accelerator; pass ``count_nonfinite=False``
to avoid even that). When the norm is not finite, the entries are counted in
int64, exact in every dtype. A norm can also be infinite while every entry is
finite: a float16 gradient whose norm exceeds 65504. The guard and the
``Clipper`` then measure again in float64 (:func:`stats_in_float64`); the
``torch.nn.utils`` twins return what ``torch.nn.utils`` returns (``inf``).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from gradtools import _checks
from gradtools.stats import GradStats

__all__ = ["named_grads", "grad_stats", "stats_of", "count_nonfinite_entries", "get_total_norm", "GradStats", "snapshot",
           "update_ratios"]


def _named_parameters(parameters, arg: str = "parameters") -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs from a Module, a tensor, or an iterable of tensors or pairs."""
    if isinstance(parameters, torch.nn.Module):
        pairs = list(parameters.named_parameters())
    elif isinstance(parameters, torch.Tensor):
        pairs = [("0", parameters)]
    elif isinstance(parameters, (str, bytes)) or not isinstance(parameters, Iterable):
        raise TypeError(
            f"{arg} must be a torch.nn.Module, a Tensor or an iterable of Tensors, got {type(parameters).__name__}"
        )
    else:
        pairs = []
        for i, item in enumerate(parameters):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
            else:
                name, p = str(i), item
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{arg}[{i}] must be a Tensor, got {type(p).__name__}")
            pairs.append((name, p))
    return pairs


def named_grads(parameters, arg: str = "parameters", *, require_grads: bool = True):
    """Names and gradients of the parameters that have a gradient.

    Raises ``ValueError`` naming ``arg`` if there are no parameters, or (with
    ``require_grads``) if none of them has a gradient.
    """
    pairs = _named_parameters(parameters, arg)
    if not pairs:
        raise ValueError(f"{arg} is empty: there are no parameters to measure")
    kept = [(n, p.grad) for n, p in pairs if p.grad is not None]
    if require_grads and not kept:
        raise ValueError(
            f"{arg} has {len(pairs)} parameter(s) but none has a gradient: call loss.backward() first"
        )
    return [n for n, _ in kept], [g for _, g in kept]


def optimizer_parameters(optimizer) -> list[torch.Tensor]:
    """Every parameter ``optimizer.step()`` updates, in ``param_groups`` order, each once."""
    seen, params = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


_FOREACH_DEVICES = {"cpu", "cuda", "xpu", "mps"}


def _groups(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices per (device, dtype), in the order ``torch.nn.utils`` visits the groups."""
    try:  # the grouping torch.nn.utils itself uses (its order is not that of first appearance)
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        return {key: list(idx) for key, (_, idx) in _group_tensors_by_device_and_dtype([tensors], True).items()}
    except (ImportError, TypeError, RuntimeError):  # pragma: no cover - a torch without it
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        return groups


def device_groups(tensors: list[torch.Tensor], foreach: bool | None):
    """``(indices, use_foreach)`` per (device, dtype) group, as ``torch.nn.utils`` groups them."""
    for (device, _), idx in _groups(tensors).items():
        yield idx, (foreach if foreach is not None else device.type in _FOREACH_DEVICES)


def _foreach_norms(tensors: list[torch.Tensor], norm_type: float, foreach: bool | None) -> list[torch.Tensor]:
    """Per-tensor norms, grouped by device and dtype like torch.nn.utils does."""
    first = tensors[0]
    if foreach is not False and first.device.type in _FOREACH_DEVICES and all(
            t.device == first.device and t.dtype == first.dtype for t in tensors):
        return list(torch._foreach_norm(tensors, norm_type))  # the common case: one group
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx, use_foreach in device_groups(tensors, foreach):
        group = [tensors[i] for i in idx]
        norms = torch._foreach_norm(group, norm_type) if use_foreach else [
            torch.linalg.vector_norm(t, norm_type) for t in group
        ]
        for i, n in zip(idx, norms):
            out[i] = n
    return out  # type: ignore[return-value]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack 0-d tensors on the first one's device (a copy only for those elsewhere)."""
    device = tensors[0].device
    return torch.stack([t if t.device == device else t.to(device) for t in tensors])


def _torch_order(tensors: list[torch.Tensor]) -> list[int] | None:
    """The order in which ``torch.nn.utils`` adds up the norms: grouped by (device, dtype), the
    groups in torch's own order. None when that is the parameters' own order (one group)."""
    order = [i for idx, _ in device_groups(tensors, None) for i in idx]
    return None if order == list(range(len(tensors))) else order


def _total(norms: list[torch.Tensor], norm_type: float, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The norm of the per-tensor norms, summed in ``torch.nn.utils``' order (bit-identical to it)."""
    order = _torch_order(tensors)
    return torch.linalg.vector_norm(_stack(norms if order is None else [norms[i] for i in order]), norm_type)


def count_nonfinite_entries(grads: list[torch.Tensor]) -> torch.Tensor:
    """Non-finite entries per tensor, a 1-d int64 tensor, exact in every dtype (no host sync).

    Counted in int64 (``(~isfinite(g)).sum()``): a count taken in the gradient's own
    dtype would stop at 2048 in float16 and at 256 in bfloat16.
    """
    return _stack([torch.count_nonzero(~torch.isfinite(g)) for g in grads])


def _raise_nonfinite(norm_type: float) -> None:
    raise RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
        "anyway, set `error_if_nonfinite=False`"
    )


@torch.no_grad()
def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None):
    """Norm of an iterable of tensors, as if concatenated into one vector.

    Same signature, result and errors as ``torch.nn.utils.get_total_norm``,
    except that ``norm_type`` is validated. An empty iterable gives ``tensor(0.)``.
    """
    norm_type = _checks.norm_type("norm_type", norm_type)
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if not tensors:
        return torch.tensor(0.0)
    total = _total(_foreach_norms(tensors, norm_type, foreach), norm_type, tensors)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        _raise_nonfinite(norm_type)
    return total


@torch.no_grad()
def grad_stats(parameters, norm_type: float = 2.0, count_nonfinite: bool = True, foreach: bool | None = None) -> GradStats:
    """Global and per-parameter gradient norms (and non-finite counts) in one pass.

    Args:
        parameters: an ``nn.Module`` (names are module paths such as
            ``"layers.3.weight"``), or an iterable of tensors or of
            ``(name, tensor)`` pairs.
        norm_type (float): p of the p-norm, default 2; ``inf`` allowed.
        count_nonfinite (bool): also count inf/nan entries per parameter, default True
            (see the module docstring for its cost).
        foreach (bool or None): as in ``torch.nn.utils``.

    Returns:
        GradStats whose ``total`` equals ``torch.nn.utils.get_total_norm`` of the grads.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 1)
        >>> m(torch.ones(2, 3)).sum().backward()
        >>> s = grad_stats(m)
        >>> s.names
        ['weight', 'bias']
        >>> round(float(s.total), 4)
        4.0
    """
    norm_type = _checks.norm_type("norm_type", norm_type)
    names, grads = named_grads(parameters)
    return stats_of(names, grads, norm_type, count_nonfinite, foreach)


def stats_of(names: list, grads: list, norm_type: float = 2.0, count_nonfinite: bool = True,
             foreach: bool | None = None) -> GradStats:
    """:func:`grad_stats` on gradients already collected (no argument checks; for per-step loops)."""
    norms = _foreach_norms(grads, norm_type, foreach)
    stacked = _stack(norms)  # in the parameters' order, for the names
    total = _total(norms, norm_type, grads)
    nonfinite = None
    if count_nonfinite:
        if bool(torch.isfinite(total)):
            nonfinite = torch.zeros(len(grads), dtype=torch.int64, device=stacked.device)
        else:
            nonfinite = count_nonfinite_entries(grads)
    return GradStats(names, stacked, total, nonfinite, norm_type)


def stats_in_float64(names: list, grads: list, norm_type: float = 2.0) -> GradStats:
    """:func:`stats_of` with the norms accumulated in float64, and no non-finite entries.

    For gradients whose entries are all finite but whose norm overflows their own
    dtype (above 65504 in float16, 3.4e38 in float32): the true norm, not ``inf``.
    """
    norms = _stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float64) for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type)
    return GradStats(names, norms, total, torch.zeros(len(grads), dtype=torch.int64, device=norms.device),
                     norm_type)


def measure(names: list, grads: list, norm_type: float = 2.0) -> tuple[GradStats, float, str | None]:
    """``(stats, norm, first_bad)``: the statistics, the global norm as a float (the one host
    read of a finite step), and the first parameter with a non-finite entry, or None.

    The verdict "non-finite" comes from the entries, never from a norm that overflowed its
    dtype: finite entries with an infinite norm are measured again in float64.
    """
    stats = stats_of(names, grads, norm_type, count_nonfinite=False)
    norm = float(stats.total)
    if math.isfinite(norm):
        return stats, norm, None
    stats.nonfinite = count_nonfinite_entries(grads)
    first_bad = stats.first_nonfinite()
    if first_bad is None:
        stats = stats_in_float64(names, grads, norm_type)
        norm = float(stats.total)
    return stats, norm, first_bad


@torch.no_grad()
def snapshot(parameters) -> list[torch.Tensor]:
    """Copies of the parameters' values (one foreach copy), for :func:`update_ratios`."""
    params = [p for _, p in _named_parameters(parameters)]
    return torch._foreach_mul(params, 1.0)


@torch.no_grad()
def update_ratios(parameters, before: list[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """``||w_after - w_before|| / (||w_before|| + eps)`` per parameter, as a 1-d tensor.

    A healthy ratio for Adam-like training is around 1e-3 (Karpathy's rule of
    thumb); ratios near 1 mean a step rewrote the weights.
    """
    params = [p for _, p in _named_parameters(parameters)]
    if len(params) != len(before):
        raise ValueError(f"before holds {len(before)} tensors but parameters has {len(params)}")
    diffs = torch._foreach_sub(params, before)
    num = _stack(torch._foreach_norm(diffs, 2.0))
    den = _stack(torch._foreach_norm(before, 2.0))
    return num / (den + eps)

