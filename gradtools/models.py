"""Framework-free model weights, so PyTorch and Keras start from the same numbers.

:func:`init_mlp` draws the weights of a multilayer perceptron with NumPy; the
backends build a model from them (``gradtools.torch.mlp``, ``gradtools.keras.mlp``).
Kernels are stored as ``(fan_in, fan_out)``, Keras' layout; the PyTorch backend
transposes.
"""

from __future__ import annotations

import numpy as np

from gradtools import _checks

__all__ = ["init_mlp", "INITS"]

#: Standard deviation of each initialisation as a function of (fan_in, fan_out).
INITS = {
    "normal": lambda fan_in, fan_out: 1.0,  # N(0, 1): the classic way to explode
    "xavier": lambda fan_in, fan_out: np.sqrt(2.0 / (fan_in + fan_out)),  # Glorot & Bengio, 2010
    "he": lambda fan_in, fan_out: np.sqrt(2.0 / fan_in),  # He et al., 2015
}


def init_mlp(sizes, init: str = "he", seed: int = 0, gain: float = 1.0):
    """Weights of an MLP with layer widths ``sizes`` (input first, output last).

    Args:
        sizes (sequence of int): e.g. ``[64, 128, 128, 10]``.
        init (str): ``"he"`` (default), ``"xavier"`` or ``"normal"`` (N(0, 1)).
        seed (int): NumPy seed.
        gain (float): multiplies every standard deviation (gain > 1 pushes
            towards explosion, < 1 towards vanishing).

    Returns:
        list of ``(kernel, bias)`` float32 arrays, kernels shaped (fan_in, fan_out),
        biases zero. Weights are Gaussian.
    """
    sizes = [_checks.integer(f"sizes[{i}]", s, minimum=1) for i, s in enumerate(sizes)]
    if len(sizes) < 2:
        raise ValueError(f"sizes must hold at least an input and an output width, got {sizes!r}")
    _checks.choice("init", init, set(INITS))
    gain = _checks.positive("gain", gain)
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        std = gain * INITS[init](fan_in, fan_out)
        kernel = (std * rng.standard_normal((fan_in, fan_out))).astype(np.float32)
        weights.append((kernel, np.zeros(fan_out, dtype=np.float32)))
    return weights
