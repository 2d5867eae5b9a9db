"""Keras models built from :mod:`gradtools.models` weights, and a full-batch trainer."""

from __future__ import annotations

import numpy as np

from gradtools import _checks
from gradtools.models import _norm_choice as _check_norm
from gradtools.models import _residual_weights
from gradtools.runtime import import_keras

keras = import_keras()
import tensorflow as tf  # noqa: E402

__all__ = ["mlp", "residual_mlp", "train_full_batch", "loss_gradients", "weight_penalty"]

_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "linear": None, "leaky_relu": "leaky_relu"}


def _norm_layer(norm, name: str, dtype=None):
    """Batch or layer norm with the settings of ``gradtools.torch``'s (eps 1e-3; batch-norm momentum 0.9 = torch's 0.1)."""
    if norm == "batch":
        return keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.9, name=f"batchnorm_{name}", dtype=dtype)
    return keras.layers.LayerNormalization(epsilon=1e-3, name=f"layernorm_{name}", dtype=dtype)


def _activation_layer(activation: str, name, dtype=None):
    if activation == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=0.01, name=f"leaky_relu_{name}", dtype=dtype)
    return keras.layers.Activation(_ACTIVATIONS[activation] or "linear", name=f"{activation}_{name}", dtype=dtype)


def _set_dense_weights(model, weights) -> None:
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for layer, (kernel, bias) in zip(dense, weights):
        layer.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])


def mlp(weights, activation: str = "relu", norm: str | None = None, dropout: float = 0.0,
        kernel_regularizer=None, dtype=None) -> "keras.Sequential":
    """A Keras MLP whose Dense layers hold ``weights`` (from ``gradtools.models.init_mlp``).

    Hidden layers use ``activation``; the last layer is linear. Dense layers are
    named ``dense_0``, ``dense_1``, ... so variable paths are stable. ``norm="batch"``
    inserts ``BatchNormalization`` (momentum 0.9, torch's 0.1), ``norm="layer"``
    ``LayerNormalization`` (both eps 1e-3) before each hidden activation;
    ``dropout`` adds ``Dropout(rate)`` after it (the same layout as
    ``gradtools.torch.mlp``). ``kernel_regularizer`` (a Keras regularizer) goes on
    every Dense kernel; ``fit()`` and the gradtools trainers add it to the loss.
    With ``training=True`` the network equals the PyTorch one from the same
    weights; after training, batch norm's moving variance differs slightly (Keras
    updates it with the biased batch variance, PyTorch with the unbiased one).
    ``dtype`` (a dtype policy such as ``"mixed_float16"`` or ``"mixed_bfloat16"``, or
    None for Keras' global policy) goes on every layer: mixed precision for this
    model alone, without ``keras.mixed_precision.set_dtype_policy``'s global state.
    ``compile()`` then adds no ``LossScaleOptimizer`` (Keras does that only under a
    global ``mixed_float16`` policy): for float16, wrap the optimizer yourself,
    ``keras.optimizers.LossScaleOptimizer(opt)``, as chapter 6 does.
    """
    _checks.choice("activation", activation, set(_ACTIVATIONS))
    policy = None
    if dtype is not None:
        message = (f"dtype must be a floating-point Keras dtype policy such as 'mixed_float16', 'mixed_bfloat16' "
                   f"or 'float32', or None, got {dtype!r}")
        try:
            policy = keras.dtype_policies.get(dtype)
        except (ValueError, TypeError) as exc:
            raise ValueError(message) from exc
        floating = all(keras.backend.is_float_dtype(d) for d in (policy.compute_dtype, policy.variable_dtype))
        if not floating or getattr(policy, "quantization_mode", None) is not None:
            raise ValueError(message)
    norm = _check_norm(norm)
    dropout = _checks.in_range("dropout", dropout, 0.0, 1.0, high_open=True)
    first = np.asarray(weights[0][0])
    layers = [keras.Input(shape=(first.shape[0],))]
    for i, (kernel, _) in enumerate(weights):
        hidden = i < len(weights) - 1
        layers.append(keras.layers.Dense(np.shape(kernel)[1], name=f"dense_{i}", kernel_regularizer=kernel_regularizer,
                                         dtype=policy))
        if not hidden:
            break
        if norm is not None:
            layers.append(_norm_layer(norm, i, dtype=policy))
        if activation != "linear":
            layers.append(_activation_layer(activation, i, dtype=policy))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, name=f"dropout_{i}", dtype=policy))
    model = keras.Sequential(layers)
    _set_dense_weights(model, weights)
    return model


