"""What both backends share, framework-free: the records :class:`GradStats` and
:class:`ClipResult`, and :class:`ClipperBase`, the policy-driven clipper's logic.

``gradtools.torch`` fills them with PyTorch tensors, ``gradtools.keras`` with
TensorFlow tensors; the fields and methods mean the same in both. Tensors stay
where they were computed until a method (or the caller) reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradtools import _checks
from gradtools.policies import get_policy

__all__ = ["GradStats", "ClipResult", "ClipperBase", "LayerGradients"]


def _tolist(tensor) -> list:
    """A 1-d tensor of either framework (or a NumPy array) as a Python list."""
    if hasattr(tensor, "tolist"):  # torch.Tensor, numpy.ndarray
        return tensor.tolist()
    return tensor.numpy().tolist()  # tf.Tensor


class GradStats:
    """Gradient statistics of one step; tensors stay on the device until read.

    ``names``: the parameters (PyTorch module paths such as ``"0.weight"``) or
    variables (Keras paths such as ``"sequential/dense_0/kernel"``) that had a
    gradient (a compiled step names them when they are first read); ``norms``: a
    1-d tensor of their norms in that order; ``total``: the 0-d global norm (the
    norm of ``norms``, as ``torch.nn.utils.get_total_norm`` computes it);
    ``nonfinite``: a 1-d int64 tensor of inf/nan entry counts, or
    None when they were not counted (PyTorch counts them when first read, from
    the gradients as they are then); ``norm_type``: the p of the p-norm.
    """

    def __init__(self, names, norms, total, nonfinite=None, norm_type: float = 2.0):
        self._names, self.norms, self.total, self.norm_type = names, norms, total, norm_type
        self._nonfinite, self._count = nonfinite, None

    @property
    def names(self) -> list:
        if callable(self._names):  # resolved when first read (a compiled step makes no strings)
            self._names = list(self._names())
        return self._names

    @names.setter
    def names(self, value) -> None:
        self._names = value

    def count_with(self, count) -> None:
        """Count the non-finite entries with ``count()`` when ``nonfinite`` is first read."""
        self._nonfinite, self._count = None, count

    @property
    def nonfinite(self):
        if self._nonfinite is None and self._count is not None:
            self._nonfinite, self._count = self._count(), None
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value) -> None:
        self._nonfinite, self._count = value, None

    def __repr__(self) -> str:
        return f"GradStats(names={self.names!r}, total={self.total!r}, norm_type={self.norm_type})"

    def as_dict(self) -> dict:
        """Plain Python numbers: ``total_norm``, ``norms`` and ``nonfinite`` by name."""
        out = {"total_norm": float(self.total), "norms": dict(zip(self.names, _tolist(self.norms)))}
        nonfinite = self.nonfinite
        if nonfinite is not None:
            out["nonfinite"] = dict(zip(self.names, (int(c) for c in _tolist(nonfinite))))
        return out

    def first_nonfinite(self) -> str | None:
        """Name of the first parameter with a non-finite entry, or None."""
        nonfinite = self.nonfinite
        if nonfinite is not None:
            bad = [i for i, c in enumerate(_tolist(nonfinite)) if c]
        else:
            bad = [i for i, n in enumerate(_tolist(self.norms)) if not math.isfinite(n)]
        return self.names[bad[0]] if bad else None

    def is_finite(self) -> bool:
        """Whether the global norm is finite (then every entry is)."""
        return math.isfinite(float(self.total))


@dataclass
class LayerGradients:
    """Gradient flow through a model: one entry per weight matrix, input side first.

    ``names``: the layers (PyTorch module paths such as ``"blocks.3"``, Keras layer
    paths such as ``"sequential/dense_3"``); ``grad_norms`` and ``weight_norms``:
    NumPy arrays of the Frobenius norms of each weight matrix's gradient and of the
    matrix itself; ``loss``: the loss value the gradients are of (penalties included).
    """

    names: list
    grad_norms: np.ndarray
    weight_norms: np.ndarray
    loss: float

    @property
    def ratios(self) -> np.ndarray:
        """``||dL/dW|| / ||W||`` per layer: how far one SGD step of lr 1 would move each layer, relatively."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.grad_norms / self.weight_norms

    def spread(self) -> float:
        """Largest over smallest gradient norm across the layers (1: perfectly even flow)."""
        return float(np.max(self.grad_norms) / np.min(self.grad_norms))

    def as_dict(self) -> dict:
        """``{name: gradient norm}`` as Python floats."""
        return {n: float(g) for n, g in zip(self.names, self.grad_norms)}


@dataclass
class ClipResult:
    """What one call of a ``Clipper`` did: norms before and after, the threshold used."""

    norm_before: object
    norm_after: object
    threshold: float
    clipped: bool


class ClipperBase:
    """A clipping policy plus the rescaling; the backends provide ``_measure`` and ``clip_to``.

    ``__call__`` asks the policy for this step's threshold and clips to it;
    ``clip_to`` clips to a threshold decided elsewhere (a guard's decider asks the
    policy itself, so that a skipped step never enters the policy's history).
    """

    def __init__(self, policy, norm_type: float = 2.0):
        self.policy = get_policy(policy)
        self.norm_type = _checks.norm_type("norm_type", norm_type)

    def __repr__(self):
        return f"{type(self).__name__}({self.policy!r}, norm_type={self.norm_type})"

    def _measure(self, grads, stats, norm):  # pragma: no cover - provided by the backends
        raise NotImplementedError

    def clip_to(self, grads, threshold: float, stats=None, norm: float | None = None):  # pragma: no cover
        raise NotImplementedError

    def __call__(self, grads, stats=None, norm: float | None = None):
        grads, stats, norm = self._measure(grads, stats, norm)
        return self.clip_to(grads, self.policy.step(norm), stats, norm)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "norm_type": self.norm_type}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "policy" not in state_dict:
            raise ValueError(f"state_dict must be a dict with a 'policy' key, got {state_dict!r}")
        norm_type = _checks.norm_type("state_dict['norm_type']", state_dict.get("norm_type", self.norm_type))
        self.policy.load_state_dict(state_dict["policy"])
        self.norm_type = norm_type
