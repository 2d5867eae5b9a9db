"""Offline data: datasets that ship with scikit-learn and seeded synthetic tasks.

Nothing here touches the network. Every generator takes a ``seed`` and returns
``float32`` NumPy arrays, so PyTorch and Keras see exactly the same numbers.
"""

from __future__ import annotations

import numpy as np

from gradtools import _checks

__all__ = ["digits", "teacher_student", "adding_problem", "random_quadratic", "zen_of_python", "char_tokens",
           "lm_batches"]


def digits(standardize: bool = True, one_hot: bool = False):
    """scikit-learn's 8x8 handwritten digits (1797 samples, bundled with the package).

    Returns ``(x, y)``: ``x`` of shape (1797, 64) float32, standardised per
    pixel if asked (constant pixels stay 0); ``y`` int64 labels, or float32
    one-hot of shape (1797, 10).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float64)
    if standardize:
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    y = bunch.target.astype(np.int64)
    if one_hot:
        y = np.eye(10, dtype=np.float32)[y]
    return x.astype(np.float32), y


def teacher_student(n: int = 512, d: int = 32, noise: float = 0.1, seed: int = 0):
    """Regression targets from a random linear teacher: ``y = x w* + noise``.

    Returns ``(x, y)`` with shapes (n, d) and (n, 1), float32.
    """
    n = _checks.integer("n", n, minimum=1)
    d = _checks.integer("d", d, minimum=1)
    noise = _checks.non_negative("noise", noise)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal((d, 1)) / np.sqrt(d)
    y = x @ w + noise * rng.standard_normal((n, 1))
    return x.astype(np.float32), y.astype(np.float32)


def adding_problem(n: int = 256, length: int = 50, seed: int = 0):
    """The adding problem (Hochreiter & Schmidhuber, 1997).

    Each sequence has two channels: uniform values in [0, 1), and a marker that
    is 1 at exactly two positions (one in each half). The target is the sum of
    the two marked values, so the answer depends on early time steps.

    Returns ``(x, y)`` of shapes (n, length, 2) and (n, 1), float32.
    """
    n = _checks.integer("n", n, minimum=1)
    length = _checks.integer("length", length, minimum=2)
    rng = np.random.default_rng(seed)
    values = rng.random((n, length))
    markers = np.zeros((n, length))
    half = length // 2
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, length, size=n)
    markers[np.arange(n), first] = 1.0
    markers[np.arange(n), second] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = (values * markers).sum(axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.float32)


def random_quadratic(dim: int = 10, condition: float = 10.0, seed: int = 0):
    """A random symmetric positive-definite matrix with eigenvalues in [1, condition].

    Returns ``(A, eigenvalues)``; ``f(x) = x^T A x / 2`` has Hessian ``A``.
    """
    dim = _checks.integer("dim", dim, minimum=1)
    condition = _checks.positive("condition", condition)
    if condition < 1:
        raise ValueError(f"condition must be >= 1, got {condition!r}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eig = np.sort(np.concatenate([[1.0, condition], rng.uniform(1.0, condition, dim - 2)]))[:dim] if dim > 1 else np.array([condition])
    return (q * eig) @ q.T, eig


def zen_of_python() -> str:
    """The Zen of Python (PEP 20), the text of the standard library's ``this`` module.

    Read from the module's source without importing it (``import this`` prints
    the poem); the text has not changed since Python 2.2, so every reader gets
    the same 856 characters.
    """
    import ast
    import codecs
    import importlib.util

    source = importlib.util.find_spec("this").loader.get_source("this")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["s"]:
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    raise RuntimeError("the standard library's this.py holds no string 's'")  # pragma: no cover


def char_tokens(text: str):
    """``(ids, vocab)``: ``text`` as int64 character ids into ``vocab``, its sorted distinct characters.

    Example:
        >>> ids, vocab = char_tokens("abba")
        >>> ids.tolist(), vocab
        ([0, 1, 1, 0], 'ab')
    """
    if not isinstance(text, str) or len(text) < 2:
        raise ValueError(f"text must be a string of at least 2 characters, got {text!r:.40}")
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    return np.array([index[c] for c in text], dtype=np.int64), vocab


def lm_batches(ids, context: int, batch_size: int, steps: int, seed: int = 0):
    """Next-token training batches: random windows of ``ids``, drawn with a seed.

    Returns ``(x, y)``, int64 arrays of shape (steps, batch_size, context);
    ``y`` is ``x`` shifted by one token, so ``x[s]`` and ``y[s]`` are step
    ``s``'s inputs and targets. The same seed gives every framework the same
    batches.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-d array of integer token ids, got dtype {ids.dtype} and shape {ids.shape}")
    context = _checks.integer("context", context, minimum=1)
    batch_size = _checks.integer("batch_size", batch_size, minimum=1)
    steps = _checks.integer("steps", steps, minimum=1)
    if len(ids) < context + 1:
        raise ValueError(f"context must be below len(ids) = {len(ids)}, got {context}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - context, size=(steps, batch_size))
    windows = ids[starts[..., None] + np.arange(context + 1)].astype(np.int64)
    return windows[..., :-1], windows[..., 1:]
