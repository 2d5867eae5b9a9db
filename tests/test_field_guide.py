"""The field guide's library: text data, the Transformer in both frameworks, train_lm, Rollback, spike flags."""

import math

import keras
import numpy as np
import pytest
import torch

import gradtools.keras as gk
import gradtools.torch as gt
from gradtools import data, diagnose, models
from gradtools.guard import TooManySkipsError
from gradtools.policies import SpikeDetector

IDS, VOCAB = data.char_tokens(data.zen_of_python())
X, Y = data.lm_batches(IDS, context=8, batch_size=4, steps=12, seed=0)
WEIGHTS = models.init_transformer(len(VOCAB), context=8, width=16, heads=2, layers=2, seed=0)


def test_text_and_batches():
    text = data.zen_of_python()
    assert text.startswith("The Zen of Python, by Tim Peters") and "Namespaces are one honking great idea" in text
    assert len(VOCAB) == len(set(text)) and "".join(VOCAB[i] for i in IDS) == text
    assert X.shape == (12, 4, 8) and X.dtype == np.int64
    np.testing.assert_array_equal(X[:, :, 1:], Y[:, :, :-1])  # y is x shifted by one token
    again, _ = data.lm_batches(IDS, 8, 4, 12, seed=0)
    np.testing.assert_array_equal(X, again)
    assert not np.array_equal(X, data.lm_batches(IDS, 8, 4, 12, seed=1)[0])
    with pytest.raises(ValueError, match="context must be below len"):
        data.lm_batches(IDS[:5], 8, 4, 2)
    with pytest.raises(ValueError, match="ids must be a 1-d array"):
        data.lm_batches(np.zeros((3, 3), np.int64), 1, 1, 1)
    with pytest.raises(ValueError, match="text must be a string"):
        data.char_tokens("a")


def test_unigram_entropy():
    assert diagnose.unigram_entropy(np.array([0, 1, 0, 1])) == pytest.approx(math.log(2))
    assert diagnose.unigram_entropy(np.array([3, 3, 3])) == 0.0
    counts = np.bincount(IDS) / len(IDS)
    assert diagnose.unigram_entropy(IDS) == pytest.approx(-(counts[counts > 0] * np.log(counts[counts > 0])).sum())


def test_init_transformer_checks():
    with pytest.raises(ValueError, match="width must be a multiple of heads"):
        models.init_transformer(10, width=10, heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        models.init_transformer(1)
    with pytest.raises(ValueError, match="init_transformer returns"):
        gt.transformer({"embedding": 1})
    with pytest.raises(TypeError, match="qk_norm must be True or False, got 'yes'"):
        gk.transformer(WEIGHTS, qk_norm="yes")


@pytest.mark.parametrize("qk_norm", [False, True])
def test_both_frameworks_compute_the_same_function(qk_norm):
    tm, km = gt.transformer(WEIGHTS, qk_norm=qk_norm), gk.transformer(WEIGHTS, qk_norm=qk_norm)
    t = tm(torch.from_numpy(X[0])).detach().numpy()
    k = km(X[0]).numpy()
    assert t.shape == (4, 8, len(VOCAB))
    np.testing.assert_allclose(t, k, atol=1e-5)
    np.testing.assert_allclose(tm.attention_logits().numpy(), km.attention_logits().numpy(), rtol=1e-4)
    assert list(tm.groups()) == list(km.groups()) == [
        "embedding", "block0.attention", "block0.mlp", "block1.attention", "block1.mlp", "head"]
    assert sum(len(v) for v in tm.groups().values()) == len(list(tm.parameters()))
    assert sum(len(v) for v in km.groups().values()) == len(km.trainable_variables)


def test_attention_logit_is_the_causal_maximum():
    """max_logit against a NumPy recomputation; future positions never count."""
    model = gt.transformer(WEIGHTS)
    model(torch.from_numpy(X[0]))
    block = model.blocks[0]
    with torch.no_grad():
        h = block.norm1(model.embedding(torch.from_numpy(X[0])) + model.position).numpy()
    w = WEIGHTS["blocks"][0]
    q, k, _ = np.split(h @ w["qkv_kernel"] + w["qkv_bias"], 3, axis=-1)
    q, k = (a.reshape(4, 8, 2, 8).transpose(0, 2, 1, 3) for a in (q, k))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(8)
    causal = np.tril(np.ones((8, 8), bool))
    assert float(block.attention.max_logit) == pytest.approx(logits[..., causal].max(), rel=1e-5)
    assert logits.max() >= logits[..., causal].max()


def test_z_loss_matches_numpy():
    logits = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32) * 4
    ref = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    assert float(gt.z_loss(torch.from_numpy(logits))) == pytest.approx(ref, rel=1e-5)
    assert float(gk.z_loss(logits)) == pytest.approx(ref, rel=1e-5)


