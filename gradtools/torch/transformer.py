"""A small decoder-only Transformer built from :func:`gradtools.models.init_transformer` weights.

GPT-style and pre-norm: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.
Each attention layer remembers the largest pre-softmax logit of its last
forward pass (``max_logit``, a 0-d tensor on the device), the quantity whose
growth Dehghani et al. (2023) and Wortsman et al. (2023) saw come before a
Transformer's loss diverges; ``qk_norm=True`` applies a layer norm to queries
and keys before their dot product, their remedy. ``gradtools.keras.transformer``
builds the same network in Keras from the same weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradtools import _checks
from gradtools.models import transformer_shapes

__all__ = ["CausalSelfAttention", "Transformer", "transformer", "z_loss"]

_EPS = 1e-5  # layer-norm epsilon, the same in the Keras build


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _load_linear(linear: torch.nn.Linear, kernel, bias) -> None:
    linear.weight.copy_(_tensor(kernel).T)
    linear.bias.copy_(_tensor(bias))


def _load_norm(norm: torch.nn.LayerNorm, gamma, beta) -> None:
    norm.weight.copy_(_tensor(gamma))
    norm.bias.copy_(_tensor(beta))


class CausalSelfAttention(torch.nn.Module):
    """Multi-head causal self-attention that records its largest attention logit.

    The logits are ``q k^T / sqrt(head_dim)`` per head; after each forward pass
    ``max_logit`` holds their maximum over the batch, the heads and the causal
    positions (a detached 0-d tensor, read without a host sync until a caller
    converts it). With ``qk_norm`` queries and keys pass a layer norm over the
    head dimension first (shared by the heads), which bounds each logit by
    about ``sqrt(head_dim)`` times the product of the two gains.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.q_norm = torch.nn.LayerNorm(self.head_dim, eps=_EPS) if qk_norm else None
        self.k_norm = torch.nn.LayerNorm(self.head_dim, eps=_EPS) if qk_norm else None
        self.register_buffer("max_logit", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (t.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=-1))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        self.max_logit = logits.detach().amax()
        y = torch.softmax(logits, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class _Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width, eps=_EPS)
        self.attention = CausalSelfAttention(width, heads, qk_norm)
        self.norm2 = torch.nn.LayerNorm(width, eps=_EPS)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(torch.nn.Module):
    """A decoder-only language model: token ids (batch, length) in, logits (batch, length, vocab) out.

    Build it with :func:`transformer`. :meth:`groups` names its parameters the way
    the field guide reports them, and :meth:`attention_logits` returns each
    layer's ``max_logit`` from the last forward pass.
    """

    def __init__(self, vocab_size: int, context: int, width: int, heads: int, layers: int,
                 qk_norm: bool = False):
        super().__init__()
        self.context = context
        self.embedding = torch.nn.Embedding(vocab_size, width)
        self.position = torch.nn.Parameter(torch.zeros(context, width))
        self.blocks = torch.nn.ModuleList(_Block(width, heads, qk_norm) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width, eps=_EPS)
        self.head = torch.nn.Linear(width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] > self.context:
            raise ValueError(f"ids must have shape (batch, length <= {self.context}), got {tuple(ids.shape)}")
        x = self.embedding(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def groups(self) -> dict:
        """``{group: [parameters]}``: ``embedding``, then ``block{i}.attention`` and
        ``block{i}.mlp`` (each with the layer norm in front of it), then ``head``
        (the final norm and the read-out), input side first."""
        out = {"embedding": [self.embedding.weight, self.position]}
        for i, block in enumerate(self.blocks):
            out[f"block{i}.attention"] = [*block.norm1.parameters(), *block.attention.parameters()]
            out[f"block{i}.mlp"] = [*block.norm2.parameters(), *block.mlp.parameters()]
        out["head"] = [*self.norm.parameters(), *self.head.parameters()]
        return out

    def attention_logits(self) -> torch.Tensor:
        """Each layer's largest attention logit in the last forward pass, a 1-d tensor (input side first)."""
        return torch.stack([block.attention.max_logit for block in self.blocks])


def transformer(weights: dict, qk_norm: bool = False) -> Transformer:
    """A :class:`Transformer` holding ``weights`` (from :func:`gradtools.models.init_transformer`).

    Args:
        weights (dict): the NumPy weights; the Keras build of the same dict
            computes the same function.
        qk_norm (bool): layer-normalise queries and keys (QK layer norm), default False.

    Example:
        >>> from gradtools.models import init_transformer
        >>> model = transformer(init_transformer(vocab_size=10, context=8, width=16))
        >>> model(torch.zeros(3, 8, dtype=torch.long)).shape
        torch.Size([3, 8, 10])
    """
    vocab_size, context, width, heads, layers = transformer_shapes(weights)
    qk_norm = _checks.boolean("qk_norm", qk_norm)
    model = Transformer(vocab_size, context, width, heads, layers, qk_norm)
    with torch.no_grad():
        model.embedding.weight.copy_(_tensor(weights["embedding"]))
        model.position.copy_(_tensor(weights["position"]))
        for block, w in zip(model.blocks, weights["blocks"]):
            _load_norm(block.norm1, w["norm1_gamma"], w["norm1_beta"])
            _load_linear(block.attention.qkv, w["qkv_kernel"], w["qkv_bias"])
            if qk_norm:
                _load_norm(block.attention.q_norm, w["q_norm_gamma"], w["q_norm_beta"])
                _load_norm(block.attention.k_norm, w["k_norm_gamma"], w["k_norm_beta"])
            _load_linear(block.attention.out, w["out_kernel"], w["out_bias"])
            _load_norm(block.norm2, w["norm2_gamma"], w["norm2_beta"])
            _load_linear(block.mlp[0], w["fc1_kernel"], w["fc1_bias"])
            _load_linear(block.mlp[2], w["fc2_kernel"], w["fc2_bias"])
        _load_norm(model.norm, weights["norm_gamma"], weights["norm_beta"])
        _load_linear(model.head, weights["head_kernel"], weights["head_bias"])
    return model


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean(log(Z)^2)``, ``Z = sum_j exp(logit_j)``: PaLM's auxiliary output loss (Chowdhery et al., 2022).

    Added to the cross-entropy with a small weight (PaLM: 1e-4), it pulls the
    softmax normaliser towards 1, so the output logits cannot drift to the large
    magnitudes where float arithmetic and the loss go unstable.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
