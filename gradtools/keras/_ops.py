"""The :mod:`gradtools._ops` namespace in TensorFlow operations, for Keras 3.

The policies' and the guard's maths (:mod:`gradtools.policies`,
:mod:`gradtools.guard`) runs with these operations inside the train step, so
that ``GradOptimizer`` takes its decisions in the graph: no ``tf.py_function``,
nothing read back to the host, and the step compiles with XLA
(``model.compile(..., jit_compile=True)``). The state is float64 (int64
counters), as in NumPy, held in TensorFlow variables: a traced step updates the
very variables it captured, so the state stays in them (:attr:`TensorFlowOps.pinned`)
and is read or loaded in place.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _dtype_of(value):
    """The float64/int64/bool dtype a Python constant takes in the state's maths."""
    if isinstance(value, (bool, np.bool_)):
        return tf.bool
    if isinstance(value, (int, np.integer)):
        return tf.int64
    return tf.float64


class TensorFlowOps:
    """TensorFlow operations; the state arrays are TensorFlow variables, created eagerly."""

    key = ("tensorflow",)
    float = tf.float64
    int = tf.int64
    #: The state cannot move to another namespace: a traced step holds its variables.
    pinned = True

    @staticmethod
    def _tensor(value, dtype=None):
        if isinstance(value, (tf.Tensor, tf.Variable)):
            value = tf.convert_to_tensor(value)
            return value if dtype is None or value.dtype == dtype else tf.cast(value, dtype)
        return tf.constant(value, dtype=dtype if dtype is not None else _dtype_of(value))

    def asarray(self, value, dtype=None):
        return self._tensor(value, dtype)

    def full(self, n: int, value, dtype=tf.float64):
        return tf.fill([n], tf.constant(value, dtype))

    @staticmethod
    def arange(n: int):
        return tf.range(n, dtype=tf.int64)

    def where(self, cond, a, b):
        tensors = [x for x in (a, b) if isinstance(x, (tf.Tensor, tf.Variable))]
        dtype = tf.convert_to_tensor(tensors[0]).dtype if tensors else _dtype_of(a)
        return tf.where(self._tensor(cond, tf.bool), self._tensor(a, dtype), self._tensor(b, dtype))

    sqrt = staticmethod(tf.sqrt)
    cos = staticmethod(tf.cos)
    abs = staticmethod(tf.abs)
    isfinite = staticmethod(tf.math.is_finite)

    @staticmethod
    def sum(x):
        """Left to right, as :meth:`gradtools._ops.NumpyOps.sum`."""
        return tf.math.cumsum(x)[-1]

    def minimum(self, a, b):
        if not isinstance(a, (tf.Tensor, tf.Variable)):
            a, b = b, a
        a = self._tensor(a)
        return tf.minimum(a, self._tensor(b, a.dtype))

    def maximum(self, a, b):
        if not isinstance(a, (tf.Tensor, tf.Variable)):
            a, b = b, a
        a = self._tensor(a)
        return tf.maximum(a, self._tensor(b, a.dtype))

    @staticmethod
    def sort(x):
        return tf.sort(x)

    @staticmethod
    def floor_int(x):
        return tf.cast(tf.floor(x), tf.int64)

    @staticmethod
    def astype(x, dtype):
        return tf.cast(x, dtype)

    @staticmethod
    def take(x, index):
        return tf.gather(x, index)

    # --- moving state in and out --------------------------------------------------------
    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return np.asarray(x.numpy())

    @staticmethod
    def from_numpy(a: np.ndarray):
        with tf.init_scope():  # eagerly, also while a train step is being traced
            return tf.Variable(np.array(a), trainable=False, name="gradtools_state")

    @staticmethod
    def assign(state: dict, new: dict) -> None:
        """In place, so that a traced step keeps updating the very variables it captured."""
        for k, v in new.items():
            state[k].assign(tf.cast(v, state[k].dtype) if isinstance(v, (tf.Tensor, tf.Variable)) else v)


TENSORFLOW = TensorFlowOps()