def test_train_lm_agrees_across_frameworks():
    tm, km = gt.transformer(WEIGHTS), gk.transformer(WEIGHTS)
    tt = gt.train_lm(tm, torch.optim.Adam(tm.parameters(), lr=1e-3), X, Y, z_loss=1e-4)
    kt = gk.train_lm(km, keras.optimizers.Adam(1e-3, epsilon=1e-8), X, Y, z_loss=1e-4)
    np.testing.assert_allclose(tt.losses, kt.losses, rtol=1e-4)
    np.testing.assert_allclose(tt.grad_norms, kt.grad_norms, rtol=1e-3)
    for name in tt.group_norms:
        np.testing.assert_allclose(tt.group_norms[name], kt.group_norms[name], rtol=1e-3)
        # Keras folds Adam's bias correction into the rate, so its epsilon weighs differently on tiny entries
        np.testing.assert_allclose(tt.update_ratios[name], kt.update_ratios[name], rtol=5e-2)
    np.testing.assert_allclose(tt.attention_logits, kt.attention_logits, atol=1e-3)
    np.testing.assert_allclose(tt.lrs, kt.lrs, rtol=1e-6)
    assert tt.attention_logits.shape == (12, 2) and not tt.skipped.any() and tt.rollbacks == []
    assert tt.losses[-1] < tt.losses[0]


def test_train_lm_records_an_update_ratio_that_is_the_real_step():
    model = gt.transformer(WEIGHTS)
    before = [p.detach().clone() for p in model.groups()["head"]]
    trace = gt.train_lm(model, torch.optim.SGD(model.parameters(), lr=0.1), X[:1], Y[:1])
    after = [p.detach() for p in model.groups()["head"]]
    moved = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(after, before)))
    size = math.sqrt(sum(float(b.square().sum()) for b in before))
    assert trace.update_ratios["head"][0] == pytest.approx(moved / size, rel=1e-4)


def test_a_spiked_batch_is_skipped_by_the_guard_and_weights_untouched():
    model = gt.transformer(WEIGHTS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gt.GradGuard(model, opt, spike=SpikeDetector(window=8, min_history=4, z_thresh=4.0))
    trace = gt.train_lm(model, opt, X, Y, guard=guard, spike_at=9, spike_factor=1e4)
    assert trace.skipped.tolist() == [i == 9 for i in range(12)]
    assert trace.grad_norms[9] > 1e3 * trace.grad_norms[8]
    assert all(trace.update_ratios[name][9] == 0 for name in trace.update_ratios)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_rollback_restores_the_checkpoint_exactly_and_skips_batches(framework):
    """A spike at batch 9 rolls back to the checkpoint of step 8 and resumes at batch 9 + skip."""
    spike = SpikeDetector(window=8, min_history=4, z_thresh=4.0)
    if framework == "torch":
        model = gt.transformer(WEIGHTS)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        rollback = gt.Rollback(model, opt, every=4, skip_batches=2, spike=spike)
        trace = gt.train_lm(model, opt, X, Y, rollback=rollback, spike_at=9)
        weights = [p.detach().numpy().copy() for p in model.parameters()]
        # the same run without the rolled-back batches: 0..7, then 11
        ref = gt.transformer(WEIGHTS)
        ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
        gt.train_lm(ref, ref_opt, np.concatenate([X[:8], X[11:]]), np.concatenate([Y[:8], Y[11:]]))
        expected = [p.detach().numpy() for p in ref.parameters()]
    else:
        model = gk.transformer(WEIGHTS)
        opt = keras.optimizers.Adam(1e-3, epsilon=1e-8)
        rollback = gk.Rollback(model, opt, every=4, skip_batches=2, spike=spike)
        trace = gk.train_lm(model, opt, X, Y, rollback=rollback, spike_at=9)
        weights = [v.numpy() for v in model.trainable_variables]
        ref = gk.transformer(WEIGHTS)
        ref_opt = keras.optimizers.Adam(1e-3, epsilon=1e-8)
        gk.train_lm(ref, ref_opt, np.concatenate([X[:8], X[11:]]), np.concatenate([Y[:8], Y[11:]]))
        expected = [v.numpy() for v in ref.trainable_variables]
        assert int(opt.iterations) == int(ref_opt.iterations) == 9
    assert rollback.rollbacks == [(9, 8)]
    # batches 0..9 seen (9 rolled back), 10 skipped, 11 trained: 11 rows, the 10th skipped
    assert len(trace.losses) == 11 and trace.skipped.tolist() == [i == 9 for i in range(11)]
    for w, e in zip(weights, expected):
        np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-7)


