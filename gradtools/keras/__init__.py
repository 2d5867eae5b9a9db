"""gradtools for Keras 3 (TensorFlow backend).

Importing this module imports Keras quietly (see :mod:`gradtools.runtime`).
Public names match :mod:`gradtools.torch` wherever the concept is shared.
"""

from gradtools.runtime import import_keras as _import_keras

_import_keras()

from gradtools.keras.models import mlp, train_full_batch  # noqa: E402

__all__ = ["mlp", "train_full_batch"]
