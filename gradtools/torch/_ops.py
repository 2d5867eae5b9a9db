"""The :mod:`gradtools._ops` namespace in PyTorch operations, on one device.

The policies' and the guard's maths (:mod:`gradtools.policies`,
:mod:`gradtools.guard`) runs with these operations on the gradients' device:
no value is read back to the host, and ``torch.compile(fullgraph=True)``
traces every line. The state is float64 (int64 counters), as in NumPy.
"""

from __future__ import annotations

import numpy as np
import torch


def _tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


class TorchOps:
    """PyTorch operations creating their arrays on ``device``."""

    float = torch.float64
    int = torch.int64

    def __init__(self, device):
        self.device = torch.device(device)
        self.key = ("torch", str(self.device))

    def asarray(self, value, dtype=None):
        if _tensor(value):
            return value if dtype is None else value.to(dtype)
        return torch.tensor(value, dtype=dtype, device=self.device)

    def full(self, n: int, value, dtype=torch.float64):
        return torch.full((n,), value, dtype=dtype, device=self.device)

    def arange(self, n: int):
        return torch.arange(n, device=self.device)

    @staticmethod
    def where(cond, a, b):
        return torch.where(cond, a, b)

    sqrt = staticmethod(torch.sqrt)
    cos = staticmethod(torch.cos)
    abs = staticmethod(torch.abs)
    isfinite = staticmethod(torch.isfinite)

    @staticmethod
    def sum(x):
        """Left to right, as :meth:`gradtools._ops.NumpyOps.sum` (on the CPU, bit for bit)."""
        return torch.cumsum(x, 0)[-1]

    @staticmethod
    def minimum(a, b):
        if not _tensor(a):
            a, b = b, a
        return torch.minimum(a, b) if _tensor(b) else torch.clamp(a, max=b)

    @staticmethod
    def maximum(a, b):
        if not _tensor(a):
            a, b = b, a
        return torch.maximum(a, b) if _tensor(b) else torch.clamp(a, min=b)

    @staticmethod
    def sort(x):
        return torch.sort(x).values

    @staticmethod
    def floor_int(x):
        return torch.floor(x).to(torch.int64)

    @staticmethod
    def astype(x, dtype):
        return x.to(dtype)

    @staticmethod
    def take(x, index):
        return torch.index_select(x, 0, index.reshape(1)).reshape(())

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return x.detach().cpu().numpy()

    def from_numpy(self, a: np.ndarray):
        return torch.as_tensor(np.array(a), device=self.device)

    @staticmethod
    def assign(state: dict, new: dict) -> None:
        """In place, so that a compiled step keeps updating the very tensors it was traced with."""
        for k, v in new.items():
            state[k].copy_(v)


_OPS: dict = {}


def ops_on(device) -> TorchOps:
    """The namespace for ``device`` (one object per device, so the state is moved only once)."""
    key = str(torch.device(device))
    if key not in _OPS:
        _OPS[key] = TorchOps(device)
    return _OPS[key]
