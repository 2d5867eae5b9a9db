"""gradtools for PyTorch: norms, clipping, guards, accumulation, LR range test, sharpness.

The modules (``norms``, ``clip``, ``guard``, ``accumulate``, ``monitor``,
``lr_range``, ``sharpness``, ``flow``, ``models``, ``toys``, ``optim``,
``schedules``, ``transformer``, ``diagnose``, ``spikes``) have twins of the same names in
:mod:`gradtools.keras`, and the public names match wherever the concept is shared.
"""

from gradtools.torch.accumulate import Accumulator
from gradtools.torch.clip import (
    ClipResult,
    Clipper,
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    direction_change,
    unit_ratios,
)
from gradtools.torch.diagnose import AttentionLogits, Rollback, train_lm
from gradtools.torch.guard import GradGuard, GuardResult, NonFiniteGradientError, TooManySkipsError
from gradtools.torch.lr_range import LRRangeResult, lr_range_test
from gradtools.torch.flow import LayerGradients, layer_gradients
from gradtools.torch.models import ResidualMLP, mlp, residual_mlp, train_full_batch, weight_penalty
from gradtools.torch.monitor import Monitor
from gradtools.torch.norms import GradStats, get_total_norm, grad_stats, snapshot, update_ratios
from gradtools.torch.optim import make_optimizer, train, update_sizes
from gradtools.torch.schedules import Warmup, learning_rates
from gradtools.torch.spikes import SPAM, AdaGC, clip_grad_norm_per_tensor_, compare_defences
from gradtools.torch.sharpness import hessian_vector_product, top_hessian_eigenvalue
from gradtools.torch.transformer import CausalSelfAttention, Transformer, transformer, z_loss
from gradtools.torch.toys import activation_gradients, rnn, rnn_input_gradients, sgd_on_quadratic, sharpness_during_gd

__all__ = [
    "Accumulator", "activation_gradients", "AdaGC", "clip_grad_norm_per_tensor_", "compare_defences", "SPAM", "adaptive_clip_grad_", "AttentionLogits", "CausalSelfAttention",
    "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "Clipper", "ClipResult", "direction_change",
    "get_total_norm", "grad_stats", "GradGuard", "GradStats", "GuardResult", "hessian_vector_product",
    "layer_gradients", "LayerGradients", "learning_rates", "lr_range_test", "LRRangeResult", "make_optimizer", "mlp",
    "Monitor", "NonFiniteGradientError", "residual_mlp", "ResidualMLP", "rnn", "rnn_input_gradients", "Rollback",
    "sgd_on_quadratic", "sharpness_during_gd", "snapshot", "TooManySkipsError", "top_hessian_eigenvalue", "train",
    "train_full_batch", "train_lm", "Transformer", "transformer", "unit_ratios", "update_ratios", "update_sizes",
    "Warmup", "weight_penalty", "z_loss"
]
