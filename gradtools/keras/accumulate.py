"""Gradient accumulation for Keras 3, and schedules that count optimizer steps.

The twin of :mod:`gradtools.torch.accumulate`; in Keras it lives inside the
optimizer, ``GradOptimizer(accumulation_steps=k)``, which keeps plain
``model.fit()``. :class:`GradientAccumulator` holds the in-graph state: one
accumulator per variable and a micro-step counter, created as the optimizer's
variables so that ``.keras`` files carry a partial window. Micro-batch
gradients are averaged, and the guard, the clipping and the statistics run
once per window, on the accumulated gradient.

The inner optimizer's ``iterations`` therefore counts optimizer steps, so a
learning-rate schedule (warm-up!) sees the right step, unlike Keras' own
``gradient_accumulation_steps``, whose schedules count micro-batches (see
:func:`accumulation_aware`). ``model.fit()`` does not tell the optimizer the
batch size, so there every micro-batch weighs the same, as in Keras' own
accumulation: a smaller last batch (a dataset size that is not a multiple of the
batch size) counts as much as a full one. A custom loop that passes
``GradOptimizer.apply(grads, variables, batch_size=n)`` weights each micro-batch
by its samples instead, and the window's gradient is then exactly the
mean-loss gradient of the concatenated batch, as in
:class:`gradtools.torch.Accumulator`. A partial window at an epoch's end carries
over into the next epoch unless ``GradOptimizer.flush`` applies it.
"""

from __future__ import annotations

from gradtools import _checks
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["GradientAccumulator", "AccumulationAware", "accumulation_aware"]


class GradientAccumulator:
    """Sum micro-batch gradients in the graph; hand their mean on at each window's end.

    The mean is weighted: each micro-batch by the ``weight`` given to :meth:`add`
    (its number of samples), 1 when none is given.

    Args:
        accumulation_steps (int): micro-batches per optimizer step, >= 1.
    """

    def __init__(self, accumulation_steps: int):
        self.accumulation_steps = _checks.integer("accumulation_steps", accumulation_steps, minimum=1)
        self.sums: list = []
        self.micro_step = None
        self.weight = None  # the window's summed micro-batch weights
        #: Positions, among the built variables, of the gradients of the current window.
        self.index: tuple = ()

    def build(self, optimizer, var_list) -> None:
        """Create the state as ``optimizer``'s variables (saved with it)."""
        self.micro_step = optimizer.add_variable((), initializer=keras.initializers.Zeros(), dtype="int64",
                                                 name="micro_step")
        self.sums = ([optimizer.add_variable_from_reference(v, name="accumulator") for v in var_list]
                     if self.accumulation_steps > 1 else [])
        if self.accumulation_steps > 1:
            self.weight = optimizer.add_variable((), initializer=keras.initializers.Zeros(), dtype="float32",
                                                 name="window_weight")
        self.index = tuple(range(len(var_list)))

    def add(self, grads, apply_window, index=None, weight=None):
        """Add one micro-batch; at the window's end call ``apply_window(mean gradients)``.

        ``index``: the positions of ``grads`` among the variables the state was built
        for (default: all, in order), so that a step may carry a subset of them (a
        frozen layer, a variable without a gradient). ``weight``: this micro-batch's
        weight in the window's mean (its samples), 1 if None. Returns a boolean
        tensor: whether this micro-batch closed a window.
        """
        if self.accumulation_steps == 1:
            apply_window(list(grads))
            return tf.constant(True)
        index = list(range(len(grads))) if index is None else list(index)
        for i, g in zip(index, grads):
            g = tf.cast(tf.convert_to_tensor(g), self.sums[i].dtype)  # IndexedSlices too
            self.sums[i].assign_add(g if weight is None else g * tf.cast(weight, g.dtype))
        self.weight.assign_add(1.0 if weight is None else tf.cast(weight, "float32"))
        self.micro_step.assign_add(1)
        self.index = tuple(index)

        def boundary():
            self._close(apply_window)
            return tf.constant(True)

        return tf.cond(self.micro_step % self.accumulation_steps == 0, boundary, lambda: tf.constant(False))

    def held(self) -> int:
        """Micro-batches in the current, unfinished window (eager)."""
        if self.accumulation_steps == 1 or self.micro_step is None:
            return 0
        return int(self.micro_step.numpy()) % self.accumulation_steps

    def _close(self, apply_window):
        total = tf.convert_to_tensor(self.weight)
        apply_window([tf.convert_to_tensor(self.sums[i]) / tf.cast(total, self.sums[i].dtype) for i in self.index])
        for acc in self.sums:
            acc.assign(tf.zeros_like(acc))
        self.weight.assign(0.0)

    def flush(self, apply_window) -> bool:
        """Close a partial window now (eagerly), with the (weighted) mean over the micro-batches it holds."""
        held = self.held()
        if held == 0:
            return False
        self._close(apply_window)
        self.micro_step.assign_add(self.accumulation_steps - held)
        return True


@keras.saving.register_keras_serializable(package="gradtools")
class AccumulationAware(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule(step // accumulation_steps)``: see :func:`accumulation_aware`."""

    def __init__(self, schedule, accumulation_steps: int):
        if isinstance(schedule, dict):  # from a saved config
            schedule = keras.saving.deserialize_keras_object(schedule)
        if not callable(schedule):
            raise TypeError(f"schedule must be a LearningRateSchedule or callable, got {type(schedule).__name__}")
        self.schedule = schedule
        self.accumulation_steps = _checks.integer("accumulation_steps", accumulation_steps, minimum=1)

    def __call__(self, step):
        return self.schedule(step // self.accumulation_steps)

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule),
                "accumulation_steps": self.accumulation_steps}


def accumulation_aware(schedule, accumulation_steps: int) -> AccumulationAware:
    """Make a schedule count optimizer steps under Keras' own ``gradient_accumulation_steps``.

    Keras evaluates the learning-rate schedule on its micro-batch counter, so a
    schedule with a 100-step warm-up finishes it after 100 / k real updates. This
    wrapper evaluates ``schedule(micro_batches // k)`` instead, the optimizer step;
    it saves and loads with the model. Not needed with ``GradOptimizer``'s own ``accumulation_steps``.

    Example:
        >>> import keras, gradtools.keras as gk
        >>> warm = keras.optimizers.schedules.PolynomialDecay(1.0, decay_steps=10)
        >>> fixed = gk.accumulation_aware(warm, 4)
        >>> round(float(fixed(8)), 3), round(float(warm(2)), 3)
        (0.8, 0.8)
    """
    return AccumulationAware(schedule, accumulation_steps)
