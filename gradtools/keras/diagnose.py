"""Train a language model with the field guide's remedies and record what goes wrong, in Keras.

The twin of :mod:`gradtools.torch.diagnose`: :func:`train_lm` records a
:class:`gradtools.diagnose.RunTrace` with the same fields and groups, and
:class:`Rollback` is PaLM's restart-and-skip for a custom Keras loop. A
warm-up is the optimizer's own ``learning_rate`` schedule (for example
:class:`gradtools.keras.Warmup`), as Keras schedules go.
"""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.diagnose import RollbackBase, RunTrace, check_batches
from gradtools.optim import check_run
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

from gradtools.keras.clip import Clipper  # noqa: E402
from gradtools.keras.guard import GradGuard  # noqa: E402
from gradtools.keras.transformer import z_loss as _z_loss  # noqa: E402

__all__ = ["Rollback", "train_lm"]


def _check_optimizer(optimizer):
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"optimizer must be a keras.optimizers.Optimizer, got {type(optimizer).__name__}")


class Rollback(RollbackBase):
    """Roll a Keras ``model`` and ``optimizer`` back to a checkpoint on a loss spike.

    The twin of ``gradtools.torch.Rollback`` (the logic is
    :class:`gradtools.diagnose.RollbackBase`'s). A checkpoint holds copies of all
    the model's variables and the optimizer's (its step count too, so a
    ``learning_rate`` schedule goes back with the step).

    Args:
        model (keras.Model), optimizer (keras.optimizers.Optimizer): restored together.
        every (int): accepted steps between checkpoints, default 25.
        skip_batches (int): batches skipped from the spike on, default 10.
        spike (SpikeDetector or None): default ``SpikeDetector(window=50, z_thresh=6)``.
        max_rollbacks (int): more raise ``TooManySkipsError``, default 5.
    """

    def __init__(self, model, optimizer, every: int = 25, skip_batches: int = 10, spike=None,
                 max_rollbacks: int = 5):
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
        _check_optimizer(optimizer)
        super().__init__(every=every, skip_batches=skip_batches, spike=spike, max_rollbacks=max_rollbacks)
        self.model, self.optimizer = model, optimizer

    def _variables(self) -> list:
        return [*self.model.variables, *self.optimizer.variables]

    def _save(self):
        if not self.optimizer.built:
            self.optimizer.build(self.model.trainable_variables)
        return [np.array(v.numpy(), copy=True) for v in self._variables()]

    def _restore(self, saved) -> None:
        for variable, value in zip(self._variables(), saved):
            variable.assign(value)


def _groups(model) -> dict:
    """``{group: [variables]}``: the model's own ``groups()`` or one group per trainable variable."""
    if callable(getattr(model, "groups", None)):
        groups = {name: [v for v in vs if v.trainable] for name, vs in model.groups().items()}
    else:
        groups = {v.path: [v] for v in model.trainable_variables}
    return {name: vs for name, vs in groups.items() if vs}


