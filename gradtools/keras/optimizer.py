"""``GradOptimizer``: the guard, clipping policies, statistics and accumulation for any Keras optimizer.

Wrap any Keras 3 optimizer and train with plain ``model.fit()``: no custom
``train_step``. Like Keras' ``LossScaleOptimizer``, it wraps an inner optimizer
and composes the pieces that :mod:`gradtools.torch` offers as separate objects,
each from the module of the same name:

* :class:`gradtools.keras.accumulate.GradientAccumulator` averages micro-batch
  gradients (``accumulation_steps``); everything below runs once per window;
* :class:`gradtools.keras.guard.GradGuard` measures the global and per-variable
  norms and the non-finite entries (in the graph) and asks the shared decider
  (skip, raise or zero; spike detection), fed the clipper's policy;
* :class:`gradtools.keras.clip.Clipper`'s policy sets the global-norm threshold
  (fixed, AutoClip, ZClip, or any registered policy), then optionally
  :func:`gradtools.keras.clip.adaptive_clip_grad` clips unit-wise (AGC);
* the inner optimizer applies the update, or the step is skipped inside
  ``tf.cond``: neither the weights nor the inner optimizer's variables change;
* :mod:`gradtools.keras.monitor` reads the statistics, kept in this optimizer's
  variables, into ``fit()``'s logs and a per-step history (``GradientLogger``).

It stands in for the optimizer it wraps: ``variables`` and ``set_weights()`` are
the inner optimizer's, and a plain optimizer's ``.weights.h5`` loads (GradOptimizer's
own state is saved beside it, so a plain optimizer skips a GradOptimizer's file, with
Keras' warning); the name, learning rate, weight decay (and its exclusions), EMA,
``loss_scale_factor`` and the ``overwrite_with_gradient`` variables (float8 scales)
behave as on the inner optimizer.
``IndexedSlices`` gradients (``Embedding``) are measured, zeroed and clipped as the
dense gradient but handed on sparse (an accumulation window's mean is dense, as in
Keras' own accumulation); Keras' ``clipnorm``/``global_clipnorm`` instead count a row
that a batch repeats once per slice. Under a ``tf.distribute`` strategy
(``MirroredStrategy``), the gradients are summed over the replicas first and measured,
decided on and clipped once, in a cross-replica context, so that every replica takes
the same step. The inner optimizer's own clipping (``clipnorm``, ``global_clipnorm``,
``clipvalue``) and ``gradient_accumulation_steps`` are refused (``clip``, ``agc`` and
``accumulation_steps`` replace them), and so is a ``LossScaleOptimizer`` inside: it
goes outside, ``LossScaleOptimizer(GradOptimizer(...))``, as ``compile()`` puts it.

XLA: the decisions run as TensorFlow operations inside the train step
(:mod:`gradtools.keras.guard`), so ``model.compile(..., jit_compile=True)`` (and
``"auto"``, which Keras resolves to XLA on a GPU) compiles the whole step:
guard, policy, accumulation, statistics and recording. An error that XLA cannot
raise in the step (``action="raise"``, too many skips) is recorded, the steps
after it in the same call do nothing, and it is raised on the host: ``fit()`` and
``train_on_batch()`` check after each call of the train function from the second
on (the check is set up while the first call compiles the step, so the first
call's error comes when the second starts, or when ``fit()`` ends); a custom loop,
or a lone ``train_on_batch()``, calls :meth:`GradOptimizer.check`. Keras turns XLA
off when TensorFlow's op determinism is on (``gradtools.runtime.setup()`` turns
it on for the book), whatever ``jit_compile`` says. A clipping policy of your own
that has only ``step()`` runs on the host: not under XLA.

The policy's and the guard's running state (AutoClip history, ZClip
statistics, spike window, skip counters) is written into ``.keras`` and
``.weights.h5`` files with the optimizer's variables, so a resumed run takes the
same decisions as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np

from gradtools import _checks
from gradtools.keras.accumulate import GradientAccumulator
from gradtools.keras.clip import Clipper, adaptive_clip_grad
from gradtools.keras.guard import GradGuard, _plain_python, in_xla_context
from gradtools.keras.monitor import GLOBAL_KEYS, Recorder, _CheckedTrainFunction
from gradtools.keras.norms import _map_values, _norms, _path
from gradtools.policies import SpikeDetector, get_policy, policy_config, policy_from_config
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

__all__ = ["GradOptimizer"]


def _clip_config(clip):
    """What the saved config holds for ``clip``, once :func:`get_policy` has accepted it."""
    if clip is None or isinstance(clip, str):
        return clip
    if _checks._is_real(clip):  # NumPy scalars too; a plain float in the saved config
        return float(clip)
    return policy_config(clip)


# Clipping that Keras' optimizers do inside apply(), after GradOptimizer has measured and decided.
_INNER_CLIPPING = ("clipnorm", "global_clipnorm", "clipvalue")


def _inner_setting(name):
    def get(self):
        return getattr(self.inner_optimizer, name) if "inner_optimizer" in self.__dict__ else None

    def set(self, value):
        if "inner_optimizer" in self.__dict__:  # the base class's __init__ sets them before it exists
            setattr(self.inner_optimizer, name, value)

    return property(get, set, doc=f"The inner optimizer's ``{name}``.")


def _batch_size(value) -> tuple:
    """``apply``'s ``batch_size`` checked: ``(value, assertions)``.

    None, an int >= 1 or an integer scalar tensor. A value known now is checked now; a
    traced one only when the graph runs, by the returned assertion (for
    ``tf.control_dependencies``, so that nothing changes before it holds).
    """
    if value is None:
        return None, []
    if not (tf.is_tensor(value) or isinstance(value, np.ndarray)):
        return _checks.integer("batch_size", value, minimum=1), []
    t = tf.convert_to_tensor(value)
    if not t.dtype.is_integer:
        raise TypeError(f"batch_size must be an int or an integer scalar tensor, got a {t.dtype.name} tensor")
    if t.shape.rank is not None and t.shape.rank != 0:
        raise ValueError(f"batch_size must be a scalar, got a tensor of shape {t.shape}")
    static = tf.get_static_value(t)
    if static is None:
        return t, [tf.debugging.assert_positive(t, message="batch_size must be an int >= 1")]
    if int(static) < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {int(static)}")
    return t, []


def _first_replica_only(g, first):
    """``g`` in the first replica, an empty gradient of its kind elsewhere (``first``: bool or tensor)."""
    if isinstance(g, tf.IndexedSlices):
        rows = tf.where(first, tf.shape(g.indices)[0], 0) if tf.is_tensor(first) else (None if first else 0)
        return tf.IndexedSlices(tf.identity(g.values[:rows]), tf.identity(g.indices[:rows]), g.dense_shape)
    if tf.is_tensor(first):
        return tf.where(first, g, tf.zeros_like(g))
    return tf.identity(g) if first else tf.zeros_like(g)  # a tensor of this replica's own, all-reduced


@keras.saving.register_keras_serializable(package="gradtools")
class GradOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras optimizer with a guard, clipping policies, statistics and accumulation.

    Args:
        inner_optimizer (keras.optimizers.Optimizer): the optimizer that updates the weights.
        clip: None (no clipping), a positive number (fixed global-norm threshold),
            a registered policy name (``"autoclip"``, ``"zclip"``) or a
            :mod:`gradtools.policies` policy.
        agc (float or None): AGC clip factor (unit-wise clipping, Brock et al. 2021),
            default None.
        agc_eps (float): AGC floor on weight norms, default 1e-3.
        action (str): on a non-finite gradient: ``"skip"`` (default), ``"raise"`` or ``"zero"``.
        spike (SpikeDetector or None): also skip steps whose global norm is a spike.
        max_consecutive_skips (int): stop training with an error after this many skips in a row.
        accumulation_steps (int): micro-batches per optimizer step, default 1.

    Example:
        >>> import keras, numpy as np, gradtools.keras as gk
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> opt = gk.GradOptimizer(keras.optimizers.Adam(1e-2), clip="zclip")
        >>> model.compile(optimizer=opt, loss="mse")
        >>> x = np.ones((8, 3), np.float32)
        >>> x[0, 0] = np.nan  # one poisoned batch of the two
        >>> _ = model.fit(x, np.zeros((8, 1)), batch_size=4, verbose=0)
        >>> int(opt.iterations), opt.guard.skipped
        (1, 1)
    """

    def __init__(self, inner_optimizer, clip=None, agc=None, agc_eps=1e-3, action="skip", spike=None,
                 max_consecutive_skips=10, accumulation_steps=1, name=None, **kwargs):
        for arg in _INNER_CLIPPING:
            if arg in kwargs:
                raise ValueError(f"GradOptimizer does not take {arg}: its clip= is the one clip, by global norm "
                                 f"(clip={kwargs[arg]!r}, or a policy such as clip='zclip'), or unit-wise (agc=)")
        if "gradient_accumulation_steps" in kwargs:
            raise ValueError("GradOptimizer does not take gradient_accumulation_steps: use accumulation_steps="
                             f"{kwargs['gradient_accumulation_steps']!r}")
        if kwargs:
            raise ValueError(f"GradOptimizer does not take {sorted(kwargs)}: set them on the inner_optimizer")
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"inner_optimizer must be a keras.optimizers.Optimizer, got "
                            f"{type(inner_optimizer).__name__}")
        if isinstance(inner_optimizer, (GradOptimizer, keras.optimizers.LossScaleOptimizer)):
            raise TypeError(f"inner_optimizer must not be a {type(inner_optimizer).__name__}: "
                            + ("give one GradOptimizer all the settings" if isinstance(inner_optimizer, GradOptimizer)
                               else "wrap the other way round, LossScaleOptimizer(GradOptimizer(...)), as "
                                    "compile() does under a mixed-precision policy, so that the loss is scaled"))
        for arg in _INNER_CLIPPING:
            value = getattr(inner_optimizer, arg, None)
            if value is not None:
                raise ValueError(f"inner_optimizer has {arg}={value!r}: it would clip a second time, after "
                                 "GradOptimizer has measured, logged and decided. Remove it there and use "
                                 "GradOptimizer's clip= (a global-norm threshold or a policy) or agc= (unit-wise)")
        if getattr(inner_optimizer, "gradient_accumulation_steps", None):
            raise ValueError("inner_optimizer has gradient_accumulation_steps set: use "
                             "GradOptimizer(accumulation_steps=...) instead, so that clipping, statistics and "
                             "learning-rate schedules see whole optimizer steps")
        policy = None if clip is None else get_policy(clip, "clip")
        # The inner optimizer's name, unless given: TensorBoard's keys and variable paths stay the same.
        super().__init__(learning_rate=0.0, name=inner_optimizer.name if name is None else name)
        self.inner_optimizer = inner_optimizer
        self.clip = _clip_config(clip)
        if isinstance(spike, dict):
            spike = SpikeDetector.from_config(spike)
        self.clipper = None if policy is None else Clipper(policy)
        self.guard = GradGuard(None, action, spike, max_consecutive_skips, clipper=self.clipper)
        self.agc = None if agc is None else _checks.positive("agc", agc)
        self.agc_eps = _checks.positive("agc_eps", agc_eps)
        self.accumulator = GradientAccumulator(accumulation_steps)
        self._weighted = None  # whether apply() calls give batch_size (fixed by the first call)
        self._var_names: list[str] = []
        self._recording = None  # (capacity, per_layer) asked for by start_recording()
        self._recorder = None

    # Shortcuts to the composed parts.
    decider = property(lambda self: self.guard.decider)
    policy = property(lambda self: None if self.clipper is None else self.clipper.policy)
    accumulation_steps = property(lambda self: self.accumulator.accumulation_steps)
    last_error = property(lambda self: self.guard.last_error,
                          doc="The guard's last error (NonFiniteGradientError or TooManySkipsError).")

    # The inner optimizer's settings, read and set through the wrapper (MultiOptimizer sets
    # loss_scale_factor on the optimizers it holds; SwapEMAWeights reads use_ema).
    weight_decay = _inner_setting("weight_decay")
    ema_momentum = _inner_setting("ema_momentum")
    ema_overwrite_frequency = _inner_setting("ema_overwrite_frequency")
    loss_scale_factor = _inner_setting("loss_scale_factor")
    _use_ema = _inner_setting("use_ema")

    @property
    def use_ema(self):
        """The inner optimizer's ``use_ema`` (it keeps the averages; ``SwapEMAWeights`` finds them)."""
        return False if self.__dict__.get("_building") else self._use_ema  # no averages of our own

    @use_ema.setter
    def use_ema(self, value):
        self._use_ema = value

    @property
    def _model_variables_moving_average(self):
        return self.inner_optimizer._model_variables_moving_average  # AttributeError without use_ema, as Keras

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exclude variables from the inner optimizer's weight decay (it decays the weights)."""
        self.inner_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    # ------------------------------------------------------------------ state
    @_plain_python
    def build(self, var_list):
        if self.built:  # as Keras' own optimizers: LossScaleOptimizer and load_model build it again
            return
        self._var_names = [_path(v) for v in var_list]
        n = len(var_list)
        zeros = keras.initializers.Zeros()

        def scalar(name, init=zeros, dtype="float32", shape=()):
            return self.add_variable(shape, initializer=init, dtype=dtype, name=name)

        with keras.name_scope(self.name, caller=self):
            self.norm_before = scalar("grad_norm")
            self.norm_after = scalar("grad_norm_clipped")
            self.threshold = scalar("clip_threshold", keras.initializers.Constant(math.inf))
            self.layer_norms = scalar("layer_grad_norms", shape=(n,))
            self.nonfinite = scalar("nonfinite_counts", shape=(n,))
            self.skipped = scalar("skipped_steps")
            self.last_skipped = scalar("last_step_skipped")
            # Running sums over the applied steps since reset_epoch_means() (GradientLogger: each epoch).
            self.sum_norm = scalar("epoch_grad_norm_sum")
            self.sum_norm_after = scalar("epoch_clipped_sum")
            self.applied_count = scalar("epoch_applied_steps")
            self.sum_layer_norms = scalar("epoch_layer_grad_norm_sum", shape=(n,))
            self.layer_applied_count = scalar("epoch_layer_applied_steps")
            self.accumulator.build(self, var_list)
        self.micro_step = self.accumulator.micro_step
        self.guard.place()  # the decision's state in variables, before any step is traced
        self.inner_optimizer.build(var_list)
        self._building = True
        try:
            super().build(var_list)
        finally:
            self._building = False
        if self._recording is not None:  # asked for before the model was built (at its first call)
            self._recorder = self._new_recorder(*self._recording)

    @property
    def variables(self):
        """The inner optimizer's variables, as on the plain optimizer (same count, order and files).

        GradOptimizer's own state (statistics, accumulation window, policy) is saved beside them.
        """
        return self.inner_optimizer.variables

    def __getattr__(self, name):
        # Anything else the inner optimizer offers (Muon's lr_adjust, Nadam's _u_product, ...).
        inner = self.__dict__.get("inner_optimizer")
        if inner is None or name.startswith(("__", "_self_")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def update_step(self, gradient, variable, learning_rate):
        """The inner optimizer's raw update of one variable (no guard, clip or statistics)."""
        return self.inner_optimizer.update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        self.inner_optimizer._apply_weight_decay(variables)

    def __dir__(self):
        # Keras' saving walks dir() for nested optimizers: hidden there, the inner optimizer is saved
        # only through this one (save_own_variables), so the files have a plain optimizer's layout.
        return [name for name in super().__dir__() if name != "inner_optimizer"]

    def set_weights(self, weights):
        """Set the inner optimizer's variables, as ``set_weights`` on the plain optimizer does."""
        self.inner_optimizer.set_weights(weights)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        if hasattr(self, "inner_optimizer"):
            self.inner_optimizer.learning_rate = value

    def _get_current_learning_rate(self):
        return self.inner_optimizer._get_current_learning_rate()

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def variable_names(self) -> list:
        """Keras variable paths, in the order of ``layer_grad_norms`` (e.g. ``"sequential/dense_0/kernel"``)."""
        return list(self._var_names)

    # ------------------------------------------------------------------ statistics
    def statistics(self, per_layer: bool = False) -> dict:
        """The statistics of the last optimizer step as tensors, keyed as in ``fit()``'s logs.

        ``grad_norm`` and ``grad_norm_clipped`` (0 on a skipped step), ``grad_norm_mean`` and
        ``grad_norm_clipped_mean`` (over the applied steps since :meth:`reset_epoch_means`, which
        ``GradientLogger`` calls at each epoch's start), ``clip_threshold``, ``skipped_steps``
        (cumulative), ``nonfinite`` and, with ``per_layer``, ``grad_norm/<variable path>``.
        Empty before the optimizer is built.
        """
        if not self.built:
            return {}
        applied = ops.maximum(self.applied_count, 1.0)
        values = (self.norm_before, self.norm_after, self.sum_norm / applied, self.sum_norm_after / applied,
                  self.threshold, self.skipped, ops.sum(self.nonfinite))
        out = {k: tf.convert_to_tensor(v) for k, v in zip(GLOBAL_KEYS, values)}
        if per_layer:
            out.update(zip(self._layer_keys(), ops.unstack(self.layer_norms)))
        return out

    def _batch_statistics(self, per_layer: bool) -> dict:
        """:meth:`statistics` for every batch's logs, as one call of a traced function: half the
        cost of its eager operations (0.22 ms instead of 0.45 ms a batch on a 2-core CPU)."""
        if not self.built:
            return {}
        cache = self.__dict__.setdefault("_statistics_fns", {})
        if per_layer not in cache:
            cache[per_layer] = tf.function(lambda: self.statistics(per_layer), jit_compile=False)
        return cache[per_layer]()

    def _layer_keys(self) -> list:
        return [f"grad_norm/{n}" for n in self._var_names]

    def epoch_layer_means(self) -> dict:
        """Mean per-variable gradient norm over the applied steps since :meth:`reset_epoch_means`: ``{path: float}``."""
        if not self.built:
            return {}
        applied = max(float(self.layer_applied_count.numpy()), 1.0)
        return dict(zip(self._var_names, (self.sum_layer_norms.numpy() / applied).tolist()))

    def reset_epoch_means(self):
        """Restart the running means, global and per variable (``GradientLogger`` does it at each epoch's start)."""
        if self.built:
            for v in (self.sum_norm, self.sum_norm_after, self.applied_count, self.sum_layer_norms,
                      self.layer_applied_count):
                v.assign(ops.zeros_like(v))

    def start_recording(self, capacity: int, per_layer: bool = True) -> bool:
        """Record every optimizer step's statistics into a :class:`Recorder` inside the graph.

        The buffer holds ``capacity`` rows and is not saved with the model. Before the
        optimizer is built (a model built at its first call), the buffer is made when it
        is. Returns True when a train function already traced must be traced again (a
        new buffer).
        """
        capacity = _checks.integer("capacity", capacity, minimum=1)
        self._recording = (capacity, bool(per_layer))
        if not self.built:
            return False
        current = self._recorder
        if current is not None and current.capacity >= capacity and current.names == self._recorder_names(per_layer):
            current.count.assign(0)
            return False
        self._recorder = self._new_recorder(capacity, per_layer)
        return True

    def _recorder_names(self, per_layer: bool) -> list:
        return list(GLOBAL_KEYS) + (self._layer_keys() if per_layer else [])

    def _new_recorder(self, capacity: int, per_layer: bool) -> Recorder:
        with tf.init_scope():  # build() may run while the first train step is traced
            return Recorder(capacity, self._recorder_names(per_layer))

    def stop_recording(self) -> bool:
        """Stop writing rows; returns True when the train function must be traced again."""
        had = self._recorder is not None
        self._recording = self._recorder = None
        return had

    def read_recording(self) -> tuple[dict, int]:
        """The rows recorded since the last read, oldest first, ``{key: [floats]}``; and how many were lost."""
        return ({}, 0) if self._recorder is None else self._recorder.read()

    def _record_step(self):
        if self._recorder is None:
            return
        stats = self.statistics(per_layer=False)
        row = ops.stack([stats[k] for k in GLOBAL_KEYS])
        if len(self._recorder.names) > len(GLOBAL_KEYS):
            row = ops.concatenate([row, self.layer_norms])
        self._recorder.write(row)

    # ------------------------------------------------------------------ saving
    _STATE_KEY = "gradtools_state"
    _OWN_PREFIX = "gradtools_"

    def save_own_variables(self, store):
        """The inner optimizer's variables under the keys a plain optimizer uses ("0", "1", ...), then
        GradOptimizer's own ("gradtools_0", ...) and the guard's and policy's running state (JSON bytes)."""
        self.inner_optimizer.save_own_variables(store)
        for i, variable in enumerate(self._variables):
            store[f"{self._OWN_PREFIX}{i}"] = variable.numpy()
        store[self._STATE_KEY] = np.frombuffer(json.dumps(self.guard.state_dict()).encode(), dtype=np.uint8)

    def load_own_variables(self, store):
        """Load what :meth:`save_own_variables` wrote, or a plain optimizer's file (the inner state only)."""
        keys = list(store.keys())
        inner = [k for k in keys if k.isdigit()]
        own = [k for k in keys if k.startswith(self._OWN_PREFIX) and k[len(self._OWN_PREFIX):].isdigit()]
        if len(inner) != len(self.variables) or (own and len(own) != len(self._variables)):
            warnings.warn(f"Skipping variable loading for optimizer {self.name!r}: it has {len(self.variables)} "
                          f"variables and {len(self._variables)} of its own, the saved one {len(inner)} and "
                          f"{len(own)}", stacklevel=2)
            return
        for i, variable in enumerate(self.variables):
            variable.assign(store[str(i)])
        if own:  # absent in a plain optimizer's file: GradOptimizer's state starts afresh
            for i, variable in enumerate(self._variables):
                variable.assign(store[f"{self._OWN_PREFIX}{i}"])
        if self._STATE_KEY in keys:
            raw = np.asarray(store[self._STATE_KEY], dtype=np.uint8).tobytes()
            self.guard.load_state_dict(json.loads(raw.decode()))

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)
        self.check()  # fit() calls it at its end: an error an XLA step recorded is not lost

    def check(self) -> None:
        """Raise the first error that a step compiled with XLA recorded, if any.

        ``action="raise"`` and ``max_consecutive_skips`` stop training with an error, but
        XLA cannot raise inside the step: the step is skipped and the error recorded on
        the device. ``fit()`` calls this after each batch (the first batch's error, before
        the second runs) and at its end; call it in a custom loop whose step is compiled
        with ``jit_compile=True``, and after a lone ``train_on_batch()``. Reads six integers.
        """
        self.guard.check_recorded()

    def get_config(self):
        spike = self.decider.spike
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "clip": self.clip,
            "agc": self.agc,
            "agc_eps": self.agc_eps,
            "action": self.decider.action,
            "spike": None if spike is None else spike.get_config(),
            "max_consecutive_skips": self.decider.max_consecutive_skips,
            "accumulation_steps": self.accumulation_steps,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        clip = config.get("clip")
        config["clip"] = policy_from_config(clip) if isinstance(clip, dict) else clip
        return cls(inner, **config)

    # ------------------------------------------------------------------ the step
    def _apply_window(self, grads, trainable_variables, index, strategy=None):
        n = len(self._var_names)

        def full(values):  # per-variable values of this step's subset, in the built order
            values = ops.cast(values, "float32")
            return values if index == list(range(n)) else tf.scatter_nd([[i] for i in index], values, [n])

        check = self.guard.check(grads, [self._var_names[i] for i in index])
        self.norm_before.assign(check.total)
        self.layer_norms.assign(full(check.norms))
        self.nonfinite.assign(full(check.nonfinite))
        self.threshold.assign(check.threshold)

        def step():
            clipped, after = self.guard.clip(check)
            if self.agc is not None:
                clipped = adaptive_clip_grad(clipped, trainable_variables, self.agc, self.agc_eps)[0]
                after = _norms(clipped, self.guard.norm_type)[1]
            self.norm_after.assign(after)
            self.sum_norm.assign_add(ops.where(ops.isfinite(check.total), check.total, 0.0))
            self.applied_count.assign_add(1.0)
            self.sum_layer_norms.assign_add(full(ops.where(ops.isfinite(check.norms), check.norms, 0.0)))
            self.layer_applied_count.assign_add(1.0)
            self.sum_norm_after.assign_add(after)
            self.last_skipped.assign(0.0)
            self._inner_apply(clipped, trainable_variables, strategy)
            return tf.constant(True)

        def skip():
            self.norm_after.assign(0.0)
            self.last_skipped.assign(1.0)
            self.skipped.assign_add(1.0)
            return tf.constant(False)

        applied = tf.cond(check.proceed, step, skip)
        self._record_step()
        return applied

    def _inner_apply(self, grads, variables, strategy):
        scale = self.loss_scale_factor
        if scale is not None:  # the inner optimizer divides by it, as it does the gradients Keras hands it
            grads = [_map_values(lambda t: t * ops.cast(scale, t.dtype), g) for g in grads]
        if strategy is None:
            self.inner_optimizer.apply(grads, variables)
            return
        # In each replica the inner optimizer sums the gradients over the replicas (an all-reduce) before
        # its update: the first replica hands on the gradient already summed, the others nothing (zeros;
        # no slices of a sparse gradient), so the sum is exact and sparse updates see the same slices.
        def in_replica():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            first = tf.get_static_value(replica)
            first = (replica == 0) if first is None else bool(first == 0)
            self.inner_optimizer.apply([_first_replica_only(g, first) for g in grads], variables)

        strategy.extended.call_for_each_replica(in_replica)

    def _index_of(self, variable) -> int:
        try:
            return self._get_variable_index(variable)
        except KeyError:
            raise ValueError(f"variable {_path(variable)!r} is not one this GradOptimizer was built with "
                             f"({len(self._var_names)} variables): build a new optimizer for a new model") from None

    @_plain_python
    def apply(self, grads, trainable_variables=None, batch_size=None):
        """Measure, decide, clip and step (or add to the accumulation window).

        ``batch_size`` (int or scalar tensor, optional): the samples behind ``grads``
        in a custom loop. With ``accumulation_steps > 1`` the window's gradient is then
        the mean over its micro-batches weighted by their samples, which equals the
        large-batch gradient also when the last micro-batch is short; pass it on every
        call or on none (a mix raises). ``fit()`` passes none, and every micro-batch
        weighs the same. Under a ``tf.distribute`` strategy give each replica's own
        batch size. ``LossScaleOptimizer.apply`` takes no ``batch_size``, so under
        Keras' loss scaling the micro-batches weigh the same too.
        """
        batch_size, batch_size_checks = _batch_size(batch_size)
        if self.accumulation_steps > 1:
            weighted = batch_size is not None
            if self._weighted is None:
                self._weighted = weighted
            elif weighted != self._weighted:
                said = "did not give" if weighted else "gave"
                raise ValueError(f"batch_size={'None' if batch_size is None else 'a value'} here, but earlier "
                                 f"apply() calls {said} one: pass batch_size on every call or on none, or a "
                                 "window mixes weights of samples and weights of 1")
        if in_xla_context():
            self._check_after_each_batch()
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        pairs = [(g, v) for g, v in zip(grads, trainable_variables) if g is not None]
        if not pairs:
            raise ValueError(f"No gradients provided for any variable: {[_path(v) for v in trainable_variables]}")
        if len(pairs) < len(trainable_variables):  # as Keras' own optimizers do: warn, drop, go on
            missing = [_path(v) for g, v in zip(grads, trainable_variables) if g is None]
            warnings.warn(f"Gradients do not exist for variables {missing} when minimizing the loss; "
                          "GradOptimizer leaves them out of the step and of the norms", UserWarning, stacklevel=2)
        overwrite = [(g, v) for g, v in pairs if getattr(v, "overwrite_with_gradient", False)]
        if overwrite:  # e.g. float8 scales: assigned their "gradient", not stepped, measured or clipped
            self._overwrite_with_gradients(overwrite)
            pairs = [(g, v) for g, v in pairs if not getattr(v, "overwrite_with_gradient", False)]
            if not pairs:
                return
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        index = [self._index_of(v) for v in variables]
        scale = self.loss_scale_factor
        if scale is not None:  # scale_loss() multiplied the loss: measure and clip the true gradient
            grads = [_map_values(lambda t: t / ops.cast(scale, t.dtype), g) for g in grads]
        with tf.control_dependencies(batch_size_checks):  # nothing changes before they hold
            self._apply_checked(grads, variables, index, batch_size)

    def _check_after_each_batch(self) -> None:
        """Under XLA, while the train step is traced: find the Keras model whose step calls this
        optimizer (its ``train_step`` frame, up the stack) and have its train function call
        :meth:`check` after each batch. A custom loop finds none and calls ``check()`` itself."""
        frame = sys._getframe(2)
        for _ in range(64):  # under a LossScaleOptimizer, tracing its cond puts train_step ~20 frames up
            if frame is None:
                return
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.Model):
                opt = getattr(owner, "optimizer", None)
                while opt is not None and opt is not self and isinstance(opt, keras.optimizers.Optimizer):
                    opt = getattr(opt, "inner_optimizer", None)  # through a LossScaleOptimizer
                if opt is self:
                    _CheckedTrainFunction.install(owner, self)
                    return
            frame = frame.f_back

    def _apply_checked(self, grads, variables, index, batch_size):
        replica = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and replica is not None:
            # A replica of a tf.distribute strategy (fit() under MirroredStrategy): measure, decide and
            # clip once, in a cross-replica context, on the gradient summed over the replicas, so that
            # every replica takes the same decision and the step equals one on the whole global batch.
            summed = replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            if batch_size is not None:  # the global batch: the replicas' samples summed
                batch_size = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(batch_size, "float32"))
            replica.merge_call(lambda strategy, summed, n: self._accumulate(
                [strategy.experimental_local_results(g)[0] for g in summed], variables, index, strategy,
                None if n is None else strategy.experimental_local_results(n)[0]),
                args=(summed, batch_size))
            return
        self._accumulate(grads, variables, index, self._cross_replica_strategy(), batch_size)

    def _overwrite_with_gradients(self, pairs):
        """As Keras' optimizers do, before anything else: the variable takes its gradient's value;
        over an accumulation window, the maximum of the window's values at its last micro-batch."""
        k = self.accumulation_steps
        for g, v in pairs:
            if k == 1:
                v.assign(g)
                continue
            held = self.accumulator.sums[self._index_of(v)]
            last = (self.micro_step + 1) % k == 0
            top = ops.maximum(g, held)
            v.assign(ops.where(last, top, v))
            held.assign(ops.where(last, ops.zeros_like(top), top))

    @staticmethod
    def _cross_replica_strategy():
        """The strategy when called in its cross-replica context (eagerly, under ``strategy.scope()``)."""
        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
            return tf.distribute.get_strategy()
        return None

    def _accumulate(self, grads, variables, index, strategy, batch_size=None):
        self.accumulator.add(grads, lambda window: self._apply_window(window, variables, index, strategy), index,
                             weight=batch_size)

    def flush(self) -> bool:
        """Apply a partial accumulation window now (eagerly), e.g. at an epoch's end.

        The window's gradient is the mean over the micro-batches it holds, weighted by
        their samples where ``apply`` was given ``batch_size``: the step then equals one
        on their concatenation (without it, only when they have the same size). Returns
        True if a step was taken (or skipped by the guard), False if the window was empty.
        Without it, a partial window carries over into the next epoch's first window::

            keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: opt.flush())
        """
        if not self.built:
            return False
        index = list(self.accumulator.index)  # the variables of the window it holds
        variables = [self._trainable_variables[i] for i in index]
        strategy = self._cross_replica_strategy()
        return self.accumulator.flush(lambda window: self._apply_window(window, variables, index, strategy))

    @_plain_python
    def apply_gradients(self, grads_and_vars):
        grads, variables = zip(*grads_and_vars)
        self.apply(list(grads), list(variables))
        return self.iterations
