"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` or ``TypeError`` whose message names the
argument and repeats the value it got, e.g.
``max_norm must be a positive finite number, got -1.0``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def real(name: str, value) -> float:
    """A real number (int or float, not bool); returns it as float."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def positive(name: str, value, *, allow_inf: bool = False) -> float:
    """A number > 0, finite unless ``allow_inf``."""
    v = real(name, value)
    if math.isnan(v) or v <= 0 or (math.isinf(v) and not allow_inf):
        kind = "a positive number (inf allowed)" if allow_inf else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return v


def non_negative(name: str, value) -> float:
    v = real(name, value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def in_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False) -> float:
    """A finite number in [low, high]; either end may be open."""
    v = real(name, value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lb}{low}, {high}{rb}, got {value!r}")
    return v


def integer(name: str, value, *, minimum: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return v


def norm_type(name: str, value) -> float:
    """A p-norm order: a real number >= 1 or inf (what torch.nn.utils accepts in practice)."""
    if isinstance(value, str) and value.lower() in {"inf", "infinity"}:
        return math.inf
    v = real(name, value)
    if math.isnan(v) or v < 1:
        raise ValueError(f"{name} must be a number >= 1 or inf (a p-norm), got {value!r}")
    return v


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return value


def names(name: str, value) -> tuple:
    """A tuple of strings from one string or an iterable of them."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a string or an iterable of strings, got {type(value).__name__}")
    out = tuple(value)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    return out


def boolean(name: str, value) -> bool:
    """``value`` if it is a bool (NumPy's included); anything else is an error naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)
