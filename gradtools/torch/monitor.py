"""Sample gradient statistics once per ``every`` steps into a plain history.

On a sampled step the monitor runs one :func:`grad_stats` pass and keeps the
resulting tensors; it converts them to Python numbers only when ``history`` is
read. Parameter names are resolved once, at construction. On the other steps it
does nothing but increment a counter. Non-finite counts cost one scalar check
per sampled step (see :mod:`gradtools.torch.norms`); ``count_nonfinite=False``
makes recording entirely free of host syncs.

Where to record: after ``backward()`` and before the gradients are clipped or
stepped. Simplest is to hand the monitor to the guard or the accumulator
(``GradGuard(..., monitor=m)``, ``Accumulator(..., monitor=m)``), which record at
the right moment: after unscaling under a ``GradScaler``, on the window-mean
gradient under accumulation. By hand under a scaler, follow PyTorch's recipe:
``scaler.unscale_(opt); monitor.record(); guard.step()`` (before unscaling, the
monitor would record the norms of the scaled loss).

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> mon = Monitor(m, every=1)
    >>> for _ in range(3):
    ...     opt.zero_grad(); m(torch.ones(1, 2)).sum().backward()
    ...     _ = mon.record(); opt.step(); mon.after_step()
    >>> len(mon.history["step"])
    3
"""

from __future__ import annotations

import math

from gradtools import _checks
from gradtools.torch import _checks as _tchecks
from gradtools.torch.norms import _named_parameters, stats_of, snapshot, update_ratios

__all__ = ["Monitor"]


class Monitor:
    """Sample gradient norms, non-finite counts and update-to-weight ratios.

    Args:
        model (torch.nn.Module): the model to watch.
        every (int): sampling period in steps (1: every step), default 1.
        norm_type (float): p of the p-norm, default 2.
        count_nonfinite (bool): record non-finite counts, default True.
        track_updates (bool): also record update-to-weight ratios (copies the
            weights before the step on sampled steps), default False.
    """

    def __init__(self, model, every: int = 1, norm_type: float = 2.0, count_nonfinite: bool = True,
                 track_updates: bool = False):
        _tchecks.module("model", model)
        self.model = model
        self.every = _checks.integer("every", every, minimum=1)
        self.norm_type = _checks.norm_type("norm_type", norm_type)
        self.count_nonfinite = bool(count_nonfinite)
        self.track_updates = bool(track_updates)
        self.step = 0
        self._records: list = []
        self._ratios: list = []
        self._before = None
        self._params = _named_parameters(model, "model")  # resolved once

    def record(self, stats=None) -> bool:
        """Call after ``backward()`` and before ``optimizer.step()``. Returns True if sampled.

        ``stats``: statistics of these very gradients measured already (the guard passes its
        own), used when they name the same parameters, so that the norms are taken once."""
        self.step += 1
        if (self.step - 1) % self.every:
            return False
        kept = [(n, p.grad) for n, p in self._params if p.grad is not None]
        if not kept:
            raise ValueError("model has no gradients to record: call loss.backward() before Monitor.record()")
        names = tuple(n for n, _ in kept)  # which parameters had a gradient this step
        if stats is None or tuple(stats.names) != names or stats.norm_type != self.norm_type:
            stats = stats_of(list(names), [g for _, g in kept], self.norm_type, self.count_nonfinite)
        self._records.append((self.step, names, stats.total, stats.norms,
                              stats.nonfinite if self.count_nonfinite else None))
        if self.track_updates:
            self._before = (tuple(n for n, _ in self._params), snapshot([p for _, p in self._params]))
        return True

    def after_step(self) -> None:
        """Call after ``optimizer.step()`` (needed only with ``track_updates``)."""
        if self._before is not None:
            names, before = self._before
            self._ratios.append((self.step, names, update_ratios([p for _, p in self._params], before)))
            self._before = None

    @staticmethod
    def _by_name(records, convert, missing) -> dict:
        """``{name: [value per record]}``, ``missing`` where a record lacks the name.

        Each record carries its own names: a parameter without a gradient on some
        steps (a frozen layer) gets ``missing`` there, never another's value.
        """
        order = {}
        for _, names, values in records:
            order.update(dict.fromkeys(names))
        out = {n: [] for n in order}
        for _, names, values in records:
            row = dict(zip(names, values.tolist()))
            for n in out:
                out[n].append(convert(row[n]) if n in row else missing)
        return out

    @property
    def history(self) -> dict:
        """Plain lists, one entry per sampled step.

        ``step`` and ``total_norm``; ``norms`` and ``nonfinite`` keyed by parameter name;
        with ``track_updates``, ``update_step`` and ``update_ratio`` by name. A parameter
        that had no gradient on some sampled steps (frozen, unused) shows ``nan`` there in
        ``norms`` and ``None`` in ``nonfinite``; one that never had a gradient on a
        sampled step has no key.
        """
        recs = self._records
        out = {"step": [r[0] for r in recs], "total_norm": [float(r[2]) for r in recs],
               "norms": self._by_name([(s, n, v) for s, n, _, v, _ in recs], float, math.nan)}
        if self.count_nonfinite:
            out["nonfinite"] = self._by_name([(s, n, c) for s, n, _, _, c in recs], int, None)
        if self.track_updates:
            out["update_step"] = [s for s, _, _ in self._ratios]
            out["update_ratio"] = self._by_name(self._ratios, float, math.nan)
        return out
