"""Train a language model with the field guide's remedies and record what goes wrong, in PyTorch.

:func:`train_lm` is a plain next-token training loop over pre-drawn batches that
records, at every step, the diagnostics of :class:`gradtools.diagnose.RunTrace`;
its remedies are arguments (a warm-up scheduler, a clipping policy, an output
z-loss, a :class:`~gradtools.torch.GradGuard` that skips spiking steps, a
:class:`Rollback`). :class:`Rollback` is PaLM's restart-and-skip for any
PyTorch loop.
"""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import torch

from gradtools.diagnose import RollbackBase, RunTrace, check_train_lm
from gradtools.torch import _checks as _tchecks
from gradtools.torch.clip import Clipper
from gradtools.torch.guard import GradGuard
from gradtools.torch.transformer import CausalSelfAttention
from gradtools.torch.transformer import z_loss as _z_loss

__all__ = ["AttentionLogits", "Rollback", "train_lm"]


def _mha_max_logit(mha: torch.nn.MultiheadAttention, bound) -> torch.Tensor:
    """The largest pre-softmax logit ``q k^T / sqrt(head_dim) (+ float mask)`` of one
    ``nn.MultiheadAttention`` call, recomputed from its inputs and projection weights."""
    query, key = bound.arguments["query"], bound.arguments["key"]
    if query.dim() == 2:  # unbatched (length, embed)
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    elif mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    embed, heads = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:embed], mha.in_proj_weight[embed:2 * embed]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k = mha.in_proj_bias[:embed], mha.in_proj_bias[embed:2 * embed]
    q = torch.nn.functional.linear(query, w_q, b_q)  # (length, batch, embed)
    k = torch.nn.functional.linear(key, w_k, b_k)
    head_dim = embed // heads
    q = q.reshape(q.shape[0], q.shape[1], heads, head_dim).permute(1, 2, 0, 3)  # (batch, heads, L, d)
    k = k.reshape(k.shape[0], k.shape[1], heads, head_dim).permute(1, 2, 0, 3)
    logits = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    mask = bound.arguments.get("attn_mask")
    if mask is None and bound.arguments.get("is_causal"):
        mask = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).triu(1)
    if mask is not None:
        if mask.dim() == 3:  # (batch * heads, L, S)
            mask = mask.reshape(logits.shape)
        logits = logits.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    padding = bound.arguments.get("key_padding_mask")
    if padding is not None:
        padding = padding.reshape(-1, 1, 1, padding.shape[-1])  # (batch, 1, 1, S); unbatched: batch 1
        logits = logits.masked_fill(padding, float("-inf")) if padding.dtype == torch.bool else logits + padding
    return logits.amax()


