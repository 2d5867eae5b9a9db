"""A small decoder-only Transformer in Keras, from :func:`gradtools.models.init_transformer` weights.

The twin of :mod:`gradtools.torch.transformer`: the same pre-norm GPT-style
network, the same layer-norm epsilon and exact GELU, so both frameworks compute
the same function from the same NumPy weights. Each attention layer keeps the
largest pre-softmax logit of its last call in a non-trainable variable
``max_logit`` (assigned in the graph, so it works inside ``fit()`` too).
"""

from __future__ import annotations

import math

import numpy as np

from gradtools import _checks
from gradtools.models import transformer_shapes
from gradtools.runtime import import_keras

keras = import_keras()
from keras import ops  # noqa: E402

__all__ = ["CausalSelfAttention", "Transformer", "transformer", "z_loss"]

_EPS = 1e-5  # layer-norm epsilon, the same in the PyTorch build


def _norm(name):
    return keras.layers.LayerNormalization(epsilon=_EPS, name=name)


class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention that records its largest attention logit (``max_logit``).

    As ``gradtools.torch.CausalSelfAttention``: logits ``q k^T / sqrt(head_dim)``,
    their maximum over the batch, heads and causal positions stored after each
    call; ``qk_norm`` layer-normalises queries and keys over the head dimension.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.qkv = keras.layers.Dense(3 * width, name="qkv")
        self.out = keras.layers.Dense(width, name="out")
        self.q_norm = _norm("q_norm") if qk_norm else None
        self.k_norm = _norm("k_norm") if qk_norm else None

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.out.build(input_shape)
        if self.q_norm is not None:
            self.q_norm.build((None, self.head_dim))
            self.k_norm.build((None, self.head_dim))
        self.max_logit = self.add_weight(shape=(), initializer="zeros", trainable=False, name="max_logit")

    def call(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]

        def heads(t):
            return ops.transpose(ops.reshape(t, (batch, length, self.heads, self.head_dim)), (0, 2, 1, 3))

        q, k, v = (heads(t) for t in ops.split(self.qkv(x), 3, axis=-1))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(self.head_dim)
        causal = ops.tril(ops.ones((length, length), dtype="bool"))
        logits = ops.where(causal, logits, float("-inf"))
        self.max_logit.assign(ops.max(ops.stop_gradient(logits)))
        y = ops.matmul(ops.softmax(logits, axis=-1), v)
        return self.out(ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (batch, length, self.width)))


