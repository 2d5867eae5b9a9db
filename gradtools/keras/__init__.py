"""gradtools for Keras 3 (TensorFlow backend).

Importing this module imports Keras quietly and changes nothing global (see
:mod:`gradtools.runtime`). The modules mirror :mod:`gradtools.torch` one for one:
``norms``, ``clip``, ``guard``, ``accumulate``, ``monitor``, ``lr_range``,
``sharpness``, ``flow``, ``models``, ``toys``, ``optim``, ``schedules``, ``transformer``, ``diagnose`` and ``spikes``; shared names mean the same thing in both.
Where PyTorch changes gradients in place (``clip_grad_norm_``), Keras returns them
(``clip_grad_norm``), since Keras gradients are values. The Keras idiom adds
:class:`GradOptimizer`, which composes the guard, a clipper, AGC and accumulation
around any optimizer for plain ``model.fit()``, and the callbacks
:class:`GradientLogger` and :class:`LRRangeTest`.
"""

from gradtools.runtime import import_keras as _import_keras

_import_keras()

from gradtools.keras.accumulate import AccumulationAware, GradientAccumulator, accumulation_aware  # noqa: E402
from gradtools.keras.clip import (  # noqa: E402
    Clipper,
    ClipResult,
    adaptive_clip_grad,
    clip_grad_norm,
    clip_grad_value,
    clip_grads_with_norm,
    compare_clipping,
    direction_change,
    unit_ratios,
)
from gradtools.keras.diagnose import AttentionLogits, Rollback, train_lm  # noqa: E402
from gradtools.keras.guard import GradGuard, GuardCheck, NonFiniteGradientError, TooManySkipsError  # noqa: E402
from gradtools.keras.lr_range import LRRangeResult, LRRangeTest  # noqa: E402
from gradtools.keras.flow import LayerGradients, layer_gradients  # noqa: E402
from gradtools.keras.models import loss_gradients, mlp, residual_mlp, train_full_batch, weight_penalty  # noqa: E402
from gradtools.keras.monitor import GradientLogger  # noqa: E402
from gradtools.keras.norms import GradStats, get_total_norm, grad_stats, snapshot, update_ratios  # noqa: E402
from gradtools.keras.optim import make_optimizer, train, update_sizes  # noqa: E402
from gradtools.keras.optimizer import GradOptimizer  # noqa: E402
from gradtools.keras.schedules import OneCycle, Warmup, learning_rates  # noqa: E402
from gradtools.keras.spikes import SPAM, AdaGC, clip_grad_norm_per_tensor, compare_defences  # noqa: E402
from gradtools.keras.sharpness import hessian_vector_product, top_hessian_eigenvalue  # noqa: E402
from gradtools.keras.transformer import CausalSelfAttention, Transformer, transformer, z_loss  # noqa: E402
from gradtools.keras.toys import activation_gradients, rnn, rnn_input_gradients, sgd_on_quadratic  # noqa: E402

__all__ = [
    "accumulation_aware", "AccumulationAware", "activation_gradients", "AdaGC", "clip_grad_norm_per_tensor",
    "compare_defences", "SPAM", "adaptive_clip_grad", "AttentionLogits",
    "CausalSelfAttention", "clip_grad_norm", "clip_grad_value", "clip_grads_with_norm", "Clipper", "ClipResult",
    "compare_clipping", "direction_change", "get_total_norm", "grad_stats", "GradGuard", "GradientAccumulator",
    "GradientLogger", "GradOptimizer", "GradStats", "GuardCheck", "hessian_vector_product", "layer_gradients",
    "LayerGradients", "learning_rates", "loss_gradients", "LRRangeResult", "LRRangeTest", "make_optimizer", "mlp",
    "NonFiniteGradientError", "OneCycle", "residual_mlp", "rnn", "rnn_input_gradients", "Rollback",
    "sgd_on_quadratic", "snapshot", "TooManySkipsError", "top_hessian_eigenvalue", "train", "train_full_batch",
    "train_lm", "Transformer", "transformer", "unit_ratios", "update_ratios", "update_sizes", "Warmup",
    "weight_penalty", "z_loss"
]
