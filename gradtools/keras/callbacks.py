"""Gradient statistics from ``GradOptimizer`` in ``fit()``'s logs: a metric and a callback.

:class:`GradientStats` is a Keras metric whose ``result()`` reads the
``GradOptimizer``'s statistics inside the compiled train step, so they arrive
in the batch logs with the loss, consistent with the step that produced them
(and ``fit()`` keeps dispatching callbacks asynchronously). :class:`GradientLogger`
attaches it to the model; optionally it also records every batch's values in
``self.history`` (a per-batch hook, which makes ``fit()`` wait for each batch).
"""

from __future__ import annotations

from gradtools.runtime import import_keras

keras = import_keras()
from keras import ops  # noqa: E402

__all__ = ["GradientLogger", "GradientStats"]


class GradientStats(keras.metrics.Metric):
    """Keras metric reporting a ``GradOptimizer``'s gradient statistics.

    ``result()`` is a dict: ``grad_norm`` and ``grad_norm_clipped`` (last optimizer
    step), ``grad_norm_mean`` and ``grad_norm_clipped_mean`` (mean over the epoch's
    steps so far, excluding skipped ones), ``clip_threshold``, ``skipped_steps``,
    ``nonfinite`` (last step) and, with ``per_layer``, ``grad_norm/<variable path>``.
    """

    def __init__(self, optimizer, per_layer: bool = True, name: str = "gradient_stats"):
        super().__init__(name=name)
        self._optimizer = optimizer
        self.per_layer = bool(per_layer)

    def update_state(self, *args, **kwargs):
        pass  # the optimizer updates the statistics itself

    def reset_state(self):
        opt = self._optimizer
        if opt.built:  # a new epoch: restart the running means
            for v in (opt.sum_norm, opt.sum_norm_after, opt.window_count):
                v.assign(ops.zeros_like(v))

    def result(self):
        opt = self._optimizer
        if not opt.built:
            return {}
        applied = ops.maximum(opt.window_count - opt.skipped, 1.0)
        out = {
            "grad_norm": opt.norm_before,
            "grad_norm_clipped": opt.norm_after,
            "grad_norm_mean": opt.sum_norm / applied,
            "grad_norm_clipped_mean": opt.sum_norm_after / applied,
            "clip_threshold": opt.threshold,
            "skipped_steps": opt.skipped,
            "nonfinite": ops.sum(opt.nonfinite),
        }
        if self.per_layer:
            for i, name in enumerate(opt.variable_names):
                out[f"grad_norm/{name}"] = opt.layer_norms[i]
        return {k: ops.convert_to_tensor(v) for k, v in out.items()}


class GradientLogger(keras.callbacks.Callback):
    """Put gradient statistics into the batch and epoch logs of ``model.fit()``.

    Requires the model to be compiled with a :class:`GradOptimizer`. It attaches a
    :class:`GradientStats` metric, so every batch's logs carry ``grad_norm``,
    ``grad_norm_clipped``, ``grad_norm_mean`` (epoch so far), ``clip_threshold``,
    ``skipped_steps``, ``nonfinite`` and, with ``per_layer=True``,
    ``grad_norm/<variable path>``; ``History``, ``CSVLogger`` and TensorBoard see them.

    Args:
        per_layer (bool): per-variable norms too, default True.
        record_batches (bool): also keep every optimizer step's values in
            ``self.history`` (lists per key), default True. This needs a per-batch
            hook, which makes ``fit()`` wait for each batch; set False for speed.

    Example:
        >>> import keras, gradtools.keras as gk
        >>> logger = gk.GradientLogger(per_layer=True, record_batches=False)
    """

    def __init__(self, per_layer: bool = True, record_batches: bool = True):
        super().__init__()
        self.per_layer = bool(per_layer)
        self.record_batches = bool(record_batches)
        self.history: dict = {}
        if not self.record_batches:
            self.async_safe = True  # no batch hook: Keras may dispatch asynchronously

    def set_model(self, model):
        super().set_model(model)
        from gradtools.keras.optimizer import GradOptimizer

        opt = getattr(model, "optimizer", None)
        if not isinstance(opt, GradOptimizer):
            raise ValueError("GradientLogger needs the model compiled with gradtools.keras.GradOptimizer, got "
                             f"{type(opt).__name__}")
        if getattr(model, "jit_compile", False) is True:
            raise ValueError("GradientLogger/GradOptimizer need model.compile(..., jit_compile=False): the guard and "
                             "the clipping policies run on the host once per step, which XLA cannot compile")
        existing = [m for m in model.metrics if isinstance(m, GradientStats)]
        if not existing or existing[0].per_layer != self.per_layer:
            for m in existing:
                model._metrics.remove(m)
            model._gradtools_stats = GradientStats(opt, self.per_layer)  # tracked into model._metrics
            model.train_function = None  # rebuild the train step with the metric in it

    def on_train_batch_end(self, batch, logs=None):
        if not self.record_batches or logs is None or "grad_norm" not in logs:
            return
        opt = self.model.optimizer
        if opt.accumulation_steps > 1 and int(opt.micro_step.numpy()) % opt.accumulation_steps:
            return  # not an optimizer step
        for key, value in logs.items():
            if key.startswith(("grad_norm", "clip_threshold", "skipped_steps", "nonfinite")):
                self.history.setdefault(key, []).append(float(value))

