"""``GradientLogger``: gradient norms from ``GradOptimizer`` into ``fit()``'s logs and a history."""

from __future__ import annotations

import numpy as np

from gradtools.runtime import import_keras

keras = import_keras()

__all__ = ["GradientLogger"]


class GradientLogger(keras.callbacks.Callback):
    """Copy gradient statistics into the batch and epoch logs of ``model.fit()``.

    Requires the model to be compiled with a :class:`GradOptimizer`. Batch logs
    get the last optimizer step's values; epoch logs get the mean over the
    epoch's optimizer steps (``grad_norm``, ``grad_norm_clipped``) and the total
    of non-finite entries and skipped steps. Keys:

    * ``grad_norm``, ``grad_norm_clipped``, ``clip_threshold``, ``skipped_steps``,
      ``nonfinite``;
    * with ``per_layer=True``, ``grad_norm/<variable path>`` for every variable.

    Everything is also kept in ``self.history`` (lists per key, one entry per batch).
    Put it before other callbacks that read logs (``History`` always comes last).

    Example:
        >>> import keras, gradtools.keras as gk
        >>> logger = gk.GradientLogger(per_layer=True)
    """

    def __init__(self, per_layer: bool = True):
        super().__init__()
        self.per_layer = bool(per_layer)
        self.history: dict = {}
        self._epoch: dict = {}

    def set_model(self, model):
        super().set_model(model)
        from gradtools.keras.optimizer import GradOptimizer

        if not isinstance(getattr(model, "optimizer", None), GradOptimizer):
            raise ValueError("GradientLogger needs the model compiled with gradtools.keras.GradOptimizer, got "
                             f"{type(getattr(model, 'optimizer', None)).__name__}")
        if getattr(model, "jit_compile", False) is True:
            raise ValueError("GradientLogger/GradOptimizer need model.compile(..., jit_compile=False): the guard and "
                             "the clipping policies run on the host once per step, which XLA cannot compile")

    def _read(self) -> dict:
        opt = self.model.optimizer
        if not opt.built:
            return {}
        values = {
            "grad_norm": float(opt.norm_before.numpy()),
            "grad_norm_clipped": float(opt.norm_after.numpy()),
            "clip_threshold": float(opt.threshold.numpy()),
            "skipped_steps": float(opt.skipped.numpy()),
            "nonfinite": float(opt.nonfinite.numpy().sum()),
        }
        if self.per_layer:
            for name, v in zip(opt.variable_names, opt.layer_norms.numpy().tolist()):
                values[f"grad_norm/{name}"] = v
        return values

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = {}

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        if opt.accumulation_steps > 1 and int(opt.micro_step.numpy()) % opt.accumulation_steps:
            return  # not an optimizer step
        values = self._read()
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
            self._epoch.setdefault(key, []).append(value)
        if logs is not None:
            logs.update(values)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._epoch:
            return
        for key, values in self._epoch.items():
            arr = np.asarray(values, dtype=float)
            if key in ("skipped_steps",):
                logs[key] = float(arr[-1])
            elif key == "nonfinite":
                logs[key] = float(arr.sum())
            else:
                finite = arr[np.isfinite(arr)]
                logs[key] = float(finite.mean()) if len(finite) else float(arr[-1])  # e.g. inf: never clipped
