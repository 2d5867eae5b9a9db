"""Recording gradient statistics in Keras 3: the twin of :mod:`gradtools.torch.monitor`.

``GradOptimizer`` measures the statistics in the train step; this module gets
them out, into ``fit()``'s logs and into a per-step history.

:class:`GradientLogger` adds the ``GradOptimizer``'s statistics to the logs that
the train function returns, read after each step, so they arrive in the batch
logs with the loss; ``evaluate()``, validation and the train step itself stay
exactly as Keras makes them, whatever the model (Sequential, functional,
subclassed, a custom ``train_step``). For the per-step history, the optimizer
writes one row per step into a buffer inside the graph, read once per epoch: no
per-batch hook, so ``fit()`` keeps dispatching callbacks asynchronously and
nothing waits on the host between steps.
"""

from __future__ import annotations

import warnings

import numpy as np

from gradtools import _checks
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["GradientLogger", "Recorder", "GLOBAL_KEYS"]

# The global statistics, in the order of fit()'s logs and of the recording buffer's first columns.
GLOBAL_KEYS = ("grad_norm", "grad_norm_clipped", "grad_norm_mean", "grad_norm_clipped_mean", "clip_threshold",
               "skipped_steps", "nonfinite")


class Recorder:
    """A ring buffer of per-step rows inside the graph: written by the train step, read at once.

    One row per optimizer step (the global statistics, then optionally one column per
    variable), so recording needs no per-batch host transfer. Plain ``tf.Variable``s,
    outside the optimizer's variables, so never written into ``.keras`` files.
    """

    def __init__(self, capacity: int, names: list):
        self.capacity = _checks.integer("capacity", capacity, minimum=1)
        self.names = list(names)
        self.buffer = tf.Variable(tf.zeros((self.capacity, len(self.names))), trainable=False, name="gradtools_record")
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="gradtools_record_count")

    def write(self, row) -> None:
        """Append one row (a 1-d float32 tensor), in the graph."""
        index = self.count % self.capacity
        self.buffer.scatter_nd_update(tf.reshape(index, (1, 1)), tf.expand_dims(row, 0))
        self.count.assign_add(1)

    def read(self) -> tuple[dict, int]:
        """The rows written since the last read, oldest first, ``{name: [floats]}``; and how many were lost."""
        count = int(self.count.numpy())
        rows = self.buffer.numpy()
        if count > self.capacity:
            start = count % self.capacity
            rows = np.concatenate([rows[start:], rows[:start]])
        else:
            rows = rows[:count]
        self.count.assign(0)
        return {name: rows[:, j].tolist() for j, name in enumerate(self.names)}, max(count - self.capacity, 0)


class _WithStatistics:
    """A model's train function with the optimizer's statistics added to the logs it returns.

    Installed by :class:`GradientLogger` for one ``fit()``: the step itself, and
    ``evaluate()`` and validation, stay exactly as Keras made them. The statistics are
    read after the step, from the optimizer's variables, without waiting on the device.
    Keras calls no ``on_train_end`` when an exception ends a ``fit()``, so the wrapper
    adds statistics only to calls announced by the logger's ``on_train_batch_begin``;
    any other call (a later ``fit()`` without the logger, ``train_on_batch``) removes it.
    """

    def __init__(self, function, logger):
        self.function = function
        self.logger = logger

    def __call__(self, iterator):
        logger = self.logger
        if not logger._armed:  # not called by the logger's fit(): one that ended without on_train_end
            logger._uninstall()
            return self.function(iterator)
        logger._armed = False
        logs = self.function(iterator)
        if isinstance(logs, dict):
            logs = {**logs, **logger.optimizer._batch_statistics(logger.per_layer_batch_logs)}
        return logs


class _CheckedTrainFunction:
    """A model's train function, then ``GradOptimizer.check()``: the error that an XLA-compiled
    step recorded (``action="raise"``, too many skips) is raised on the host after its batch.

    ``GradOptimizer`` installs it while the train step is traced under XLA, that is during the
    first batch's call: the first call through it checks before the batch too.
    """

    def __init__(self, function, optimizer):
        self.function = function
        self.optimizer = optimizer
        self._first = True

    def __call__(self, *args, **kwargs):
        if self._first:
            self._first = False
            self.optimizer.check()
        out = self.function(*args, **kwargs)
        self.optimizer.check()
        return out

    @staticmethod
    def install(model, optimizer) -> None:
        """Wrap ``model.train_function`` (once: a wrapper already in the chain stays alone)."""
        f = model.train_function
        while isinstance(f, (_WithStatistics, _CheckedTrainFunction)):
            if isinstance(f, _CheckedTrainFunction) and f.optimizer is optimizer:
                return
            f = f.function
        if model.train_function is not None:
            model.train_function = _CheckedTrainFunction(model.train_function, optimizer)


