"""Framework-free model weights, so PyTorch and Keras start from the same numbers.

:func:`init_mlp` draws the weights of a multilayer perceptron with NumPy; the
backends build a model from them (``gradtools.torch.mlp``, ``gradtools.keras.mlp``).
Kernels are stored as ``(fan_in, fan_out)``, Keras' layout; the PyTorch backend
transposes.
"""

from __future__ import annotations

import numpy as np

from gradtools import _checks

__all__ = ["init_mlp", "init_residual_mlp", "init_rnn", "init_transformer", "INITS", "NORMS"]

#: Normalisation layers the model builders accept (``norm=``), or None for none.
NORMS = ("batch", "layer")

#: Standard deviation of each initialisation as a function of (fan_in, fan_out).
INITS = {
    "normal": lambda fan_in, fan_out: 1.0,  # N(0, 1): the classic way to explode
    "xavier": lambda fan_in, fan_out: np.sqrt(2.0 / (fan_in + fan_out)),  # Glorot & Bengio, 2010
    "he": lambda fan_in, fan_out: np.sqrt(2.0 / fan_in),  # He et al., 2015
    "lecun": lambda fan_in, fan_out: np.sqrt(1.0 / fan_in),  # LeCun et al., 1998: gain g gives std g / sqrt(fan_in)
}


