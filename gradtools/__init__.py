"""gradtools: measure, clip and guard gradients in PyTorch and Keras 3.

The top-level package is light: it imports neither PyTorch nor TensorFlow.
Framework code lives in :mod:`gradtools.torch` and :mod:`gradtools.keras`,
which share the framework-free policies in :mod:`gradtools.policies`.

Example:

>>> import gradtools
>>> from gradtools.policies import AutoClip
>>> AutoClip(percentile=50).step(3.0)
3.0
"""

__version__ = "0.1.0"

from gradtools import policies  # noqa: E402  (NumPy only)

__all__ = ["__version__", "policies"]