def train_lm(model, optimizer, x, y, clip=None, z_loss: float = 0.0, guard=None, rollback=None,
             spike_at: int | None = None, spike_factor: float = 1000.0) -> RunTrace:
    """Next-token training on pre-drawn batches, recording the field guide's diagnostics.

    The twin of ``gradtools.torch.train_lm`` (same arguments but ``scheduler``:
    give the optimizer a ``learning_rate`` schedule instead). The gradients are
    computed in a ``tf.function``; the remedies that decide on the host (a
    clipping policy, the guard, the rollback) then act eagerly.

    Args:
        model (keras.Model): maps token ids (batch, length) to logits (batch, length, vocab).
        optimizer (keras.optimizers.Optimizer): a fresh one per run.
        x, y: int arrays (steps, batch, length), e.g. from :func:`gradtools.data.lm_batches`.
        clip: a global-norm clipping policy for a :class:`gradtools.keras.Clipper`.
        z_loss (float): weight of :func:`gradtools.keras.z_loss`, default 0.
        guard (GradGuard or None): a ``gradtools.keras.GradGuard`` on ``optimizer``
            that skips non-finite and spiking steps.
        rollback (Rollback or None): rolls back on a spike of the loss or the norm.
        spike_at (int or None): the batch whose gradient is multiplied by ``spike_factor``.

    Returns:
        :class:`gradtools.diagnose.RunTrace`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    _check_optimizer(optimizer)
    z_loss = _checks.non_negative("z_loss", z_loss)
    if guard is not None and not isinstance(guard, GradGuard):
        raise TypeError(f"guard must be a gradtools.keras.GradGuard or None, got {type(guard).__name__}")
    if guard is not None and (clip is not None or guard.optimizer is not optimizer):
        raise ValueError("guard must step this optimizer (GradGuard(optimizer, ...)) and hold any clipping "
                         f"policy itself (GradGuard(clipper=...)); got clip={clip!r}")
    if rollback is not None and not isinstance(rollback, Rollback):
        raise TypeError(f"rollback must be a gradtools.keras.Rollback or None, got {type(rollback).__name__}")
    x, y = check_batches(x, y)
    _, spike_at, spike_factor = check_run(len(x), spike_at, spike_factor)
    clipper = None if clip is None else Clipper(clip)
    groups = _groups(model)
    variables = [v for vs in groups.values() for v in vs]
    segments = tf.constant([g for g, vs in enumerate(groups.values()) for _ in vs])
    has_attention = callable(getattr(model, "attention_logits", None))
    if not optimizer.built:
        optimizer.build(variables)

    def by_group(norms):
        return tf.sqrt(tf.math.unsorted_segment_sum(tf.square(norms), segments, len(groups)))

    @tf.function(jit_compile=False)
    def gradients(xb, yb, factor):
        with tf.GradientTape() as tape:
            logits = model(xb, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True))
            total = loss + z_loss * _z_loss(logits) if z_loss else loss
        grads = [tf.zeros_like(v) if g is None else g * factor
                 for v, g in zip(variables, tape.gradient(total, variables))]
        attention = model.attention_logits() if has_attention else tf.zeros([0])
        return loss, grads, tf.stack([tf.norm(g) for g in grads]), attention

    @tf.function(jit_compile=False)
    def apply(grads):
        optimizer.apply(grads, variables)

    @tf.function(jit_compile=False)
    def ratios(before):
        moved = tf.stack([tf.norm(v - b) for v, b in zip(variables, before)])
        return by_group(moved) / by_group(tf.stack([tf.norm(b) for b in before]))

    rows = []
    for i in (range(len(x)) if rollback is None else rollback.batches(len(x))):
        factor = tf.constant(spike_factor if i == spike_at else 1.0)
        loss, grads, norms, attention = gradients(tf.constant(x[i]), tf.constant(y[i]), factor)
        total = tf.norm(norms)
        lr = float(optimizer.learning_rate)
        before = [tf.identity(v) for v in variables]
        if rollback is not None and not rollback.check(loss, total):
            stepped = False
        elif guard is not None:
            stepped = bool(guard.apply(grads, variables))
        else:
            if clipper is not None:
                grads = clipper(grads)[0]
            apply(grads)
            stepped = True
        ratio = ratios(before)
        rows.append((loss, total, by_group(norms), ratio if stepped else tf.zeros_like(ratio), attention, lr,
                     not stepped))
    losses, totals, norms, ratios_, attention, lrs, skipped = zip(*rows)
    norms, ratios_ = np.stack([n.numpy() for n in norms]), np.stack([r.numpy() for r in ratios_])
    names = list(groups)
    return RunTrace(
        losses=np.array([float(v) for v in losses]), grad_norms=np.array([float(v) for v in totals]),
        group_norms={n: norms[:, j] for j, n in enumerate(names)},
        update_ratios={n: ratios_[:, j] for j, n in enumerate(names)},
        attention_logits=np.stack([a.numpy() for a in attention]).reshape(len(rows), -1),
        lrs=np.array(lrs, dtype=np.float64), skipped=np.array(skipped, dtype=bool),
        rollbacks=[] if rollback is None else list(rollback.rollbacks))
