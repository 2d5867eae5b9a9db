"""Train a language model with the field guide's remedies and record what goes wrong, in Keras.

The twin of :mod:`gradtools.torch.diagnose`: :func:`train_lm` records a
:class:`gradtools.diagnose.RunTrace` with the same fields and groups, and
:class:`Rollback` is PaLM's restart-and-skip for a custom Keras loop. A
warm-up is the optimizer's own ``learning_rate`` schedule (for example
:class:`gradtools.keras.Warmup`), as Keras schedules go.
"""

from __future__ import annotations

import numpy as np

from gradtools.diagnose import RollbackBase, RunTrace, check_train_lm
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

from gradtools.keras.clip import Clipper  # noqa: E402
from gradtools.keras.guard import GradGuard  # noqa: E402
from gradtools.keras.transformer import CausalSelfAttention  # noqa: E402
from gradtools.keras.transformer import z_loss as _z_loss  # noqa: E402

__all__ = ["AttentionLogits", "Rollback", "train_lm"]

_SINKS = "_gradtools_max_logit_sinks"  # on a wrapped MultiHeadAttention: the variables its max logit goes to


def _mha_max_logit(layer, query, key, attention_mask, use_causal_mask):
    """The largest pre-softmax logit of one ``keras.layers.MultiHeadAttention`` call, from its
    projected query (B, T, N, d) and key (B, S, N, d), with the masks the layer applies."""
    logits = tf.einsum("btnh,bsnh->bnts", query, key) * tf.cast(layer._inverse_sqrt_key_dim, query.dtype)
    allowed = None
    if attention_mask is not None:
        allowed = tf.cast(attention_mask, tf.bool)[:, None]  # (B, 1, T, S)
    if use_causal_mask:
        length, source = tf.shape(logits)[-2], tf.shape(logits)[-1]
        causal = tf.linalg.band_part(tf.ones((length, source), tf.bool), -1, 0)
        allowed = causal if allowed is None else tf.logical_and(allowed, causal)
    if allowed is not None:
        logits = tf.where(allowed, logits, tf.cast(float("-inf"), logits.dtype))
    return tf.cast(tf.reduce_max(logits), tf.float32)


