"""Diagnosing a training run, framework-free: the record of a run, spike flags, rollback decisions.

:class:`RunTrace` is what ``gradtools.torch.train_lm`` and
``gradtools.keras.train_lm`` return: per step the loss, the global gradient
norm, the gradient norm and the update-to-weight ratio of each group of
parameters, and the largest attention logit of each layer. :func:`spike_flags`
runs a :class:`~gradtools.policies.SpikeDetector` over a finished history.
:class:`RollbackBase` holds the logic of rolling back to a checkpoint and
skipping the batches around a loss spike (PaLM, Chowdhery et al. 2022, section
5.1); the backends' ``Rollback`` save and restore the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gradtools import _checks
from gradtools.guard import TooManySkipsError
from gradtools.optim import check_run
from gradtools.policies import SpikeDetector

__all__ = ["RunTrace", "RollbackBase", "spike_flags", "unigram_entropy"]


def check_batches(x, y):
    """``(x, y)`` as NumPy arrays, checked: pre-drawn batches of token ids, (steps, batch, length) each."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 3 or x.shape != y.shape or not (np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"x and y must be integer arrays of one shape (steps, batch, length), got {x.dtype} "
                         f"{x.shape} and {y.dtype} {y.shape}")
    return x, y


def check_train_lm(model, optimizer, x, y, *, z_loss, clip, guard, guard_type, rollback, rollback_type,
                   spike_at, spike_factor, scheduler=None):
    """The remedy arguments of the backends' ``train_lm``, checked before any step.

    ``guard_type`` and ``rollback_type`` are the backend's ``GradGuard`` and
    ``Rollback``; a guard must step ``optimizer`` and hold any clipping policy
    itself, and a rollback must restore this run's model, optimizer and
    scheduler. Returns ``(x, y, z_loss, spike_at, spike_factor)``.
    """
    z_loss = _checks.non_negative("z_loss", z_loss)
    if guard is not None:
        if not isinstance(guard, guard_type):
            raise TypeError(f"guard must be a {guard_type.__module__.rsplit('.', 1)[0]}.GradGuard or None, "
                            f"got {type(guard).__name__}")
        if guard.optimizer is not optimizer:
            raise ValueError("guard must step this optimizer: build it on the optimizer passed to train_lm")
        if clip is not None:
            raise ValueError(f"give the clipping policy to the guard (GradGuard(clipper=...)), not clip={clip!r}")
    if rollback is not None:
        if not isinstance(rollback, rollback_type):
            raise TypeError(f"rollback must be a {rollback_type.__module__.rsplit('.', 1)[0]}.Rollback or None, "
                            f"got {type(rollback).__name__}")
        if (rollback.model is not model or rollback.optimizer is not optimizer
                or getattr(rollback, "scheduler", None) is not scheduler):
            raise ValueError("rollback must restore this run's model, optimizer and scheduler: build it on the "
                             "objects passed to train_lm")
    x, y = check_batches(x, y)
    _, spike_at, spike_factor = check_spike(len(x), spike_at, spike_factor)
    return x, y, z_loss, spike_at, spike_factor


def check_spike(steps: int, spike_at, spike_factor):
    """``(steps, spike_at, spike_factor)`` of ``train_lm``, checked: the spiked batch must be one of the ``steps``."""
    steps, spike_at, spike_factor = check_run(steps, spike_at, spike_factor)
    if spike_at is not None and spike_at >= steps:
        raise ValueError(f"spike_at must be the index of one of the {steps} batches, got {spike_at}")
    return steps, spike_at, spike_factor