class AttentionLogits:
    """Track the largest pre-softmax attention logit of every attention layer of a model.

    The logit ``q . k / sqrt(head_dim)`` grows without bound in Transformers
    trained at too high a rate; once it reaches the hundreds the softmax is
    one-hot and the attention stops learning (Dehghani et al., 2023; Wortsman
    et al., 2023). Two kinds of layer are found, in module order:
    :class:`gradtools.torch.CausalSelfAttention` (which records its own
    ``max_logit``) and ``torch.nn.MultiheadAttention``, for which a forward
    pre-hook recomputes the logits from the layer's inputs and projection
    weights, its ``attn_mask``, ``is_causal`` and ``key_padding_mask``
    included (an extra ``q k^T`` per call, no host sync). Layers with
    ``bias_k`` or ``add_zero_attn`` are refused. A layer not yet called reads 0.

    Args:
        model (torch.nn.Module): any module holding such layers.

    Example:
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> tracker = AttentionLogits(torch.nn.ModuleList([mha]))
        >>> h = torch.randn(3, 5, 8)
        >>> _ = mha(h, h, h, need_weights=False)
        >>> tracker.names, tracker.values().shape
        (['0'], torch.Size([1]))
    """

    def __init__(self, model):
        _tchecks.module("model", model)
        found = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, (CausalSelfAttention, torch.nn.MultiheadAttention))]
        for name, module in found:  # every layer checked before any hook is installed
            if isinstance(module, torch.nn.MultiheadAttention) and (module.bias_k is not None or module.add_zero_attn):
                raise ValueError(f"model.{name}: MultiheadAttention with bias_k or add_zero_attn is not "
                                 "supported by AttentionLogits")
        self.names = [name or type(module).__name__ for name, module in found]  # the root module has no path
        self._layers = [module for _, module in found]
        self._last = {}
        self._hooks = [m.register_forward_pre_hook(self._hook(m), with_kwargs=True) for m in self._layers
                       if isinstance(m, torch.nn.MultiheadAttention)]

    def _hook(self, module):
        signature = inspect.signature(module.forward)

        def hook(mod, args, kwargs):
            bound = signature.bind(*args, **kwargs)
            with torch.no_grad():
                self._last[id(mod)] = _mha_max_logit(mod, bound)

        return hook

    def values(self) -> torch.Tensor:
        """Each layer's largest logit in its last call, a 1-d tensor in the order of ``names``."""
        out = []
        for layer in self._layers:
            value = layer.max_logit if isinstance(layer, CausalSelfAttention) else self._last.get(id(layer))
            out.append(torch.zeros(()) if value is None else value.float())
        return torch.stack(out) if out else torch.zeros(0)

    def remove(self) -> None:
        """Remove the hooks (a tracker of gradtools layers only has none)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class Rollback(RollbackBase):
    """Roll ``model``, ``optimizer`` (and ``scheduler``) back to a checkpoint on a loss spike.

    The logic is :class:`gradtools.diagnose.RollbackBase`'s: a checkpoint before
    every ``every``-th accepted step, and on a spike of the loss or of the
    gradient norm given to :meth:`check` (or a non-finite one) a restore and a
    jump of ``skip_batches`` in the data.
    Checkpoints are copies in memory; ``state_dict()`` of each object, cloned.

    Args:
        model (torch.nn.Module), optimizer (torch.optim.Optimizer): restored together.
        scheduler (LRScheduler or None): restored too, so the rate goes back with the step.
        every (int): accepted steps between checkpoints, default 25.
        skip_batches (int): batches skipped from the spike on, default 10.
        spike (SpikeDetector or None): the spike test, default
            ``SpikeDetector(window=50, z_thresh=6)``.
        max_rollbacks (int): more raise ``TooManySkipsError``, default 5.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> rollback = Rollback(model, opt, every=10)
        >>> x = torch.ones(8, 4, 2)
        >>> for i in rollback.batches(len(x)):
        ...     opt.zero_grad()
        ...     loss = model(x[i]).square().mean()
        ...     loss.backward()
        ...     if rollback.check(loss):
        ...         opt.step()
        >>> rollback.rollbacks
        []
    """

    def __init__(self, model, optimizer, scheduler=None, every: int = 25, skip_batches: int = 10, spike=None,
                 max_rollbacks: int = 5):
        _tchecks.module("model", model)
        _tchecks.optimizer("optimizer", optimizer, closure=False)
        _tchecks.scheduler("scheduler", scheduler)
        super().__init__(every=every, skip_batches=skip_batches, spike=spike, max_rollbacks=max_rollbacks)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def check(self, loss, grad_norm=None) -> bool:
        detach = (lambda t: t.detach() if isinstance(t, torch.Tensor) else t)
        return super().check(detach(loss), detach(grad_norm))

    check.__doc__ = RollbackBase.check.__doc__

    def _save(self):
        objects = (self.model, self.optimizer, self.scheduler)
        return [None if o is None else copy.deepcopy(o.state_dict()) for o in objects]

    def _restore(self, saved) -> None:
        for obj, state in zip((self.model, self.optimizer, self.scheduler), saved):
            if obj is not None:
                obj.load_state_dict(copy.deepcopy(state))


def _groups(model) -> dict:
    """``{group: [parameters]}``: the model's own ``groups()`` or one group per trainable parameter."""
    if callable(getattr(model, "groups", None)):
        groups = {name: [p for p in params if p.requires_grad] for name, params in model.groups().items()}
    else:
        groups = {name: [p] for name, p in model.named_parameters() if p.requires_grad}
    return {name: params for name, params in groups.items() if params}