def residual_mlp(weights, activation: str = "relu", norm: str | None = None, placement: str = "pre",
                 kernel_regularizer=None) -> "keras.Model":
    """A residual MLP whose Dense layers hold ``weights``: the twin of ``gradtools.torch.residual_mlp``.

    ``h = stem(x)``; each block adds a one-layer branch, ``h = h + W act(N(h))``
    (``placement="pre"``) or ``h = N(h + W act(h))`` (``"post"``); the output is
    ``head(act(N(h)))`` (pre) or ``head(act(h))`` (post). Dense layers are named
    ``dense_0`` (the stem) to ``dense_{L+1}`` (the head), so the kernels come input
    side first, in the same order as the PyTorch model's weight matrices.

    Example:
        >>> import numpy as np
        >>> from gradtools.models import init_residual_mlp
        >>> w = init_residual_mlp(4, 8, blocks=3, out_features=2)
        >>> net = residual_mlp(w, norm="layer")
        >>> net(np.ones((5, 4), np.float32)).shape
        TensorShape([5, 2])
    """
    _checks.choice("activation", activation, set(_ACTIVATIONS))
    norm = _check_norm(norm)
    placement = _checks.choice("placement", placement, {"pre", "post"})
    weights, _ = _residual_weights(weights)

    def dense(i):
        return keras.layers.Dense(np.shape(weights[i][0])[1], name=f"dense_{i}", kernel_regularizer=kernel_regularizer)

    def normed(h, name):
        return h if norm is None else _norm_layer(norm, name)(h)

    inputs = keras.Input(shape=(np.shape(weights[0][0])[0],))
    h = dense(0)(inputs)
    blocks = len(weights) - 2
    for i in range(1, blocks + 1):
        if placement == "pre":
            branch = dense(i)(_activation_layer(activation, i)(normed(h, i)))
            h = keras.layers.Add(name=f"add_{i}")([h, branch])
        else:
            branch = dense(i)(_activation_layer(activation, i)(h))
            h = normed(keras.layers.Add(name=f"add_{i}")([h, branch]), i)
    if placement == "pre":
        h = normed(h, blocks + 1)
    outputs = dense(blocks + 1)(_activation_layer(activation, blocks + 1)(h))
    model = keras.Model(inputs, outputs, name=f"residual_mlp_{placement}")
    _set_dense_weights(model, weights)
    return model


