"""One set-up for every chapter, test and benchmark: seeds, determinism, quiet logs.

Call :func:`setup` at the top of a notebook, before PyTorch or TensorFlow is
imported anywhere. Only ``setup`` and :func:`seed_everything` change a framework's
global state; importing any part of ``gradtools`` never does. ``setup``

* sets ``TF_CPP_MIN_LOG_LEVEL``, ``TF_ENABLE_ONEDNN_OPTS=0`` and
  ``TF_DETERMINISTIC_OPS`` before TensorFlow can read them (only when Keras is
  among the frameworks);
* seeds Python, NumPy, and (if asked) PyTorch and Keras;
* sets TensorFlow's Python loggers to errors only;
* turns on each framework's deterministic mode;
* imports TensorFlow with the C-level stderr silenced, because TensorFlow's C++
  logging writes a few lines ("Could not find cuda drivers", "All log messages
  before absl::InitializeLog()") before any environment variable takes effect,
  and Jupyter kernels forward such lines into the notebook;
* uses the inline matplotlib backend in a kernel (every Figure displays as PNG) and
  Agg elsewhere.

Example:
    >>> from gradtools.runtime import setup
    >>> info = setup(seed=0, frameworks=())
    >>> info["seed"]
    0
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings

import numpy as np

from gradtools import _checks

__all__ = ["setup", "seed_everything", "import_keras", "quiet_stderr"]

_ENV = {
    "common": {"PYTHONHASHSEED": "0"},
    "keras": {
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "KERAS_BACKEND": "tensorflow",
    },
    "torch": {},
}
# Only with determinism (TF_DETERMINISTIC_OPS switches op determinism on, and Keras then compiles
# without XLA). PyTorch: deterministic cuBLAS on GPUs; harmless on CPU.
_DETERMINISTIC_ENV = {
    "keras": {"TF_DETERMINISTIC_OPS": "1", "TF_CUDNN_DETERMINISTIC": "1"},
    "torch": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
}


def _set_env(frameworks=("torch", "keras"), deterministic: bool = True) -> None:
    """The environment of the named frameworks only (kept where the user set it already)."""
    for group in ("common", *frameworks):
        settings = {**_ENV[group], **(_DETERMINISTIC_ENV.get(group, {}) if deterministic else {})}
        for key, value in settings.items():
            os.environ.setdefault(key, value)


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to /dev/null for the duration (C++ logs included)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (some embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_keras():
    """Import and return ``keras`` (TensorFlow backend) without import-time log noise.

    This changes nothing global: no environment variable, no log level, no
    determinism flag (that is :func:`setup`'s job, for the book). It only hides the
    lines TensorFlow's C++ runtime prints while it is being imported.
    """
    if "keras" not in sys.modules or "tensorflow" not in sys.modules:
        with quiet_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorflow  # noqa: F401
            import keras  # noqa: F401
    keras = sys.modules["keras"]
    if keras.backend.backend() != "tensorflow":
        raise ImportError(f"gradtools.keras needs Keras' TensorFlow backend, but Keras runs on "
                          f"{keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow before importing keras")
    return keras


def _quiet_tensorflow_loggers() -> None:
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass


def seed_everything(seed: int = 0, frameworks=("torch", "keras"), deterministic: bool = True) -> None:
    """Seed Python, NumPy and the named frameworks, and (``deterministic``) make them deterministic.

    ``deterministic=False`` leaves PyTorch's deterministic algorithms and TensorFlow's op
    determinism as they are: with op determinism on, Keras compiles without XLA whatever
    ``jit_compile`` says.
    """
    seed = _checks.integer("seed", seed, minimum=0)
    deterministic = _checks.boolean("deterministic", deterministic)
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in frameworks:
        import torch

        torch.manual_seed(seed)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
    if "keras" in frameworks:
        _set_env(("keras",), deterministic)
        keras = import_keras()
        import tensorflow as tf

        _quiet_tensorflow_loggers()
        keras.utils.set_random_seed(seed)
        if deterministic:
            tf.config.experimental.enable_op_determinism()


def _setup_matplotlib() -> None:
    """Agg outside a kernel; inside one, the inline backend (PNG repr for every Figure)."""
    import matplotlib

    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:
        ip = None
    if ip is not None and getattr(ip, "kernel", None) is not None:
        ip.run_line_magic("matplotlib", "inline")
    else:
        matplotlib.use("Agg")
    matplotlib.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "svg.hashsalt": "gradtools"})


def setup(seed: int = 0, frameworks=("torch", "keras"), deterministic: bool = True) -> dict:
    """Prepare a notebook or script: environment, seeds, determinism, plotting.

    Args:
        seed (int): the seed for every generator, default 0.
        frameworks (tuple of str): any of ``"torch"`` and ``"keras"``.
        deterministic (bool): switch on PyTorch's deterministic algorithms and
            TensorFlow's op determinism, default True (the book's chapters). With it,
            Keras compiles without XLA; pass False to keep XLA (``jit_compile=True``).

    Returns:
        dict with the seed and the versions of what was set up (for a
        reproducibility line at the top of a chapter).
    """
    deterministic = _checks.boolean("deterministic", deterministic)
    unknown = set(frameworks) - {"torch", "keras"}
    if unknown:
        raise ValueError(f"frameworks must contain only 'torch' and 'keras', got {tuple(frameworks)!r}")
    _set_env(frameworks, deterministic)
    _setup_matplotlib()
    seed_everything(seed, frameworks, deterministic)
    info = {"seed": seed, "numpy": np.__version__}
    if "torch" in frameworks:
        import torch

        info["torch"] = torch.__version__
    if "keras" in frameworks:
        keras = import_keras()
        info["keras"] = keras.__version__
    return info