def train_lm(model, optimizer, x, y, scheduler=None, clip=None, z_loss: float = 0.0, guard=None,
             rollback=None, spike_at: int | None = None, spike_factor: float = 1000.0) -> RunTrace:
    """Next-token training on pre-drawn batches, recording the field guide's diagnostics.

    Each step computes the cross-entropy of ``model(x[i])`` against ``y[i]``
    (plus ``z_loss`` times :func:`gradtools.torch.z_loss` of the logits),
    backpropagates, applies the remedies given and steps. The diagnostics
    (:class:`gradtools.diagnose.RunTrace`) are grouped by the model's
    ``groups()`` when it has one (:class:`gradtools.torch.Transformer` does);
    the attention logits are those of :class:`AttentionLogits`, so a model built
    on ``torch.nn.MultiheadAttention`` has them too.

    Args:
        model (torch.nn.Module): maps token ids (batch, length) to logits (batch, length, vocab).
        optimizer (torch.optim.Optimizer): over the model's parameters.
        x, y: int arrays (steps, batch, length), e.g. from :func:`gradtools.data.lm_batches`.
        scheduler: an ``LRScheduler`` (for example :class:`gradtools.torch.Warmup`),
            stepped after each step taken.
        clip: a global-norm clipping policy for a :class:`gradtools.torch.Clipper`
            (a threshold, ``"zclip"``, a policy); with ``guard`` give the guard the clipper.
        z_loss (float): weight of the z-loss term, default 0 (PaLM used 1e-4).
        guard (gradtools.torch.GradGuard or None): steps through ``guard.step()``, which skips
            non-finite and spiking steps (OLMo-core's skip-step).
        rollback (gradtools.torch.Rollback or None): checks each loss and global gradient norm and
            rolls back on a spike of either.
        spike_at (int or None): the batch (index into ``x``) whose gradient is
            multiplied by ``spike_factor`` (default 1000), a stand-in for one bad batch.

    Returns:
        :class:`gradtools.diagnose.RunTrace` (one host sync per step only for the
        remedies that decide on the host: a clipping policy, a guard, a rollback).
    """
    _tchecks.module("model", model)
    _tchecks.optimizer("optimizer", optimizer, closure=False)
    _tchecks.scheduler("scheduler", scheduler)
    x, y, z_loss, spike_at, spike_factor = check_train_lm(
        model, optimizer, x, y, z_loss=z_loss, clip=clip, guard=guard, guard_type=GradGuard, rollback=rollback,
        rollback_type=Rollback, spike_at=spike_at, spike_factor=spike_factor, scheduler=scheduler)
    clipper = None if clip is None else Clipper(clip)
    groups = _groups(model)
    params = [p for ps in groups.values() for p in ps]
    index = torch.tensor([g for g, ps in enumerate(groups.values()) for _ in ps])
    xt, yt = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)
    tracker = AttentionLogits(model)

    def by_group(norms):
        return torch.zeros(len(groups), dtype=norms.dtype).index_add_(0, index, norms.square()).sqrt()

    rows = []
    try:
        for i in (range(len(x)) if rollback is None else rollback.batches(len(x))):
            optimizer.zero_grad(set_to_none=True)
            logits = model(xt[i])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yt[i].reshape(-1))
            (loss + z_loss * _z_loss(logits) if z_loss else loss).backward()
            if i == spike_at:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], spike_factor)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            norms = torch.stack(torch._foreach_norm(grads, 2.0))
            total = norms.square().sum().sqrt()
            lr = optimizer.param_groups[0]["lr"]
            attention = tracker.values() if tracker.names else None
            with torch.no_grad():
                before = torch._foreach_mul(params, 1.0)
            if rollback is not None and not rollback.check(loss, total):
                stepped = False
            elif guard is not None:
                stepped = guard.step().stepped
            else:
                if clipper is not None:
                    clipper(params)
                optimizer.step()
                stepped = True
            if stepped and scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                moved = torch.stack(torch._foreach_norm(torch._foreach_sub(params, before), 2.0))
                ratio = by_group(moved) / by_group(torch.stack(torch._foreach_norm(before, 2.0)))
            rows.append((loss.detach(), total, by_group(norms),
                         ratio if stepped else torch.zeros_like(ratio), attention, lr, not stepped))
    finally:
        tracker.remove()
    return _trace(rows, list(groups), [] if rollback is None else list(rollback.rollbacks))


def _trace(rows, names, rollbacks) -> RunTrace:
    losses, totals, norms, ratios, attention, lrs, skipped = zip(*rows)
    norms, ratios = torch.stack(norms).numpy(), torch.stack(ratios).numpy()
    return RunTrace(
        losses=torch.stack(losses).numpy().astype(np.float64), grad_norms=torch.stack(totals).numpy(),
        group_norms={n: norms[:, j] for j, n in enumerate(names)},
        update_ratios={n: ratios[:, j] for j, n in enumerate(names)},
        attention_logits=(np.zeros((len(rows), 0)) if attention[0] is None else torch.stack(attention).numpy()),
        lrs=np.array(lrs, dtype=np.float64), skipped=np.array(skipped, dtype=bool), rollbacks=rollbacks)
