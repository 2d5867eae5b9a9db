"""Learning-rate range test as a Keras callback, the twin of :mod:`gradtools.torch.lr_range`.

The sweep itself is the framework-free :class:`gradtools.lr_range.RangeSweep`;
this callback only sets the rate, reads each batch's loss and restores.
"""

from __future__ import annotations

import copy

import numpy as np

from gradtools.lr_range import LRRangeResult, RangeSweep
from gradtools.runtime import import_keras

keras = import_keras()

__all__ = ["LRRangeTest", "LRRangeResult"]


class LRRangeTest(keras.callbacks.Callback):
    """Sweep the learning rate during ``fit()``, then restore weights and optimizer.

    Run it with enough batches (``epochs * steps_per_epoch >= num_steps``); it
    stops training when the loss diverges or the sweep ends. Each step records
    that batch's own loss (not the epoch's running mean that ``fit()`` logs).
    Afterwards the model's weights, the optimizer's variables and learning rate
    and, for a ``GradOptimizer``, its guard's and policy's state are as before;
    ``self.result`` is the :class:`gradtools.lr_range.LRRangeResult`.

    Args:
        start_lr (float): the sweep's first rate, default 1e-7.
        end_lr (float): its last rate, default 10.
        num_steps (int): steps in the sweep, default 100.
        beta (float): smoothing factor, default 0.9.
        diverge_factor (float): stop when smoothed loss > factor * best, default 4.

    Example:
        >>> import keras, numpy as np, gradtools.keras as gk
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
        >>> finder = gk.LRRangeTest(start_lr=1e-4, end_lr=10.0, num_steps=40)
        >>> _ = model.fit(x, x.sum(1), batch_size=8, epochs=5, callbacks=[finder],
        ...               verbose=0)
        >>> r = finder.result
        >>> lr = float(model.optimizer.learning_rate)  # restored
        >>> 1e-4 < r.suggested_lr < 10.0, round(lr, 6)
        (True, 0.01)
    """

    def __init__(self, start_lr=1e-7, end_lr=10.0, num_steps=100, beta=0.9, diverge_factor=4.0):
        super().__init__()
        self.sweep = RangeSweep(start_lr, end_lr, num_steps, beta, diverge_factor)
        self.result = None
        self._step = 0

    @staticmethod
    def _gradtools_optimizer(opt):
        from gradtools.keras.optimizer import GradOptimizer  # the optimizer imports keras pieces too

        while not isinstance(opt, GradOptimizer) and isinstance(getattr(opt, "inner_optimizer", None),
                                                                 keras.optimizers.Optimizer):
            opt = opt.inner_optimizer
        return opt if isinstance(opt, GradOptimizer) else None

    def on_train_begin(self, logs=None):
        opt = self.model.optimizer
        if isinstance(opt.learning_rate, keras.optimizers.schedules.LearningRateSchedule) or not hasattr(
                opt.learning_rate, "assign"):
            raise ValueError("LRRangeTest needs an optimizer with a constant learning rate, not a schedule")
        spe = int(keras.ops.convert_to_numpy(getattr(self.model, "steps_per_execution", 1)))
        if spe != 1:
            raise ValueError(f"LRRangeTest sets the rate before every batch: compile with steps_per_execution=1, "
                             f"got {spe}")
        tracker = getattr(self.model, "_loss_tracker", None)
        if tracker is None or not hasattr(tracker, "total"):
            raise RuntimeError("LRRangeTest reads each batch's loss from the model's loss tracker, which this "
                               "Keras version does not have")
        self._tracker = tracker
        self._weights = [w.numpy().copy() for w in self.model.weights]
        self._lr = float(opt.learning_rate.numpy())
        self._opt_values = None if not opt.built else [v.numpy().copy() for v in opt.variables]
        grad_opt = self._gradtools_optimizer(opt)
        self._guard_state = None if grad_opt is None else (grad_opt, copy.deepcopy(grad_opt.guard.state_dict()))

    def on_epoch_begin(self, epoch, logs=None):
        self._seen = (0.0, 0.0)  # fit() resets the loss tracker at every epoch's start

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate.assign(self.sweep.lr(self._step))

    def _batch_loss(self) -> float:
        # fit() logs the running mean over the epoch, weighted by batch size; the tracker's
        # sums since the previous batch give this batch's own mean loss.
        total, count = float(self._tracker.total.numpy()), float(self._tracker.count.numpy())
        prev_total, prev_count = self._seen
        self._seen = (total, count)
        return (total - prev_total) / (count - prev_count) if count > prev_count else float("nan")

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.sweep.record(self._batch_loss()):
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        opt = self.model.optimizer
        for w, value in zip(self.model.weights, self._weights):
            w.assign(value)
        if self._opt_values is not None:
            for v, value in zip(opt.variables, self._opt_values):
                v.assign(value)
        else:  # built during the sweep: reset its slots to their initial zeros
            for v in opt.variables:
                v.assign(np.zeros(v.shape, dtype=v.dtype))
        if self._guard_state is not None:
            grad_opt, state = self._guard_state
            grad_opt.guard.load_state_dict(state)
        opt.learning_rate.assign(self._lr)
        self.result = self.sweep.result()