def weight_penalty(model, l1: float = 0.0, l2: float = 0.0):
    """``l1 * sum|W| + l2 * sum W**2`` over ``model``'s kernels: the twin of ``gradtools.torch.weight_penalty``.

    The same value as ``kernel_regularizer=keras.regularizers.L1L2(l1, l2)`` on
    every layer (trainable variables with two or more dimensions), for a custom
    training loop; ``fit()`` users set the regularizer instead.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a keras.Model (or layer), got {type(model).__name__}")
    l1 = _checks.non_negative("l1", l1)
    l2 = _checks.non_negative("l2", l2)
    mats = [v for v in model.trainable_variables if len(v.shape) >= 2]
    dtype = "float64" if any(str(w.dtype) == "float64" for w in mats) else "float32"  # the widest
    total = keras.ops.zeros((), dtype=dtype)
    for w in mats:
        if l1:
            total = total + keras.ops.cast(l1 * keras.ops.sum(keras.ops.abs(w)), dtype)
        if l2:
            total = total + keras.ops.cast(l2 * keras.ops.sum(keras.ops.square(w)), dtype)
    return total


def _as_inputs(model, x):
    """``x`` as the model takes it: one tensor, or one per input (a dict, or a list or tuple of arrays).

    A list or tuple is several inputs when the model declares several, or, for a
    subclassed model that declares none, when it holds arrays or tensors; a list of
    plain numbers or rows is one input.
    """
    if isinstance(x, dict):
        return {k: tf.convert_to_tensor(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x:
        declared = len(getattr(model, "inputs", None) or [])
        if declared > 1 or (declared == 0 and all(hasattr(v, "shape") for v in x)):
            return [tf.convert_to_tensor(v) for v in x]
    return x if tf.is_tensor(x) else tf.convert_to_tensor(np.asarray(x))


def _as_targets(model, y):
    """``y`` as a tensor, unless the model has several outputs (then as given)."""
    if len(getattr(model, "outputs", None) or []) > 1:
        return y
    return y if tf.is_tensor(y) else tf.convert_to_tensor(np.asarray(y))


def _loss(loss):
    """``loss(y_true, y_pred)``: ``"mse"``, ``"crossentropy"`` (integer labels, logits) or a callable."""
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be 'mse', 'crossentropy' or a callable, got {type(loss).__name__}")
    _checks.choice("loss", loss, {"mse", "crossentropy"})
    if loss == "mse":
        return keras.losses.MeanSquaredError()
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def regularization(model, l1: float = 0.0, l2: float = 0.0, dtype="float32"):
    """What ``fit()`` adds to the loss: ``model.losses`` (kernel regularizers, ``add_loss``), plus an optional
    :func:`weight_penalty`, summed in ``dtype`` (the loss's). Call it inside the ``GradientTape``."""
    total = keras.ops.zeros((), dtype=dtype)
    for term in model.losses:
        total = total + keras.ops.cast(term, dtype)
    if l1 or l2:
        total = total + keras.ops.cast(weight_penalty(model, l1=l1, l2=l2), dtype)
    return total


def train_full_batch(model, x, y, lr: float, steps: int, loss: str = "mse", clip_norm: float | None = None,
                     momentum: float = 0.0):
    """Full-batch SGD; returns the loss before each step (floats), like ``gradtools.torch.train_full_batch``.

    ``clip_norm`` uses the optimizer's ``global_clipnorm`` (the same global-norm
    clipping as ``torch.nn.utils.clip_grad_norm_``, not Keras' per-variable
    ``clipnorm``). The step is one compiled ``tf.function`` (GradientTape, then
    ``optimizer.apply``), which is what ``fit()`` runs per batch without its
    per-epoch overhead. As in ``fit()``, the model's regularization losses
    (``model.losses``) are added to the loss.
    """
    lr = _checks.positive("lr", lr)
    steps = _checks.integer("steps", steps, minimum=1)
    kwargs = {} if clip_norm is None else {"global_clipnorm": _checks.positive("clip_norm", clip_norm)}
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum, **kwargs)
    fn = _loss(loss)
    xt, yt = _as_inputs(model, x), _as_targets(model, y)
    variables = model.trainable_variables
    opt.build(variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = fn(yt, model(xt, training=True))
            value = value + regularization(model, dtype=value.dtype)
        opt.apply(tape.gradient(value, variables), variables)
        return value

    return [float(v) for v in [step() for _ in range(steps)]]


def loss_gradients(model, x, y, loss: str = "mse") -> list:
    """Gradients of ``loss`` on one batch for ``model.trainable_variables`` (eager).

    The Keras analogue of ``loss.backward()``: feed the result to
    :func:`gradtools.keras.grad_stats` as ``grad_stats(grads, model)``.
    ``loss`` is ``"mse"`` or ``"crossentropy"`` (integer labels, logits), as in
    :func:`train_full_batch`.
    """
    fn = _loss(loss)
    with tf.GradientTape() as tape:
        value = fn(y, model(x, training=True))
    return tape.gradient(value, model.trainable_variables)
