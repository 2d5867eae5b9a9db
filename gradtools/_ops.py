"""The few array operations the policies' maths needs, one namespace per framework.

The clipping policies, the spike detector and the guard's decider are written
once, in :mod:`gradtools.policies` and :mod:`gradtools.guard`, as functions of
their state (a dict of 0-d and 1-d arrays) and of an ``xp`` namespace with the
operations below. :data:`NUMPY` is the reference the book explains and the tests
compare against; ``gradtools.torch`` passes a namespace of PyTorch operations on
the gradients' device, so that the same maths runs as tensor operations: no
value is read to the host, and ``torch.compile(fullgraph=True)`` traces it;
``gradtools.keras`` passes TensorFlow operations on variables, so that the maths
runs inside the train step and compiles with XLA.

The state is float64 (counters int64) in every framework, so that a policy's
running statistics do not depend on the precision of the gradients.

Every function takes and returns arrays of the namespace; Python numbers are
accepted where an operand may be a constant. Branches are written with
``where``: both sides are computed and one is kept, so the NumPy namespace
evaluates ``inf - inf`` on the side that is thrown away (warnings are off
inside :meth:`NumpyOps.run`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["NumpyOps", "NUMPY"]


class NumpyOps:
    """The reference namespace: NumPy, float64 state, on the host."""

    key = ("numpy",)
    float = np.float64
    int = np.int64

    def asarray(self, value, dtype=None):
        return np.asarray(value, dtype=dtype)

    def full(self, n: int, value, dtype=np.float64):
        return np.full(n, value, dtype=dtype)

    def arange(self, n: int):
        return np.arange(n, dtype=np.int64)

    where = staticmethod(np.where)
    sqrt = staticmethod(np.sqrt)
    cos = staticmethod(np.cos)
    abs = staticmethod(np.abs)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    isfinite = staticmethod(np.isfinite)
    sort = staticmethod(np.sort)

    @staticmethod
    def sum(x):
        """Left to right (a running sum): NumPy's pairwise ``sum`` and PyTorch's vectorised one
        round differently, a running sum the same on the CPU."""
        return np.cumsum(x)[-1]

    @staticmethod
    def floor_int(x):
        return np.floor(x).astype(np.int64)

    @staticmethod
    def astype(x, dtype):
        return np.asarray(x).astype(dtype)

    @staticmethod
    def take(x, index):
        return x[index]

    # --- moving state in and out --------------------------------------------------------
    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return np.asarray(x)

    @staticmethod
    def from_numpy(a: np.ndarray):
        return np.array(a)

    @staticmethod
    def assign(state: dict, new: dict) -> None:
        state.update({k: np.asarray(v) for k, v in new.items()})

    @staticmethod
    def run(fn, *args):
        with np.errstate(all="ignore"):  # where() computes the side it throws away too
            return fn(*args)


NUMPY = NumpyOps()


def select(flag, new: dict, old: dict, xp) -> dict:
    """``new`` where ``flag`` holds, else ``old``, key by key (a masked state update)."""
    return {k: xp.where(flag, new[k], old[k]) for k in old}


def ring_push(buf, count, value, keep, xp):
    """Write ``value`` into the ring buffer ``buf`` at slot ``count % len(buf)`` if ``keep``.

    Returns the new buffer and count. The slots in use are the first ``min(count, len)``.
    """
    size = buf.shape[0]
    slot = xp.arange(size) == (count % size)
    return xp.where(slot & keep, value, buf), count + xp.where(keep, 1, 0)


def ring_list(buf, count) -> list:
    """The values of a ring buffer (NumPy), oldest first, as Python floats."""
    buf, count = np.asarray(buf), int(count)
    size = buf.shape[0]
    if count <= size:
        return [float(x) for x in buf[:count]]
    start = count % size
    return [float(x) for x in np.concatenate([buf[start:], buf[:start]])]


def ring_from(values, size: int, fill=np.inf) -> tuple[np.ndarray, np.ndarray]:
    """A ring buffer (NumPy) and count holding ``values`` oldest first."""
    values = [float(x) for x in values]
    buf = np.full(size, fill, dtype=np.float64)
    buf[: len(values)] = values
    return buf, np.asarray(len(values), dtype=np.int64)


def masked_mean_var(buf, count, xp):
    """Mean and (population) variance of the ring buffer's slots in use, and their number."""
    size = buf.shape[0]
    n = xp.minimum(count, size)
    valid = xp.arange(size) < n
    denom = xp.astype(xp.maximum(n, 1), xp.float)
    mean = xp.sum(xp.where(valid, buf, 0.0)) / denom
    var = xp.sum(xp.where(valid, (buf - mean) ** 2, 0.0)) / denom
    return mean, var, n
