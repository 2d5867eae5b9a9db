"""Gradient statistics in one foreach pass, kept on the device.

``grad_stats`` gives, from a single ``torch._foreach_norm`` over the gradients,
the per-parameter norms (keyed by module path), the global norm (the norm of the
per-parameter norms, exactly as ``torch.nn.utils.get_total_norm`` computes it)
and the number of non-finite entries per parameter. Nothing is copied to the
host: read a field with ``float()`` / ``.tolist()`` or call ``as_dict()`` when a
human needs the numbers.

Non-finite entries are counted exactly, in int64, but only when they are read
(``stats.nonfinite``, ``as_dict()``): a finite global norm proves every entry
finite, so the counts are zeros without touching the gradients again, and
measuring alone costs no more than ``torch.nn.utils.get_total_norm``. Read them
before the gradients change (the guard and the monitor do).

Sharded parameters (FSDP2's ``fully_shard``, any ``DTensor``): each rank takes
the norms of its own shards, and one collective for all parameters together
(per mesh dimension that shards something) turns them into the full norms, the
same on every rank and equal to those of the unsharded model.

The guard and the ``Clipper`` measure half-precision gradients with float32
accumulation (:func:`device_norms`): a float16 gradient whose entries are
finite but whose norm exceeds 65504 is no overflow. The ``torch.nn.utils``
twins return what ``torch.nn.utils`` returns (``inf``).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from gradtools import _checks
from gradtools.stats import GradStats

__all__ = ["named_grads", "grad_stats", "stats_of", "count_nonfinite_entries", "get_total_norm", "GradStats", "snapshot",
           "update_ratios", "device_norms", "is_dtensor", "local"]


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


def _foreach_norms(tensors: list[torch.Tensor], norm_type: float, foreach: bool | None,
                   dtype=None) -> list[torch.Tensor]:
    """Per-tensor norms, grouped by device and dtype like torch.nn.utils does (full norms of DTensors)."""
    if any(is_dtensor(t) for t in tensors):
        # a rank may hold an empty shard (fewer rows than ranks): it adds 0 (a max over nothing is no norm)
        shards = [t if t.numel() else t.new_zeros(1) for t in (local(t) for t in tensors)]
        return _full_norms(_foreach_norms(shards, norm_type, foreach, dtype), tensors, norm_type)
    first = tensors[0]
    if foreach is not False and first.device.type in _FOREACH_DEVICES and all(
            t.device == first.device and t.dtype == first.dtype for t in tensors):
        return list(torch._foreach_norm(tensors, norm_type, dtype=dtype))  # the common case: one group
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx, use_foreach in device_groups(tensors, foreach):
        group = [tensors[i] for i in idx]
        norms = torch._foreach_norm(group, norm_type, dtype=dtype) if use_foreach else [
            torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in group
        ]
        for i, n in zip(idx, norms):
            out[i] = n
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- sharded tensors
def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except (ImportError, AttributeError):  # pragma: no cover - a torch built without distributed
        return None
    return DTensor


_DTENSOR = _dtensor_class()


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated tensor)."""
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself unless it is a DTensor); in-place changes reach ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _shard_masks(tensors) -> list:
    """``(process group, mask)`` per mesh dimension along which some tensor is sharded."""
    from torch.distributed.tensor import Shard

    meshes = {t.device_mesh for t in tensors if is_dtensor(t)}
    if len(meshes) > 1:
        raise ValueError(f"the gradients live on {len(meshes)} different device meshes; gradtools needs them on one")
    mesh = meshes.pop()
    out = []
    for dim in range(mesh.ndim):
        mask = [is_dtensor(t) and isinstance(t.placements[dim], Shard) for t in tensors]
        if any(mask):
            out.append((mesh.get_group(dim), mask))
    return out


def _all_reduce(values: torch.Tensor, tensors, op) -> torch.Tensor:
    """Combine per-tensor partial values across the ranks that hold the other shards: one collective
    per sharded mesh dimension, for all tensors together."""
    import torch.distributed as dist

    for group, mask in _shard_masks(tensors):
        if all(mask):  # fully_shard: every tensor sharded the same way
            values = values.clone()
            dist.all_reduce(values, op=op, group=group)
            continue
        keep = _mask_tensor(tuple(mask), values.device)
        part = torch.where(keep, values, torch.zeros_like(values))
        dist.all_reduce(part, op=op, group=group)
        values = torch.where(keep, part, values)
    return values


_MASKS: dict = {}


def _mask_tensor(mask: tuple, device) -> torch.Tensor:
    """``mask`` as a boolean tensor on ``device``, made once (a copy to an accelerator waits for it)."""
    key = (mask, str(device))
    if key not in _MASKS:
        _MASKS[key] = torch.tensor(mask, device=device)
    return _MASKS[key]


