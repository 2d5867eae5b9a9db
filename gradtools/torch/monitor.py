"""Record gradient statistics every ``every`` steps into a plain history.

On a sampled step the monitor runs one :func:`grad_stats` pass and keeps the
resulting tensors; it converts them to Python numbers only when ``history`` is
read. Parameter names are resolved once, at construction. On the other steps it
does nothing but increment a counter. Non-finite counts cost one scalar check
per sampled step (see :mod:`gradtools.torch.norms`); ``count_nonfinite=False``
makes recording entirely free of host syncs.

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

import torch

from gradtools import _checks
from gradtools.torch.norms import _named_parameters, stats_of, snapshot, update_ratios

__all__ = ["Monitor"]


class Monitor:
    """Sample gradient norms, non-finite counts and update-to-weight ratios.

    Args:
        model (torch.nn.Module): the model to watch.
        every (int): record every ``every`` steps, default 1.
        norm_type (float): p of the p-norm, default 2.
        count_nonfinite (bool): record non-finite counts, default True.
        track_updates (bool): also record update-to-weight ratios (copies the
            weights before the step on sampled steps), default False.
    """

    def __init__(self, model, every: int = 1, norm_type: float = 2.0, count_nonfinite: bool = True,
                 track_updates: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.every = _checks.integer("every", every, minimum=1)
        self.norm_type = _checks.norm_type("norm_type", norm_type)
        self.count_nonfinite = bool(count_nonfinite)
        self.track_updates = bool(track_updates)
        self.step = 0
        self._records: list = []
        self._ratios: list = []
        self._before = None
        self._names = None
        self._params = _named_parameters(model, "model")  # resolved once

    def record(self) -> bool:
        """Call after ``backward()`` and before ``optimizer.step()``. Returns True if sampled."""
        self.step += 1
        if (self.step - 1) % self.every:
            return False
        kept = [(n, p.grad) for n, p in self._params if p.grad is not None]
        if not kept:
            raise ValueError("model has no gradients to record: call loss.backward() before Monitor.record()")
        stats = stats_of([n for n, _ in kept], [g for _, g in kept], self.norm_type, self.count_nonfinite)
        self._names = stats.names
        self._records.append((self.step, stats.total, stats.norms, stats.nonfinite))
        if self.track_updates:
            self._before = snapshot(self.model)
        return True

    def after_step(self) -> None:
        """Call after ``optimizer.step()`` (needed only with ``track_updates``)."""
        if self._before is not None:
            self._ratios.append((self.step, update_ratios(self.model, self._before)))
            self._before = None

    @property
    def history(self) -> dict:
        """Plain lists: ``step``, ``total_norm``, ``norms`` / ``nonfinite`` / ``update_ratio`` by name."""
        names = self._names or []
        out = {"step": [], "total_norm": [], "norms": {n: [] for n in names}}
        if self.count_nonfinite:
            out["nonfinite"] = {n: [] for n in names}
        for step, total, norms, nonfinite in self._records:
            out["step"].append(step)
            out["total_norm"].append(float(total))
            for n, v in zip(names, norms.tolist()):
                out["norms"][n].append(v)
            if nonfinite is not None:
                for n, v in zip(names, nonfinite.tolist()):
                    out["nonfinite"][n].append(int(v))
        if self.track_updates:
            param_names = [n for n, _ in self.model.named_parameters()]
            out["update_step"] = [s for s, _ in self._ratios]
            out["update_ratio"] = {n: [] for n in param_names}
            for _, ratios in self._ratios:
                for n, v in zip(param_names, ratios.tolist()):
                    out["update_ratio"][n].append(v)
        return out