def test_rollback_logic_and_errors():
    class Counter(diagnose.RollbackBase):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.value, self.restored = 0, []

        def _save(self):
            return self.value

        def _restore(self, saved):
            self.restored.append(saved)
            self.value = saved

    rb = Counter(every=3, skip_batches=4, spike=SpikeDetector(window=5, min_history=3, z_thresh=3), max_rollbacks=1)
    seen = []
    for i in rb.batches(20):
        seen.append(i)
        if rb.check(float("nan") if i in (5, 12) else 1.0):
            rb.value += 1
        if i == 11:
            with pytest.raises(TooManySkipsError, match="after 1 rollbacks"):
                rb.check(float("inf"))
            break
    assert rb.rollbacks == [(5, 3)] and rb.restored == [3]
    assert seen == [0, 1, 2, 3, 4, 5, 9, 10, 11]  # batches 6, 7, 8 skipped after the spike at 5
    with pytest.raises(ValueError, match="every"):
        Counter(every=0)
    with pytest.raises(TypeError, match="spike must be a gradtools.policies.SpikeDetector"):
        Counter(spike="zclip")
    with pytest.raises(ValueError, match="skip_batches"):
        gt.Rollback(torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1), skip_batches=0)
    with pytest.raises(TypeError, match="scheduler must be a learning-rate scheduler .* got 'warmup'"):
        gt.Rollback(torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1),
                    scheduler="warmup")


def test_train_lm_argument_errors():
    model = gt.transformer(WEIGHTS)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="x and y must be integer arrays"):
        gt.train_lm(model, opt, X.astype(np.float32), Y)
    with pytest.raises(ValueError, match="z_loss"):
        gt.train_lm(model, opt, X, Y, z_loss=-1)
    with pytest.raises(ValueError, match="give the clipping policy to the guard"):
        gt.train_lm(model, opt, X, Y, clip=1.0, guard=gt.GradGuard(model, opt))
    with pytest.raises(TypeError, match="rollback must be a gradtools.torch.Rollback"):
        gt.train_lm(model, opt, X, Y, rollback=object())
    with pytest.raises(ValueError, match="spike_at"):
        gt.train_lm(model, opt, X, Y, spike_at=-1)
    km = gk.transformer(WEIGHTS)
    with pytest.raises(TypeError, match="optimizer must be a keras.optimizers.Optimizer"):
        gk.train_lm(km, opt, X, Y)
    with pytest.raises(ValueError, match="guard must step this optimizer"):
        gk.train_lm(km, keras.optimizers.Adam(), X, Y, guard=gk.GradGuard(keras.optimizers.Adam()))
    ko = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="give the clipping policy to the guard"):
        gk.train_lm(km, ko, X, Y, clip=1.0, guard=gk.GradGuard(ko))
    with pytest.raises(TypeError, match="guard must be a gradtools.keras.GradGuard or None, got GradGuard"):
        gk.train_lm(km, ko, X, Y, guard=gt.GradGuard(model, opt))