class _Block(keras.layers.Layer):
    def __init__(self, width: int, heads: int, qk_norm: bool, **kwargs):
        super().__init__(**kwargs)
        self.norm1, self.norm2 = _norm("norm1"), _norm("norm2")
        self.attention = CausalSelfAttention(width, heads, qk_norm, name="attention")
        self.fc1 = keras.layers.Dense(4 * width, name="fc1")
        self.fc2 = keras.layers.Dense(width, name="fc2")

    def build(self, input_shape):
        for layer in (self.norm1, self.norm2, self.attention, self.fc1):
            layer.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.fc1.units))

    def call(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(keras.activations.gelu(self.fc1(self.norm2(x)), approximate=False))


class Transformer(keras.Model):
    """A decoder-only language model: token ids (batch, length) in, logits (batch, length, vocab) out.

    Build it with :func:`transformer`. :meth:`groups` and :meth:`attention_logits`
    mean what they mean in ``gradtools.torch.Transformer``.
    """

    def __init__(self, vocab_size: int, context: int, width: int, heads: int, layers: int, qk_norm: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.context = context
        self.embedding = keras.layers.Embedding(vocab_size, width, name="embedding")
        self.blocks = [_Block(width, heads, qk_norm, name=f"block{i}") for i in range(layers)]
        self.norm = _norm("norm")
        self.head = keras.layers.Dense(vocab_size, name="head")
        self.embedding.build((None, context))
        self.position = self.add_weight(shape=(context, width), initializer="zeros", name="position")
        for block in self.blocks:
            block.build((None, context, width))
        self.norm.build((None, context, width))
        self.head.build((None, context, width))

    def call(self, ids):
        length = ops.shape(ids)[1]
        x = self.embedding(ids) + self.position[:length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def groups(self) -> dict:
        """``{group: [trainable variables]}``, named and ordered as in ``gradtools.torch.Transformer.groups``."""
        out = {"embedding": [self.embedding.embeddings, self.position]}
        for i, block in enumerate(self.blocks):
            out[f"block{i}.attention"] = [*block.norm1.trainable_variables, *block.attention.trainable_variables]
            out[f"block{i}.mlp"] = [*block.norm2.trainable_variables, *block.fc1.trainable_variables,
                                    *block.fc2.trainable_variables]
        out["head"] = [*self.norm.trainable_variables, *self.head.trainable_variables]
        return out

    def attention_logits(self):
        """Each layer's largest attention logit in the last call, a 1-d tensor (input side first)."""
        return ops.stack([block.attention.max_logit.value for block in self.blocks])


def transformer(weights: dict, qk_norm: bool = False) -> Transformer:
    """A :class:`Transformer` holding ``weights`` (from :func:`gradtools.models.init_transformer`).

    Args:
        weights (dict): the NumPy weights; ``gradtools.torch.transformer`` builds
            the same function from them.
        qk_norm (bool): layer-normalise queries and keys (QK layer norm), default False.

    Example:
        >>> import numpy as np
        >>> from gradtools.models import init_transformer
        >>> model = transformer(init_transformer(vocab_size=10, context=8, width=16))
        >>> tuple(model(np.zeros((3, 8), dtype="int64")).shape)
        (3, 8, 10)
    """
    vocab_size, context, width, heads, layers = transformer_shapes(weights)
    qk_norm = _checks.boolean("qk_norm", qk_norm)
    model = Transformer(vocab_size, context, width, heads, layers, qk_norm)

    def dense(layer, kernel, bias):
        layer.kernel.assign(np.asarray(kernel, np.float32))
        layer.bias.assign(np.asarray(bias, np.float32))

    def norm(layer, gamma, beta):
        layer.gamma.assign(np.asarray(gamma, np.float32))
        layer.beta.assign(np.asarray(beta, np.float32))

    model.embedding.embeddings.assign(np.asarray(weights["embedding"], np.float32))
    model.position.assign(np.asarray(weights["position"], np.float32))
    for block, w in zip(model.blocks, weights["blocks"]):
        norm(block.norm1, w["norm1_gamma"], w["norm1_beta"])
        dense(block.attention.qkv, w["qkv_kernel"], w["qkv_bias"])
        if qk_norm:
            norm(block.attention.q_norm, w["q_norm_gamma"], w["q_norm_beta"])
            norm(block.attention.k_norm, w["k_norm_gamma"], w["k_norm_beta"])
        dense(block.attention.out, w["out_kernel"], w["out_bias"])
        norm(block.norm2, w["norm2_gamma"], w["norm2_beta"])
        dense(block.fc1, w["fc1_kernel"], w["fc1_bias"])
        dense(block.fc2, w["fc2_kernel"], w["fc2_bias"])
    norm(model.norm, weights["norm_gamma"], weights["norm_beta"])
    dense(model.head, weights["head_kernel"], weights["head_bias"])
    return model


def z_loss(logits):
    """``mean(log(Z)^2)``, ``Z = sum_j exp(logit_j)``: PaLM's auxiliary output loss (Chowdhery et al., 2022).

    The twin of ``gradtools.torch.z_loss``: added with a small weight (PaLM: 1e-4),
    it keeps the softmax normaliser near 1 and the output logits from drifting.
    """
    return ops.mean(ops.square(ops.logsumexp(ops.cast(logits, "float32"), axis=-1)))
