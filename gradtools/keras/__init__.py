"""gradtools for Keras 3 (TensorFlow backend).

Importing this module imports Keras quietly (see :mod:`gradtools.runtime`).
Public names match :mod:`gradtools.torch` wherever the concept is shared:
``mlp``, ``train_full_batch``, ``grad_stats``, ``NonFiniteGradientError``,
``TooManySkipsError``; Keras idioms where they differ (an optimizer wrapper and
callbacks instead of explicit calls in a training loop).
"""

from gradtools.runtime import import_keras as _import_keras

_import_keras()

from gradtools.guard import NonFiniteGradientError, TooManySkipsError  # noqa: E402
from gradtools.keras.callbacks import GradientLogger  # noqa: E402
from gradtools.keras.clipping import compare_clipping  # noqa: E402
from gradtools.keras.lr_range import LRRangeTest, top_hessian_eigenvalue  # noqa: E402
from gradtools.keras.models import grad_stats, mlp, train_full_batch  # noqa: E402
from gradtools.keras.optimizer import GradOptimizer, accumulation_aware  # noqa: E402
from gradtools.keras.toys import activation_gradients, rnn, rnn_input_gradients, sgd_on_quadratic  # noqa: E402

__all__ = ["GradOptimizer", "activation_gradients", "GradientLogger", "LRRangeTest", "NonFiniteGradientError", "TooManySkipsError",
           "accumulation_aware", "compare_clipping", "grad_stats", "mlp", "rnn", "rnn_input_gradients",
           "sgd_on_quadratic", "top_hessian_eigenvalue", "train_full_batch"]
