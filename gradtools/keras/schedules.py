"""Learning-rate schedules for Keras, the twins of :mod:`gradtools.torch.schedules`.

:class:`Warmup` puts a linear warm-up in front of any schedule (or a constant
rate); :class:`OneCycle` is PyTorch's ``OneCycleLR`` (learning rate only) as a
Keras schedule. Both evaluate the framework-free formulas of
:mod:`gradtools.schedules` with ``keras.ops``, so they trace into the train
step, and both save and load with the model.
"""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.runtime import import_keras
from gradtools.schedules import check_one_cycle, check_warmup_steps, one_cycle, warmup_factor

keras = import_keras()

__all__ = ["Warmup", "OneCycle", "learning_rates"]


@keras.saving.register_keras_serializable(package="gradtools")
class Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up in front of any schedule: ``lr(step) = min(1, (step + 1) / warmup_steps) * schedule(step)``.

    The same rates, step by step, as ``gradtools.torch.Warmup`` around the
    equivalent PyTorch scheduler.

    Args:
        schedule (float or LearningRateSchedule): the rate or schedule to warm up.
        warmup_steps (int): steps of linear warm-up; 0 or 1 means none (step 0
            already runs at ``1 / warmup_steps`` of the rate).

    Example:
        >>> import keras, gradtools.keras as gk
        >>> decay = keras.optimizers.schedules.ExponentialDecay(1.0, 1, 0.5)
        >>> gk.learning_rates(gk.Warmup(decay, warmup_steps=2), 4).tolist()
        [0.5, 0.5, 0.25, 0.125]
    """

    def __init__(self, schedule, warmup_steps: int):
        if isinstance(schedule, dict):  # from a saved config
            schedule = keras.saving.deserialize_keras_object(schedule)
        if not callable(schedule):
            schedule = _checks.positive("schedule", schedule)
        self.schedule = schedule
        self.warmup_steps = check_warmup_steps(warmup_steps)

    def __call__(self, step):
        # The inner schedule gets the step as Keras gives it (an integer), the factor a float.
        base = self.schedule(step) if callable(self.schedule) else self.schedule
        factor = warmup_factor(keras.ops.cast(step, "float32"), self.warmup_steps, xp=keras.ops)
        return factor * keras.ops.cast(base, "float32")

    def get_config(self):
        schedule = self.schedule
        if callable(schedule):
            schedule = keras.saving.serialize_keras_object(schedule)
        return {"schedule": schedule, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="gradtools")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """The one-cycle policy (Smith and Topin, 2019), as PyTorch's ``OneCycleLR(anneal_strategy="cos")``.

    Only the learning rate cycles; PyTorch's ``cycle_momentum`` (which also
    cycles momentum or Adam's beta_1) has no Keras counterpart here, so compare
    with ``OneCycleLR(..., cycle_momentum=False)``. Two choices differ from
    PyTorch's: past ``total_steps`` the last rate is kept (PyTorch raises), and
    a ``pct_start`` that leaves a phase under one step is refused (PyTorch
    accepts it and divides by a negative phase length).

    Args:
        max_lr (float): the peak rate.
        total_steps (int): the length of the cycle (steps after it keep the last rate).
        pct_start (float): the fraction spent rising, default 0.3.
        div_factor (float): initial rate = ``max_lr / div_factor``, default 25.
        final_div_factor (float): final rate = initial / ``final_div_factor``, default 1e4.

    Example:
        >>> import gradtools.keras as gk
        >>> rates = gk.learning_rates(gk.OneCycle(1.0, total_steps=10), 10)
        >>> round(float(rates[0]), 3), round(float(rates.max()), 3), int(rates.argmax())
        (0.04, 1.0, 2)
    """

    def __init__(self, max_lr: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4):
        (self.max_lr, self.total_steps, self.pct_start, self.div_factor,
         self.final_div_factor) = check_one_cycle(max_lr, total_steps, pct_start, div_factor, final_div_factor)

    def __call__(self, step):
        step = keras.ops.minimum(keras.ops.cast(step, "float32"), float(self.total_steps - 1))
        return one_cycle(step, self.max_lr, self.total_steps, self.pct_start, self.div_factor,
                         self.final_div_factor, xp=keras.ops)

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor}


def learning_rates(schedule, steps: int) -> np.ndarray:
    """``schedule(0) .. schedule(steps - 1)`` as a float64 array: the rate of each optimizer step.

    Keras evaluates the schedule at ``optimizer.iterations``, the 0-based
    step, so this is the sequence ``gradtools.torch.learning_rates`` gives for
    the equivalent PyTorch scheduler. Each step is one call with a scalar
    integer step, as the optimizer makes it (schedules with a Python ``if`` on
    the step work too).
    """
    if not callable(schedule):
        raise TypeError(f"schedule must be a LearningRateSchedule or callable, got {type(schedule).__name__}")
    steps = _checks.integer("steps", steps, minimum=1)
    return np.array([float(keras.ops.convert_to_numpy(schedule(keras.ops.convert_to_tensor(i, "int64"))))
                     for i in range(steps)])