def init_mlp(sizes, init: str = "he", seed: int = 0, gain: float = 1.0):
    """Weights of an MLP with layer widths ``sizes`` (input first, output last).

    Args:
        sizes (sequence of int): e.g. ``[64, 128, 128, 10]``.
        init (str): ``"he"`` (default), ``"xavier"``, ``"lecun"`` or ``"normal"``
            (N(0, 1)).
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


def init_residual_mlp(in_features: int, width: int, blocks: int, out_features: int, init: str = "he",
                      seed: int = 0, gain: float = 1.0, branch_scale: float = 1.0):
    """Weights of a residual MLP: a stem, ``blocks`` square layers, a head.

    The same list of ``(kernel, bias)`` pairs as :func:`init_mlp` with sizes
    ``[in_features] + [width] * (blocks + 1) + [out_features]`` and the same seed,
    except that the ``blocks`` square kernels (the residual branches) are
    multiplied by ``branch_scale``. So ``gradtools.torch.mlp`` and
    ``gradtools.torch.residual_mlp`` built from one list are the same network with
    and without the skip connections. A He branch doubles the variance of the
    residual stream at every block; ``branch_scale = blocks ** -0.5`` bounds the
    growth over all blocks by ``e``. (Fixup, Zhang et al. 2019, rescales branches of
    ``m >= 2`` layers by ``L ** (-1 / (2m - 2))`` and zeroes their last layer;
    SkipInit, De and Smith 2020, multiplies each branch by a learnable scalar
    started at 0. This is the same idea for one-layer branches, fixed at
    initialisation.)

    Example:
        >>> w = init_residual_mlp(8, 16, blocks=4, out_features=2, branch_scale=0.5)
        >>> [k.shape for k, _ in w][:2], len(w)
        ([(8, 16), (16, 16)], 6)
    """
    in_features = _checks.integer("in_features", in_features, minimum=1)
    width = _checks.integer("width", width, minimum=1)
    blocks = _checks.integer("blocks", blocks, minimum=1)
    out_features = _checks.integer("out_features", out_features, minimum=1)
    branch_scale = _checks.non_negative("branch_scale", branch_scale)
    sizes = [in_features] + [width] * (blocks + 1) + [out_features]
    weights = init_mlp(sizes, init=init, seed=seed, gain=gain)
    for i in range(1, blocks + 1):
        kernel, bias = weights[i]
        weights[i] = ((kernel * np.float32(branch_scale)).astype(np.float32), bias)
    return weights


def _norm_choice(norm):
    """``norm`` checked: None or one of :data:`NORMS` (the backends' model builders share it)."""
    if norm is not None:
        _checks.choice("norm", norm, set(NORMS))
    return norm


def _residual_weights(weights) -> tuple[list, int]:
    """``(weights as a list, width)`` for a residual MLP: a stem, square branches, a head."""
    weights = list(weights)
    if len(weights) < 3:
        raise ValueError(f"weights must hold a stem, at least one block and a head, got {len(weights)} layer(s)")
    width = np.shape(weights[0][0])[1]
    for i, (kernel, _) in enumerate(weights[1:-1], start=1):
        if tuple(np.shape(kernel)) != (width, width):
            raise ValueError(f"weights[{i}] is a residual branch and must be ({width}, {width}), "
                             f"got {tuple(np.shape(kernel))}")
    return weights, width


def init_rnn(input_size: int, hidden: int, spectral_radius: float, seed: int = 0, input_scale: float = 0.1,
             recurrent: str = "orthogonal"):
    """Weights of a vanilla RNN ``h_t = tanh(x_t W_in + h_{t-1} W_rec + b)`` with a linear read-out.

    With ``recurrent="orthogonal"`` (default) the recurrent matrix is a random
    orthogonal matrix times ``spectral_radius``, so every eigenvalue *and every
    singular value* has exactly that modulus: below 1 the gradient with respect to
    early steps vanishes geometrically, above 1 it grows (Pascanu et al., 2013).
    ``recurrent="gaussian"`` draws i.i.d. N(0, 1/hidden) entries and rescales them
    to the same spectral radius; its singular values spread from near 0 to about
    twice the radius, so products of it drift away from the orthogonal case.

    Returns:
        dict of float32 arrays: ``W_in`` (input, hidden), ``W_rec`` (hidden, hidden),
        ``b`` (hidden,), ``W_out`` (hidden, 1), ``b_out`` (1,).
    """
    input_size = _checks.integer("input_size", input_size, minimum=1)
    hidden = _checks.integer("hidden", hidden, minimum=1)
    spectral_radius = _checks.positive("spectral_radius", spectral_radius)
    _checks.choice("recurrent", recurrent, {"orthogonal", "gaussian"})
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((hidden, hidden))
    if recurrent == "orthogonal":
        q, r = np.linalg.qr(g)
        q = q * np.sign(np.diag(r))
    else:
        q = g / np.max(np.abs(np.linalg.eigvals(g)))
    return {
        "W_in": (input_scale * rng.standard_normal((input_size, hidden))).astype(np.float32),
        "W_rec": (spectral_radius * q).astype(np.float32),
        "b": np.zeros(hidden, np.float32),
        "W_out": (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32),
        "b_out": np.zeros(1, np.float32),
    }


def init_transformer(vocab_size: int, context: int = 32, width: int = 32, heads: int = 2, layers: int = 2,
                     seed: int = 0) -> dict:
    """Weights of a small decoder-only (GPT-style, pre-norm) Transformer language model.

    Token and position embeddings, ``layers`` blocks of causal self-attention and
    a 4x-wide GELU MLP, each behind a layer norm and on a residual stream, a
    final layer norm and an untied read-out. GPT-2's initialisation (Radford et
    al., 2019): N(0, 0.02) everywhere, the two projections back into the
    residual stream scaled by ``1 / sqrt(2 layers)``, biases 0, norms 1 and 0.
    Each block also carries the gains and biases of QK layer norm (Dehghani et
    al., 2023), used only by a model built with ``qk_norm=True``.

    Returns:
        dict of float32 arrays, kernels (fan_in, fan_out): ``embedding``
        (vocab, width), ``position`` (context, width), ``blocks`` (a list of dicts:
        ``norm1_gamma``, ``norm1_beta``, ``qkv_kernel`` (width, 3 width),
        ``qkv_bias``, ``q_norm_gamma``, ``q_norm_beta``, ``k_norm_gamma``,
        ``k_norm_beta`` (width / heads,), ``out_kernel``, ``out_bias``,
        ``norm2_gamma``, ``norm2_beta``, ``fc1_kernel`` (width, 4 width), ``fc1_bias``,
        ``fc2_kernel``, ``fc2_bias``), ``norm_gamma``, ``norm_beta``,
        ``head_kernel`` (width, vocab), ``head_bias``; and ``heads``, an int.

    Example:
        >>> w = init_transformer(vocab_size=10, context=8, width=16, heads=2, layers=1)
        >>> w["embedding"].shape, len(w["blocks"]), w["blocks"][0]["q_norm_gamma"].shape
        ((10, 16), 1, (8,))
    """
    vocab_size = _checks.integer("vocab_size", vocab_size, minimum=2)
    context = _checks.integer("context", context, minimum=1)
    width = _checks.integer("width", width, minimum=1)
    heads = _checks.integer("heads", heads, minimum=1)
    layers = _checks.integer("layers", layers, minimum=1)
    if width % heads:
        raise ValueError(f"width must be a multiple of heads ({heads}), got {width}")
    rng = np.random.default_rng(seed)
    head_dim = width // heads

    def normal(*shape, std=0.02):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    def zeros(n):
        return np.zeros(n, dtype=np.float32)

    weights = {"embedding": normal(vocab_size, width), "position": normal(context, width), "blocks": [],
               "heads": heads}
    residual_std = 0.02 / np.sqrt(2 * layers)
    for _ in range(layers):
        weights["blocks"].append({
            "norm1_gamma": ones(width), "norm1_beta": zeros(width),
            "qkv_kernel": normal(width, 3 * width), "qkv_bias": zeros(3 * width),
            "q_norm_gamma": ones(head_dim), "q_norm_beta": zeros(head_dim),
            "k_norm_gamma": ones(head_dim), "k_norm_beta": zeros(head_dim),
            "out_kernel": normal(width, width, std=residual_std), "out_bias": zeros(width),
            "norm2_gamma": ones(width), "norm2_beta": zeros(width),
            "fc1_kernel": normal(width, 4 * width), "fc1_bias": zeros(4 * width),
            "fc2_kernel": normal(4 * width, width, std=residual_std), "fc2_bias": zeros(width),
        })
    weights.update(norm_gamma=ones(width), norm_beta=zeros(width), head_kernel=normal(width, vocab_size),
                   head_bias=zeros(vocab_size))
    return weights


def transformer_shapes(weights) -> tuple[int, int, int, int, int]:
    """``(vocab_size, context, width, heads, layers)`` of :func:`init_transformer` weights, checked."""
    if not isinstance(weights, dict) or not {"embedding", "position", "blocks", "heads"} <= set(weights):
        raise ValueError("weights must be the dict gradtools.models.init_transformer returns, got "
                         f"{type(weights).__name__}{sorted(weights) if isinstance(weights, dict) else ''}")
    vocab_size, width = np.shape(weights["embedding"])
    context = np.shape(weights["position"])[0]
    heads = _checks.integer("weights['heads']", weights["heads"], minimum=1)
    if not weights["blocks"] or width % heads:
        raise ValueError(f"weights must hold at least one block and width ({width}) must be a multiple of "
                         f"heads ({heads})")
    return int(vocab_size), int(context), int(width), heads, len(weights["blocks"])