def spike_flags(values, window: int = 50, z_thresh: float = 6.0, min_history: int = 10,
                min_ratio: float = 1.5) -> np.ndarray:
    """Which entries of a history a :class:`~gradtools.policies.SpikeDetector` flags, as a bool array.

    The detector sees the values in order, as it would during training: a
    spike is more than ``z_thresh`` standard deviations above the mean of the
    last ``window`` accepted values and at least ``min_ratio`` times that mean;
    non-finite values are always spikes and flagged values do not enter the
    window.

    Example:
        >>> history = [1.0, 1.1, 0.9, 1.0, 50.0, 1.0]
        >>> spike_flags(history, window=4, min_history=3).tolist()
        [False, False, False, False, True, False]
    """
    detector = SpikeDetector(window=window, z_thresh=z_thresh, min_history=min_history, min_ratio=min_ratio)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be a 1-d history, got shape {values.shape}")
    return np.array([detector.step(float(v)) for v in values], dtype=bool)


def unigram_entropy(ids) -> float:
    """The entropy (nats per token) of the token frequencies in ``ids``.

    The cross-entropy a language model reaches by predicting every token from
    its frequency alone, ignoring the context: a model whose loss stays at or
    above it has learned nothing from the text's order.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a non-empty 1-d array of integer token ids, got shape {ids.shape}")
    p = np.unique(ids, return_counts=True)[1] / ids.size
    return float(-(p * np.log(p)).sum())


@dataclass
class RunTrace:
    """One training run, step by step (NumPy arrays, index = step).

    ``losses``: the loss of each step's batch (before its update; the z-loss
    term excluded); ``grad_norms``: the global gradient norm; ``group_norms`` and
    ``update_ratios``: ``{group: array}``, each group's gradient norm and
    ``||w_after - w_before|| / ||w_before||`` (0 on a skipped step);
    ``attention_logits``: (steps, layers), each layer's largest attention logit
    (empty without attention layers); ``lrs``: the rate each step used;
    ``skipped``: steps whose update was not applied; ``rollbacks``: ``(step,
    restored_step)`` pairs, the step whose loss spiked and the checkpoint's
    step. With a rollback the rows are wall-clock steps: the steps after a
    rollback repeat the restored step numbers on new batches.
    """

    losses: np.ndarray
    grad_norms: np.ndarray
    group_norms: dict
    update_ratios: dict
    attention_logits: np.ndarray
    lrs: np.ndarray
    skipped: np.ndarray
    rollbacks: list = field(default_factory=list)

    def final_loss(self, last: int = 10) -> float:
        """Mean loss of the ``last`` steps (inf if any of them is not finite)."""
        last = _checks.integer("last", last, minimum=1)
        tail = self.losses[-last:]
        return float(tail.mean()) if np.all(np.isfinite(tail)) else math.inf

    def failed(self, reference: float, last: int = 10) -> bool:
        """Whether the run ended no better than ``reference`` (for example :func:`unigram_entropy`)."""
        return not self.final_loss(last) < reference

    def blew_up_at(self, factor: float = 1.5) -> int | None:
        """First step whose loss is not finite or above ``factor`` times the first loss, or None."""
        factor = _checks.positive("factor", factor)
        bad = np.flatnonzero(~(self.losses <= factor * self.losses[0]))
        return int(bad[0]) if bad.size else None

    def first_group(self, factor: float = 10.0) -> str | None:
        """The group whose gradient norm first grows ``factor`` times above its value at step 0, or None.

        Ties (several groups crossing at the same step) go to the group with
        the largest growth at that step.
        """
        factor = _checks.positive("factor", factor)
        best = None
        for name, norms in self.group_norms.items():
            grown = np.flatnonzero(~(norms <= factor * norms[0]))
            if grown.size:
                step = int(grown[0])
                growth = norms[step] / norms[0] if np.isfinite(norms[step]) else math.inf
                if best is None or (step, -growth) < (best[0], -best[1]):
                    best = (step, growth, name)
        return None if best is None else best[2]

    def spikes(self, **detector) -> np.ndarray:
        """:func:`spike_flags` of the global gradient norm (keyword arguments go to the detector)."""
        return spike_flags(self.grad_norms, **detector)


class RollbackBase:
    """Roll back to a checkpoint and skip the batches of a loss spike, as PaLM did.

    Chowdhery et al. (2022, section 5.1) saw about 20 loss spikes while
    training PaLM 540B, at irregular steps, even with gradient clipping. What
    worked was to restart from a checkpoint about 100 steps before the spike
    and skip the 200 to 500 batches seen around it: the spikes came from a
    particular combination of batches and model state, not from bad data alone.

    A checkpoint is taken before every ``every``-th accepted step. :meth:`check`
    reads each step's loss (and, if given, its global gradient norm) before the
    update; a non-finite value or a spike (``spike``, a
    :class:`~gradtools.policies.SpikeDetector` over their histories) restores the last checkpoint, weights, optimizer and the detector's own
    history, and moves the data on by ``skip_batches``: the batches between the
    checkpoint and the spike are undone, and the spike's batch and the
    ``skip_batches - 1`` after it are never seen. More than ``max_rollbacks``
    rollbacks raise :class:`~gradtools.guard.TooManySkipsError`.

    Backends provide ``_save()`` (a copy of the training state) and
    ``_restore(copy)``.
    """

    def __init__(self, every: int = 25, skip_batches: int = 10, spike: SpikeDetector | None = None,
                 max_rollbacks: int = 5):
        self.every = _checks.integer("every", every, minimum=1)
        self.skip_batches = _checks.integer("skip_batches", skip_batches, minimum=1)
        if spike is not None and not isinstance(spike, SpikeDetector):
            raise TypeError(f"spike must be a gradtools.policies.SpikeDetector or None, got {type(spike).__name__}")
        self.spike = SpikeDetector(window=50, z_thresh=6.0) if spike is None else spike
        self.max_rollbacks = _checks.integer("max_rollbacks", max_rollbacks, minimum=0)
        self.step = 0  # accepted steps since the start, rewound by a rollback
        self.rollbacks: list = []  # (step of the spike, step restored)
        self._checkpoint = None  # (step, saved state, detector state)
        self._next = 0  # the next batch index batches() yields

    def _save(self):  # pragma: no cover - provided by the backends
        raise NotImplementedError

    def _restore(self, saved) -> None:  # pragma: no cover
        raise NotImplementedError

    def batches(self, n: int):
        """Yield the batch indices ``0 .. n - 1`` in order, jumping ahead after each rollback."""
        n = _checks.integer("n", n, minimum=0)
        self._next = 0
        while self._next < n:
            index = self._next
            self._next += 1
            yield index

    def check(self, loss, grad_norm=None) -> bool:
        """Read this step's loss (and global gradient norm) before the update: True to step, False after a rollback.

        On True, a checkpoint of the state before the step may have been taken;
        the caller steps the optimizer. On False the state has been restored and
        the caller must not step (drop the gradients). With ``grad_norm`` a
        spike of either value rolls back (the detector keeps both histories);
        give it on every call or on none.
        """
        value = float(loss)
        due = self.step % self.every == 0
        history = self.spike.state_dict() if due else None  # the detector as it was before this step
        spiked = self.spike.step(value) if grad_norm is None else self.spike.step(float(grad_norm), value)
        if spiked:
            if self._checkpoint is None:  # a non-finite first loss: nothing to go back to
                return False
            if len(self.rollbacks) >= self.max_rollbacks:
                raise TooManySkipsError(f"loss spiked at step {self.step} (loss {value:.4g}) after "
                                        f"{len(self.rollbacks)} rollbacks (max_rollbacks={self.max_rollbacks})")
            step, saved, detector = self._checkpoint
            self.rollbacks.append((self.step, step))
            self._restore(saved)
            self.spike.load_state_dict(detector)
            self.step = step
            self._next += self.skip_batches - 1
            return False
        if due:
            self._checkpoint = (self.step, self._save(), history)
        self.step += 1
        return True