def test_run_trace_verdicts_and_spike_flags():
    n = 30
    losses = np.linspace(3.0, 2.0, n)
    losses[20] = 9.0
    norms = {"a": np.ones(n), "b": np.ones(n)}
    norms["b"][12:] = 50.0
    norms["a"][12:] = 20.0
    norms["a"][15:] = 500.0
    trace = diagnose.RunTrace(losses, np.ones(n), norms, norms, np.zeros((n, 0)), np.full(n, 0.1), np.zeros(n, bool))
    assert trace.blew_up_at() == 20 and trace.first_group() == "b"  # same step: larger growth wins
    assert trace.final_loss(5) == pytest.approx(losses[-5:].mean())
    assert trace.failed(reference=2.0) and not trace.failed(reference=3.0)
    flags = diagnose.spike_flags(losses, window=10, min_history=5)
    assert flags.tolist() == [i == 20 for i in range(n)]
    with pytest.raises(ValueError, match="values must be a 1-d history"):
        diagnose.spike_flags(np.zeros((2, 2)))


def _numpy_max_logit(q, k, heads, allowed):
    """Largest ``q k^T / sqrt(d)`` over allowed (T, S) positions; q, k (B, T, E) projected."""
    b, t, e = q.shape
    d = e // heads
    q = q.reshape(b, t, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, k.shape[1], heads, d).transpose(0, 2, 1, 3)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    return logits[..., allowed].max()


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_attention_logits_of_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    model = torch.nn.ModuleDict({"attn": mha})
    tracker = gt.AttentionLogits(model)
    h = torch.randn(3, 5, 8) * 3
    inp = h if batch_first else h.transpose(0, 1)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    mha(inp, inp, inp, attn_mask=causal, need_weights=False)
    w, bias = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
    q, k = (h.numpy() @ w[i * 8:(i + 1) * 8].T + bias[i * 8:(i + 1) * 8] for i in (0, 1))
    allowed = np.tril(np.ones((5, 5), bool))
    assert tracker.names == ["attn"]
    assert float(tracker.values()[0]) == pytest.approx(_numpy_max_logit(q, k, 2, allowed), rel=1e-5)
    full = _numpy_max_logit(q, k, 2, np.ones((5, 5), bool))
    mha(inp, inp, inp, need_weights=False)  # no mask: every position counts
    assert float(tracker.values()[0]) == pytest.approx(full, rel=1e-5)
    tracker.remove()
    mha(inp[:1], inp[:1], inp[:1], need_weights=False)
    assert float(tracker.values()[0]) == pytest.approx(full, rel=1e-5)  # no longer updated


def test_keras_attention_logits_of_multihead_attention_inside_a_tf_function():
    import tensorflow as tf

    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    h = (3 * np.random.default_rng(0).standard_normal((3, 5, 8))).astype("float32")
    mha(h, h)
    tracker = gk.AttentionLogits(mha)
    tf.function(lambda a: mha(a, a, use_causal_mask=True))(h)
    q = np.einsum("bte,enh->btnh", h, mha._query_dense.kernel.numpy()) + mha._query_dense.bias.numpy()
    k = np.einsum("bte,enh->btnh", h, mha._key_dense.kernel.numpy()) + mha._key_dense.bias.numpy()
    allowed = np.tril(np.ones((5, 5), bool))
    expected = _numpy_max_logit(q.reshape(3, 5, 8), k.reshape(3, 5, 8), 2, allowed)
    assert float(tracker.values()[0]) == pytest.approx(expected, rel=1e-5)
    tracker.remove()
    assert "_compute_attention" not in vars(mha)


def test_train_lm_tracks_a_model_built_on_multihead_attention():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(VOCAB), 16)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = torch.nn.Linear(16, len(VOCAB))

        def forward(self, ids):
            h = self.embed(ids)
            mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
            return self.head(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])

    torch.manual_seed(0)
    model = Tiny()
    trace = gt.train_lm(model, torch.optim.Adam(model.parameters(), lr=1e-2), X[:3], Y[:3])
    assert trace.attention_logits.shape == (3, 1) and np.all(trace.attention_logits > 0)
    assert list(trace.group_norms) == [name for name, _ in model.named_parameters()]
    assert not model.attn._forward_pre_hooks  # the tracker's hook is gone