def _full_norms(norms: list[torch.Tensor], tensors, norm_type: float) -> list[torch.Tensor]:
    """The full norms from the local shards' norms (sums of p-th powers, or maxima for inf)."""
    import torch.distributed as dist

    vec = _stack(norms)
    if math.isinf(norm_type):
        # a maximum drops NaN (a comparison with NaN is false): send NaN as its own flag, in the
        # same collective, and the shard's norm as inf
        nan = torch.isnan(vec)
        both = _all_reduce(torch.cat([torch.where(nan, math.inf, vec), nan.to(vec.dtype)]), tensors + tensors,
                           dist.ReduceOp.MAX)
        return list(torch.where(both[len(norms):] > 0, math.nan, both[:len(norms)]).unbind())
    powered = _all_reduce(vec.double() ** norm_type, tensors, dist.ReduceOp.SUM)
    return list((powered ** (1.0 / norm_type)).to(vec.dtype).unbind())


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
    order = None if any(is_dtensor(t) for t in tensors) else _torch_order(tensors)
    return torch.linalg.vector_norm(_stack(norms if order is None else [norms[i] for i in order]), norm_type)


def count_nonfinite_entries(grads: list[torch.Tensor]) -> torch.Tensor:
    """Non-finite entries per tensor, a 1-d int64 tensor, exact in every dtype (no host sync).

    Counted in int64 (``(~isfinite(g)).sum()``): a count taken in the gradient's own
    dtype would stop at 2048 in float16 and at 256 in bfloat16.
    """
    counts = _stack([torch.count_nonzero(~torch.isfinite(local(g))) for g in grads])
    if any(is_dtensor(g) for g in grads):
        import torch.distributed as dist

        counts = _all_reduce(counts, grads, dist.ReduceOp.SUM)
    return counts


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
    stacked, total = _norms_and_total(grads, norm_type, foreach)
    stats = GradStats(names, stacked, total, None, norm_type)
    if count_nonfinite:
        stats.count_with(lambda: nonfinite_counts(stats.total, grads))
    return stats


def _norms_and_total(grads: list, norm_type: float, foreach: bool | None = None, dtype=None):
    """The per-tensor norms stacked, and the global norm: one foreach pass and one stack in the
    common case (one device, one dtype), exactly the operations of ``get_total_norm``."""
    if not any(is_dtensor(t) for t in grads):
        groups = _groups(grads)
        if len(groups) == 1:
            device = grads[0].device
            if foreach is not False and device.type in _FOREACH_DEVICES:
                stacked = torch.stack(torch._foreach_norm(grads, norm_type, dtype=dtype))
                return stacked, torch.linalg.vector_norm(stacked, norm_type)
    norms = _foreach_norms(grads, norm_type, foreach, dtype)
    return _stack(norms), _total(norms, norm_type, grads)


def nonfinite_counts(total: torch.Tensor, grads: list) -> torch.Tensor:
    """Exact counts, computed only when the global norm says some entry may be non-finite."""
    if bool(torch.isfinite(total)):
        return torch.zeros(len(grads), dtype=torch.int64, device=total.device)
    return count_nonfinite_entries(grads)


def device_norms(grads: list, norm_type: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(norms, total, own)`` for the guard and the clipper, with no read from the device.

    ``own`` is the global norm ``torch.nn.utils`` computes, in the gradients' dtype; the clip
    factor is computed from it, so that clipping is bit-identical to ``clip_grad_norm_``.
    ``norms`` and ``total`` are the same numbers, except that half-precision gradients also
    accumulate in float32 (one pass, from which torch's own half-precision norms are rounded):
    where a float16 norm overflows (entries finite, norm above 65504) they hold the float32
    one. So ``total`` is non-finite when some entry is, or when a float32 sum overflows
    (float32 or bfloat16 entries above about 1.8e19): :func:`measure` tells those apart.
    """
    if not any(g.dtype in (torch.float16, torch.bfloat16) for g in grads):
        norms, total = _norms_and_total(grads, norm_type)
        return norms, total, total
    wide = _foreach_norms(grads, norm_type, None, torch.float32)
    narrow = [n.to(g.dtype) for n, g in zip(wide, grads)]  # what torch._foreach_norm returns for them
    own = _total(narrow, norm_type, grads)
    wide_total = _total(wide, norm_type, grads)
    norms = torch.where(torch.isfinite(_stack(narrow)), _stack(narrow).to(torch.float32), _stack(wide))
    return norms, torch.where(torch.isfinite(own), own.to(torch.float32), wide_total), own


def measure(grads: list, norm_type: float = 2.0, wide: bool = True, narrow=None):
    """:func:`device_norms`, and with ``wide`` float32 norms that overflow (finite entries above
    about 1.8e19) replaced by float64 ones: a second pass over the float32 and bfloat16 gradients
    (bfloat16 has float32's range), the price of telling such a gradient from a non-finite one
    without reading anything from the device. Float16 is measured wide enough in float32.
    ``narrow``: the :func:`device_norms` already taken."""
    norms, total, own = narrow if narrow is not None else device_norms(grads, norm_type)
    if not wide or all(g.dtype not in (torch.float32, torch.bfloat16) for g in grads):
        return norms, total, own
    wide_norms, wide_total = _norms_and_total(grads, norm_type, None, torch.float64)  # float64 sums, no copy
    if narrow is not None:
        return wide_norms, wide_total, wide_total
    return (torch.where(torch.isfinite(norms), norms.double(), wide_norms),
            torch.where(torch.isfinite(total), total.double(), wide_total), own)


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
    num = _stack(_foreach_norms(diffs, 2.0, None))
    den = _stack(_foreach_norms(before, 2.0, None))
    return num / (den + eps)

