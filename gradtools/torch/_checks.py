"""Argument checks shared by the PyTorch backend: errors that name the argument and the value."""

from __future__ import annotations

import inspect

import torch


def module(name: str, value) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def optimizer(name: str, value, closure: bool = True) -> torch.optim.Optimizer:
    """An optimizer; with ``closure=False``, one whose ``step()`` needs no closure.

    A closure optimizer (LBFGS) evaluates the loss and the gradients again inside
    ``step()``: after a guard checked them, and outside a window of accumulation.
    """
    if not isinstance(value, torch.optim.Optimizer):
        raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(value).__name__}")
    if not closure:
        param = inspect.signature(type(value).step).parameters.get("closure")
        if param is not None and param.default is inspect.Parameter.empty:
            raise TypeError(
                f"{name} {type(value).__name__} takes a closure: its step() evaluates the loss and gradients "
                "again, after they were checked. Use an optimizer whose step() needs no closure")
    return value


def scheduler(name: str, value):
    """A learning-rate scheduler or None: anything with ``step()`` and ``state_dict()``
    (``LRScheduler``, ``ReduceLROnPlateau``, :class:`gradtools.torch.Warmup`)."""
    if value is not None and not (callable(getattr(value, "step", None)) and hasattr(value, "state_dict")):
        raise TypeError(f"{name} must be a learning-rate scheduler (step(), state_dict()) or None, got {value!r}")
    return value