def test_train_lm_clips_like_the_keras_twin():
    """clip= really clips (a tiny threshold changes the run), and both frameworks clip the same."""
    runs = {}
    for clip in (None, 1e-3):
        tm, km = gt.transformer(WEIGHTS), gk.transformer(WEIGHTS)
        t = gt.train_lm(tm, torch.optim.SGD(tm.parameters(), lr=0.5), X[:4], Y[:4], clip=clip)
        k = gk.train_lm(km, keras.optimizers.SGD(0.5), X[:4], Y[:4], clip=clip)
        np.testing.assert_allclose(t.losses, k.losses, rtol=1e-4)
        runs[clip] = (t, [p.detach().numpy().copy() for p in tm.parameters()])
    moved = runs[1e-3][0].update_ratios
    assert all(moved[g][0] < 1e-2 * runs[None][0].update_ratios[g][0] for g in moved)
    assert not np.allclose(runs[None][1][0], runs[1e-3][1][0])


def test_train_lm_refuses_a_rollback_guard_or_scheduler_of_another_run():
    model, other = gt.transformer(WEIGHTS), gt.transformer(WEIGHTS)
    opt, other_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(other.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    with pytest.raises(ValueError, match="rollback must restore this run's model, optimizer and scheduler"):
        gt.train_lm(model, opt, X, Y, rollback=gt.Rollback(other, other_opt))
    with pytest.raises(ValueError, match="rollback must restore"):
        gt.train_lm(model, opt, X, Y, scheduler=sched, rollback=gt.Rollback(model, opt))
    with pytest.raises(ValueError, match="guard must step this optimizer"):
        gt.train_lm(model, opt, X, Y, guard=gt.GradGuard(other, other_opt))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="scheduler must be a learning-rate scheduler"):
        gt.train_lm(model, opt, X, Y, scheduler="warmup")
    with pytest.raises(ValueError, match="spike_at must be the index of one of the 12 batches, got 12"):
        gt.train_lm(model, opt, X, Y, spike_at=12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any step
    km, ko = gk.transformer(WEIGHTS), keras.optimizers.Adam()
    with pytest.raises(ValueError, match="rollback must restore this run's model, optimizer and scheduler"):
        gk.train_lm(km, ko, X, Y, rollback=gk.Rollback(km, keras.optimizers.Adam()))
    with pytest.raises(ValueError, match="spike_at must be the index"):
        gk.train_lm(km, ko, X, Y, spike_at=100)


def test_unigram_entropy_of_large_ids():
    assert diagnose.unigram_entropy(np.array([10**12, 5, 10**12, 5])) == pytest.approx(math.log(2))


def test_torch_attention_logits_unbatched_with_key_padding_and_refusals():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2)
    tracker = gt.AttentionLogits(mha)
    q = torch.randn(5, 8)
    padding = torch.tensor([False, False, False, True, True])
    mha(q, q, q, key_padding_mask=padding)
    w, b = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
    qq, kk = (q.numpy()[None] @ w[i * 8:(i + 1) * 8].T + b[i * 8:(i + 1) * 8] for i in (0, 1))
    allowed = np.tile([True, True, True, False, False], (5, 1))
    assert float(tracker.values()[0]) == pytest.approx(_numpy_max_logit(qq, kk, 2, allowed), rel=1e-5)
    tracker.remove()
    bad = torch.nn.ModuleList([torch.nn.MultiheadAttention(8, 2), torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)])
    with pytest.raises(ValueError, match="model.1: MultiheadAttention with bias_k"):
        gt.AttentionLogits(bad)
    assert not bad[0]._forward_pre_hooks  # nothing installed on the first layer either


def test_keras_trackers_stack_and_refuse_several_attention_axes():
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    h = (3 * np.random.default_rng(1).standard_normal((2, 5, 8))).astype("float32")
    mha(h, h)
    first, second = gk.AttentionLogits(mha), gk.AttentionLogits(mha)
    mha(h, h)
    value = float(first.values()[0])
    assert value > 0 and float(second.values()[0]) == value
    second.remove()
    mha(2 * h, 2 * h)  # zero biases: every logit scales by 4
    assert float(first.values()[0]) == pytest.approx(4 * value, rel=1e-5)  # the first tracker still records
    first.remove()
    assert "_compute_attention" not in vars(mha)
    axes = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))
    with pytest.raises(ValueError, match=r"not attention_axes=\(1, 2\)"):
        gk.AttentionLogits(axes)