class GradientLogger(keras.callbacks.Callback):
    """Gradient statistics of ``model.fit()``: in the batch and epoch logs, and every step in ``self.history``.

    Requires the model to be compiled with a :class:`GradOptimizer` (which a
    ``LossScaleOptimizer`` may wrap). The logger changes nothing but the training
    logs of the ``fit()`` it is passed to: ``evaluate()`` and validation report what
    plain Keras reports, and a later ``fit()`` without it logs no statistics.

    * Batch logs (so ``History``, ``CSVLogger`` and TensorBoard see them): ``grad_norm``,
      ``grad_norm_clipped``, ``grad_norm_mean`` (epoch so far), ``grad_norm_clipped_mean``,
      ``clip_threshold``, ``skipped_steps`` and ``nonfinite``; with ``per_layer_batch_logs=True``
      also ``grad_norm/<variable path>`` for every variable.
    * Epoch logs: the same, plus ``grad_norm_mean/<variable path>`` (the epoch's mean per
      variable) when ``per_layer``. Put the logger before ``CSVLogger``/``TensorBoard`` in
      ``callbacks`` so that they see those keys.
    * ``self.history``: with ``record_batches``, every optimizer step's values (lists per key,
      per-variable norms included when ``per_layer``), recorded inside the train step and
      read once per epoch.

    Args:
        per_layer (bool): per-variable norms in the history and epoch logs, default True.
        record_batches (bool): keep every optimizer step in ``self.history``, default True.
        per_layer_batch_logs (bool): per-variable norms in every batch's logs too, default
            False (a few dozen more values per step to move to the host).
        buffer_steps (int or None): rows the in-graph buffer holds between two reads;
            default: the number of batches in an epoch (4096 when unknown).

    Example:
        >>> import keras, numpy as np, gradtools.keras as gk
        >>> keras.utils.set_random_seed(0)
        >>> out = keras.layers.Dense(1, name="out")
        >>> model = keras.Sequential([keras.Input((3,)), out], name="net")
        >>> opt = gk.GradOptimizer(keras.optimizers.SGD(0.1), clip=1.0)
        >>> model.compile(optimizer=opt, loss="mse")
        >>> x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
        >>> logger = gk.GradientLogger(per_layer=True)
        >>> h = model.fit(x, y, batch_size=4, epochs=2, callbacks=[logger], verbose=0)
        >>> len(logger.history["grad_norm"]), sorted(h.history)[:3]
        (4, ['clip_threshold', 'grad_norm', 'grad_norm_clipped'])
        >>> len(logger.history["grad_norm/net/out/kernel"])
        4
    """

    async_safe = True  # no batch-end hook: fit() may dispatch asynchronously

    def __init__(self, per_layer: bool = True, record_batches: bool = True, per_layer_batch_logs: bool = False,
                 buffer_steps: int | None = None):
        super().__init__()
        self.per_layer = bool(per_layer)
        self.record_batches = bool(record_batches)
        self.per_layer_batch_logs = bool(per_layer_batch_logs)
        self.buffer_steps = None if buffer_steps is None else _checks.integer("buffer_steps", buffer_steps, minimum=1)
        self.history: dict = {}
        self.lost_steps = 0
        self._armed = False

    def set_model(self, model):
        super().set_model(model)
        from gradtools.keras.optimizer import GradOptimizer  # the optimizer imports this module

        opt = getattr(model, "optimizer", None)
        # Mixed precision: compile() wraps the optimizer in a LossScaleOptimizer, which unscales the
        # gradients and skips overflowing steps itself before GradOptimizer sees them.
        while not isinstance(opt, GradOptimizer) and isinstance(getattr(opt, "inner_optimizer", None),
                                                                 keras.optimizers.Optimizer):
            opt = opt.inner_optimizer
        if not isinstance(opt, GradOptimizer):
            raise ValueError("GradientLogger needs the model compiled with gradtools.keras.GradOptimizer, got "
                             f"{type(opt).__name__}")
        self.optimizer = opt

    def on_train_begin(self, logs=None):
        self._uninstall()  # a wrapper that an interrupted fit() left behind
        opt, model = self.optimizer, self.model
        if self.record_batches:
            steps = self.params.get("steps") if self.params else None
            retrace = opt.start_recording(self.buffer_steps or steps or 4096, per_layer=self.per_layer)
        else:
            retrace = opt.stop_recording()
        if retrace and model.train_function is not None:  # the buffer is captured when the step is traced
            model.make_train_function(force=True)
        if model.train_function is not None:
            model.train_function = _WithStatistics(model.train_function, self)

    def on_train_batch_begin(self, batch, logs=None):
        self._armed = True  # the next call of the train function is this fit()'s

    def _uninstall(self):
        self._armed = False
        model = self.model
        if model is None:
            return
        outer, f = None, model.train_function  # GradOptimizer may have wrapped this logger's wrapper
        while isinstance(f, (_WithStatistics, _CheckedTrainFunction)):
            if isinstance(f, _WithStatistics):
                if outer is None:
                    model.train_function = f.function
                else:
                    outer.function = f.function
                return
            outer, f = f, f.function

    def on_epoch_begin(self, epoch, logs=None):
        self.optimizer.reset_epoch_means()

    def flush(self):
        """Move the rows recorded so far into ``self.history`` (done at every epoch's end)."""
        if not self.record_batches:
            return
        rows, lost = self.optimizer.read_recording()
        for key, values in rows.items():
            self.history.setdefault(key, []).extend(values)
        if lost:
            self.lost_steps += lost
            warnings.warn(f"GradientLogger: {lost} steps did not fit in the buffer of {self.buffer_steps or 'one epoch'}"
                          " rows and were not recorded; pass a larger buffer_steps", RuntimeWarning, stacklevel=2)

    def on_epoch_end(self, epoch, logs=None):
        self.flush()
        if self.per_layer and logs is not None:
            logs.update({f"grad_norm_mean/{k}": v for k, v in self.optimizer.epoch_layer_means().items()})

    def on_train_end(self, logs=None):
        self._uninstall()
        self.flush()