class AttentionLogits:
    """Track the largest pre-softmax attention logit of every attention layer of a Keras model.

    The twin of ``gradtools.torch.AttentionLogits``. It finds
    :class:`gradtools.keras.CausalSelfAttention` layers (which record their own
    ``max_logit``) and ``keras.layers.MultiHeadAttention`` layers, whose
    ``_compute_attention`` (the method Keras documents as the place to
    customise attention) it wraps to record the maximum of the scaled query-key
    products, with the layer's attention and causal masks. Create the tracker
    before the model's training step is first traced (a traced ``fit()`` or
    ``tf.function`` keeps the unwrapped call); :meth:`remove` unwraps. Several
    trackers on one layer share one wrapper. Works eagerly, in ``tf.function``
    and inside ``fit()``; a layer not yet called reads 0. Attention over more
    than one axis (``attention_axes`` of length 2 or more) is refused.

    Args:
        model (keras.Model or keras.layers.Layer): any model holding such layers.

    Example:
        >>> import numpy as np, keras
        >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        >>> h = np.random.default_rng(0).standard_normal((3, 5, 8)).astype("float32")
        >>> _ = mha(h, h)
        >>> tracker = AttentionLogits(mha)
        >>> _ = mha(h, h, use_causal_mask=True)
        >>> tracker.values().shape
        TensorShape([1])
    """

    def __init__(self, model):
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"model must be a keras.Model or layer, got {type(model).__name__}")
        found = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
                 if isinstance(layer, (CausalSelfAttention, keras.layers.MultiHeadAttention))]
        for layer in found:  # every layer checked before any is wrapped
            axes = getattr(layer, "_attention_axes", None)
            if isinstance(layer, keras.layers.MultiHeadAttention) and axes is not None and len(axes) != 1:
                raise ValueError(f"{layer.name}: AttentionLogits supports MultiHeadAttention over one attention "
                                 f"axis (inputs (batch, length, features)), not attention_axes={tuple(axes)}")
        self.names, self._values, self._wrapped = [], [], []
        for layer in found:
            if isinstance(layer, CausalSelfAttention):
                self._values.append(layer)
            else:
                self._values.append(tf.Variable(0.0, trainable=False, name="max_logit"))
                self._wrap(layer, self._values[-1])
            self.names.append(layer.path or layer.name)

    def _wrap(self, layer, variable):
        sinks = layer.__dict__.get(_SINKS)
        if sinks is None:  # one wrapper per layer, shared by every tracker on it
            sinks = []
            original = layer._compute_attention

            def compute_attention(query, key, value, attention_mask=None, training=None,
                                  return_attention_scores=False, use_causal_mask=False):
                if len(query.shape) != 4:
                    raise ValueError(f"{layer.name}: AttentionLogits supports MultiHeadAttention over one attention "
                                     f"axis (inputs (batch, length, features)); the projected query has shape "
                                     f"{tuple(query.shape)}")
                if sinks:
                    top = _mha_max_logit(layer, query, key, attention_mask, use_causal_mask)
                    for sink in list(sinks):
                        sink.assign(top)
                return original(query, key, value, attention_mask=attention_mask, training=training,
                                return_attention_scores=return_attention_scores, use_causal_mask=use_causal_mask)

            object.__setattr__(layer, "_compute_attention", compute_attention)
            object.__setattr__(layer, _SINKS, sinks)
        sinks.append(variable)
        self._wrapped.append((layer, variable))

    def values(self):
        """Each layer's largest logit in its last call, a 1-d tensor in the order of ``names``."""
        if not self._values:
            return tf.zeros([0])
        return tf.stack([tf.convert_to_tensor(v.max_logit.value if isinstance(v, CausalSelfAttention) else v)
                         for v in self._values])

    def remove(self) -> None:
        """Stop recording; a layer no other tracker records gets its own ``_compute_attention`` back."""
        for layer, variable in self._wrapped:
            sinks = layer.__dict__.get(_SINKS)
            if sinks is None:
                continue
            sinks[:] = [s for s in sinks if s is not variable]
            if not sinks:
                object.__delattr__(layer, "_compute_attention")
                object.__delattr__(layer, _SINKS)
        self._wrapped = []


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
        guard (gradtools.keras.GradGuard or None): a guard on ``optimizer`` that
            skips non-finite and spiking steps.
        rollback (gradtools.keras.Rollback or None): rolls back on a spike of the
            loss or the norm.
        spike_at (int or None): the batch whose gradient is multiplied by ``spike_factor``.

    Returns:
        :class:`gradtools.diagnose.RunTrace`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    _check_optimizer(optimizer)
    x, y, z_loss, spike_at, spike_factor = check_train_lm(
        model, optimizer, x, y, z_loss=z_loss, clip=clip, guard=guard, guard_type=GradGuard, rollback=rollback,
        rollback_type=Rollback, spike_at=spike_at, spike_factor=spike_factor)
    clipper = None if clip is None else Clipper(clip)
    groups = _groups(model)
    variables = [v for vs in groups.values() for v in vs]
    segments = tf.constant([g for g, vs in enumerate(groups.values()) for _ in vs])
    tracker = AttentionLogits(model)
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
        attention = tracker.values()
        return loss, grads, tf.stack([tf.norm(g) for g in grads]), attention

    @tf.function(jit_compile=False)
    def apply(grads):
        optimizer.apply(grads, variables)

    @tf.function(jit_compile=False)
    def ratios(before):
        moved = tf.stack([tf.norm(v - b) for v, b in zip(variables, before)])
        return by_group(moved) / by_group(tf.stack([tf.norm(b) for b in before]))

    rows = []
    try:
        for i in (range(len(x)) if rollback is None else rollback.batches(len(x))):
            factor = tf.constant(spike_factor if i == spike_at else 1.0)
            loss, grads, norms, attention = gradients(tf.constant(x[i]), tf.constant(y[i]), factor)
            total = tf.norm(norms)
            lr = tf.identity(optimizer.learning_rate)  # read with the rest after the run: no host sync per step
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
    finally:
        tracker.remove()
    losses, totals, norms, ratios_, attention, lrs, skipped = zip(*rows)
    norms, ratios_ = np.stack([n.numpy() for n in norms]), np.stack([r.numpy() for r in ratios_])
    names = list(groups)
    return RunTrace(
        losses=np.array([float(v) for v in losses]), grad_norms=np.array([float(v) for v in totals]),
        group_norms={n: norms[:, j] for j, n in enumerate(names)},
        update_ratios={n: ratios_[:, j] for j, n in enumerate(names)},
        attention_logits=np.stack([a.numpy() for a in attention]).reshape(len(rows), -1),
        lrs=np.array([float(v) for v in lrs], dtype=np.float64), skipped=np.array(skipped, dtype=bool),
        rollbacks=[] if rollback is None else list(rollback.rollbacks))
