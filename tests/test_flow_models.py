"""Residual and normalised MLPs, per-layer gradient flow and weight penalties, PyTorch against Keras."""

import numpy as np
import pytest
import torch

import gradtools.keras as gk
import gradtools.torch as gt
from gradtools import data, models
from gradtools.runtime import import_keras

keras = import_keras()

X, Y = data.digits(one_hot=True)
X, Y = X[:256], Y[:256]
ARCHS = [(norm, placement) for norm in (None, "batch", "layer") for placement in ("pre", "post")]


@pytest.mark.parametrize("norm, placement", ARCHS)
def test_residual_mlps_agree_layer_by_layer(norm, placement):
    w = models.init_residual_mlp(64, 32, blocks=12, out_features=10, seed=1)
    tm = gt.residual_mlp(w, norm=norm, placement=placement)
    km = gk.residual_mlp(w, norm=norm, placement=placement)
    out_t = tm(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(km(X, training=True).numpy(), out_t, rtol=1e-4, atol=1e-5)
    t = gt.layer_gradients(tm, X, Y)
    k = gk.layer_gradients(km, X, Y)
    assert len(t.names) == len(k.names) == 14
    assert t.names[0] == "stem" and t.names[1] == "blocks.0" and t.names[-1] == "head"
    assert k.names[0].endswith("dense_0") and k.names[-1].endswith("dense_13")
    np.testing.assert_allclose(k.grad_norms, t.grad_norms, rtol=1e-4)
    np.testing.assert_allclose(k.weight_norms, t.weight_norms, rtol=1e-6)
    assert k.loss == pytest.approx(t.loss, rel=1e-5)


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_plain_mlps_with_norms_agree(norm):
    w = models.init_mlp([64, 32, 32, 32, 10], seed=0)
    tm, km = gt.mlp(w, norm=norm), gk.mlp(w, norm=norm)
    kind = {None: [], "batch": ["BatchNorm1d"], "layer": ["LayerNorm"]}[norm]
    assert [type(m).__name__ for m in tm] == (["Linear"] + kind + ["ReLU"]) * 3 + ["Linear"]
    np.testing.assert_allclose(gk.layer_gradients(km, X, Y).grad_norms, gt.layer_gradients(tm, X, Y).grad_norms,
                               rtol=1e-4)
    if norm == "batch":
        # after one training pass the running statistics moved at the same rate (torch 0.1 = Keras 0.9);
        # torch updates the running variance with the unbiased batch variance, Keras with the biased one
        bn_t, bn_k = tm[1], km.get_layer("batchnorm_0")
        np.testing.assert_allclose(bn_k.moving_mean.numpy(), bn_t.running_mean.numpy(), rtol=1e-4, atol=1e-6)
        n = len(X)
        np.testing.assert_allclose((bn_t.running_var.numpy() - 0.9) / (bn_k.moving_variance.numpy() - 0.9),
                                   n / (n - 1), rtol=1e-3)


def test_residual_without_branches_is_the_plain_stem_and_head():
    """branch_scale=0 makes every block the identity: the network is stem, activation, head."""
    w = models.init_residual_mlp(64, 16, blocks=5, out_features=10, seed=3, branch_scale=0.0)
    short = gt.mlp([w[0], w[-1]])
    deep = gt.residual_mlp(w)
    np.testing.assert_allclose(deep(torch.from_numpy(X)).detach().numpy(),
                               short(torch.from_numpy(X)).detach().numpy(), rtol=1e-6)


def test_init_residual_mlp_scales_only_the_branches():
    plain = models.init_mlp([8] + [16] * 4 + [3], seed=5)
    res = models.init_residual_mlp(8, 16, blocks=3, out_features=3, seed=5, branch_scale=0.25)
    for i, ((kp, bp), (kr, br)) in enumerate(zip(plain, res)):
        factor = 0.25 if 1 <= i <= 3 else 1.0
        np.testing.assert_allclose(kr, factor * kp, rtol=1e-6)
        assert kr.dtype == np.float32 and br.dtype == np.float32


def test_lecun_gain_sqrt2_is_he():
    he = models.init_mlp([10, 20, 5], init="he", seed=0)
    lecun = models.init_mlp([10, 20, 5], init="lecun", seed=0, gain=2 ** 0.5)
    for (a, _), (b, _) in zip(he, lecun):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_torch_layer_gradients_match_backward_and_leave_grad_alone():
    w = models.init_mlp([64, 32, 32, 10], seed=2)
    model = gt.mlp(w)
    flow = gt.layer_gradients(model, X, Y)
    assert all(p.grad is None for p in model.parameters())
    torch.nn.functional.mse_loss(model(torch.from_numpy(X)), torch.from_numpy(Y)).backward()
    expected = [float(model[i].weight.grad.norm()) for i in (0, 2, 4)]
    np.testing.assert_allclose(flow.grad_norms, expected, rtol=1e-6)
    np.testing.assert_allclose(flow.ratios, flow.grad_norms / flow.weight_norms)
    assert flow.as_dict() == dict(zip(["0", "2", "4"], flow.grad_norms.tolist()))
    assert flow.spread() == pytest.approx(max(expected) / min(expected))


def test_layer_gradients_of_any_model_conv_and_callable_loss():
    """Conv kernels are weight matrices too; a callable loss follows each framework's argument order."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 62, 10))
    xs = X[:, None, :]
    flow = gt.layer_gradients(conv, xs, Y, loss=lambda out, t: (out - t).abs().mean())
    assert flow.names == ["0", "2"] and np.all(flow.grad_norms > 0)
    inp = keras.Input((64, 1))
    kconv = keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(keras.layers.Conv1D(4, 3)(inp))))
    kflow = gk.layer_gradients(kconv, X[:, :, None], Y, loss=lambda t, p: keras.ops.mean(keras.ops.abs(p - t)))
    assert len(kflow.names) == 2 and np.all(kflow.grad_norms > 0)


def test_weight_penalty_is_the_keras_kernel_regularizer():
    w = models.init_mlp([64, 32, 32, 10], seed=4)
    l1, l2 = 3e-3, 2e-2
    tm = gt.mlp(w)
    km = gk.mlp(w, kernel_regularizer=keras.regularizers.L1L2(l1, l2))
    km_plain = gk.mlp(w)
    expected = sum(l1 * np.abs(k).sum() + l2 * np.square(k).sum() for k, _ in w)
    assert float(gt.weight_penalty(tm, l1, l2).detach()) == pytest.approx(expected, rel=1e-5)
    assert float(sum(km.losses)) == pytest.approx(expected, rel=1e-5)
    assert float(gk.weight_penalty(km_plain, l1, l2)) == pytest.approx(expected, rel=1e-5)
    t = gt.layer_gradients(tm, X, Y, l1=l1, l2=l2)
    k = gk.layer_gradients(km, X, Y)  # the regularizer is in model.losses
    k2 = gk.layer_gradients(km_plain, X, Y, l1=l1, l2=l2)
    np.testing.assert_allclose(k.grad_norms, t.grad_norms, rtol=1e-4)
    np.testing.assert_allclose(k2.grad_norms, t.grad_norms, rtol=1e-4)
    assert k.loss == pytest.approx(t.loss, rel=1e-5)


def test_l1_adds_exactly_lambda_sign_w():
    w = models.init_mlp([64, 16, 10], seed=6)
    lam = 0.05
    grads = {}
    for strength in (0.0, lam):
        model = gt.mlp(w)
        loss = torch.nn.functional.mse_loss(model(torch.from_numpy(X)), torch.from_numpy(Y))
        (loss + gt.weight_penalty(model, l1=strength)).backward()
        grads[strength] = model[0].weight.grad.clone()
    diff = (grads[lam] - grads[0.0]).numpy()
    np.testing.assert_allclose(diff, lam * np.sign(w[0][0].T), atol=1e-6)


def test_train_with_penalty_agrees_across_frameworks():
    w = models.init_mlp([64, 32, 10], seed=7)
    kw = dict(steps=5, l2=1e-2)
    tm = gt.mlp(w)
    t = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.1), X, Y, **kw)
    km = gk.mlp(w, kernel_regularizer=keras.regularizers.L2(1e-2))
    k = gk.train(km, keras.optimizers.SGD(0.1), X, Y, steps=5)  # the regularizer, not l2=
    np.testing.assert_allclose(k.losses, t.losses, rtol=1e-5)
    np.testing.assert_allclose(k.weight_norms, t.weight_norms, rtol=1e-5)
    assert t.weight_norms[0] == pytest.approx(np.sqrt(sum(np.square(k).sum() + np.square(b).sum() for k, b in w)),
                                              rel=1e-5)
    pm = gt.mlp(w)
    plain = gt.train(pm, torch.optim.SGD(pm.parameters(), lr=0.1), X, Y, steps=5)
    assert t.losses[0] > plain.losses[0]  # the penalty is part of the reported loss


def test_keras_train_full_batch_includes_regularizers():
    w = models.init_mlp([64, 16, 10], seed=8)
    plain = gk.train_full_batch(gk.mlp(w), X, Y, lr=0.1, steps=2)
    reg = gk.train_full_batch(gk.mlp(w, kernel_regularizer=keras.regularizers.L1(0.01)), X, Y, lr=0.1, steps=2)
    expected = 0.01 * sum(np.abs(k).sum() for k, _ in w)
    assert reg[0] - plain[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("backend", [gt, gk], ids=["torch", "keras"])
def test_bad_arguments_are_named(backend):
    w = models.init_residual_mlp(8, 8, blocks=2, out_features=2)
    with pytest.raises(ValueError, match="norm"):
        backend.mlp(w, norm="group")
    with pytest.raises(ValueError, match="placement"):
        backend.residual_mlp(w, placement="middle")
    bad = list(w)
    bad[1] = (np.zeros((8, 4), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"weights\[1\].*\(8, 8\)"):
        backend.residual_mlp(bad)
    with pytest.raises(ValueError, match="stem"):
        backend.residual_mlp(w[:2])
    model = backend.mlp(w)
    x, y = np.ones((4, 8), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="l1"):
        backend.layer_gradients(model, x, y, l1=-1.0)
    with pytest.raises(ValueError, match="loss"):
        backend.layer_gradients(model, x, y, loss="mae")
    with pytest.raises(TypeError, match="loss"):
        backend.layer_gradients(model, x, y, loss=3)
    with pytest.raises(ValueError, match="l2"):
        backend.weight_penalty(model, l2=-0.1)
    with pytest.raises(ValueError, match="branch_scale"):
        models.init_residual_mlp(8, 8, blocks=2, out_features=2, branch_scale=-1.0)


def test_layer_gradients_refuse_models_without_weight_matrices():
    with pytest.raises(ValueError, match="no trainable weight matrices"):
        gt.layer_gradients(torch.nn.LayerNorm(4), np.ones((2, 4), np.float32), np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="model"):
        gt.layer_gradients("net", X, Y)
    with pytest.raises(TypeError, match="model"):
        gk.layer_gradients("net", X, Y)


def test_layer_gradients_norms_do_not_underflow_or_overflow():
    """Norms are taken in float64: a vanishing gradient is not reported as 0, a huge float64 one not as inf."""
    w = models.init_mlp([4, 2], seed=0)
    x, y = np.ones((8, 4), np.float32), np.zeros((8, 2), np.float32)
    tiny_t = gt.layer_gradients(gt.mlp(w), x, y, loss=lambda p, t: 1e-22 * p.sum()).grad_norms[0]
    tiny_k = gk.layer_gradients(gk.mlp(w), x, y, loss=lambda t, p: 1e-22 * keras.ops.sum(p)).grad_norms[0]
    expected = 1e-22 * 8 * np.sqrt(8)  # each of the 8 kernel entries' gradients is 8 (eight ones) times 1e-22
    assert tiny_t == pytest.approx(expected, rel=1e-5, abs=0) and tiny_k == pytest.approx(expected, rel=1e-5, abs=0)
    huge = gt.layer_gradients(gt.mlp(w).double(), x, y, loss=lambda p, t: 1e22 * p.sum()).grad_norms[0]
    assert huge == pytest.approx(1e22 * 8 * np.sqrt(8), rel=1e-9)  # its squares overflow float32


def test_keras_float64_models_take_penalties():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, dtype="float64")])
    x, y = np.ones((8, 4)), np.zeros((8, 2))
    assert float(gk.weight_penalty(model, l2=0.1)) > 0
    flow = gk.layer_gradients(model, x, y, l2=0.1)
    assert flow.loss > 0 and np.all(np.isfinite(flow.grad_norms))
    trace = gk.train(model, keras.optimizers.SGD(0.01), x, y, steps=2, l1=0.1)
    assert np.all(np.isfinite(trace.losses))


def test_inputs_labels_and_shapes_are_handled_alike():
    w = models.init_mlp([64, 16, 1], seed=9)
    target = np.linspace(-1, 1, len(X)).astype(np.float32)  # shape (N,) for an (N, 1) output
    t = gt.layer_gradients(gt.mlp(w), X, target)
    k = gk.layer_gradients(gk.mlp(w), X, target.tolist())  # a plain list, as a user may pass it
    np.testing.assert_allclose(k.grad_norms, t.grad_norms, rtol=1e-4)
    assert k.loss == pytest.approx(t.loss, rel=1e-5)
    with pytest.raises(ValueError, match=r"y has shape \(256, 3\) but the model outputs \(256, 1\)"):
        gt.layer_gradients(gt.mlp(w), X, np.zeros((len(X), 3), np.float32))
    labels = np.arange(len(X)) % 10
    wc = models.init_mlp([64, 16, 10], seed=9)
    for dtype in (np.int32, np.int64):  # int32 labels work in PyTorch too
        t = gt.layer_gradients(gt.mlp(wc), X, labels.astype(dtype), loss="crossentropy")
        k = gk.layer_gradients(gk.mlp(wc), X, labels.astype(dtype), loss="crossentropy")
        np.testing.assert_allclose(k.grad_norms, t.grad_norms, rtol=1e-4)
    tm = gt.mlp(wc)
    trace = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.1), X, labels.astype(np.int32), steps=2,
                     loss="crossentropy")
    assert np.all(np.isfinite(trace.losses))


def test_keras_layer_gradients_of_a_multi_input_model():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    out = keras.layers.Dense(1, name="out")(keras.layers.Concatenate()([keras.layers.Dense(4, name="da")(a), b]))
    model = keras.Model([a, b], out)
    xa, xb, y = np.ones((5, 3), np.float32), np.ones((5, 2), np.float32), np.zeros((5, 1), np.float32)
    as_list = gk.layer_gradients(model, [xa, xb], y)
    as_dict = gk.layer_gradients(model, {"a": xa, "b": xb}, y)
    assert [n.split("/")[-1] for n in as_list.names] == ["da", "out"]
    np.testing.assert_allclose(as_dict.grad_norms, as_list.grad_norms)


def test_weight_norms_count_every_trainable_weight_in_both_frameworks():
    """A layer the forward pass never uses still has weights: both traces count them."""
    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(4, 2)
            self.spare = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    class KUnused(keras.Model):
        def __init__(self):
            super().__init__()
            self.used, self.spare = keras.layers.Dense(2), keras.layers.Dense(2)

        def build(self, shape):
            self.used.build(shape)
            self.spare.build(shape)

        def call(self, x):
            return self.used(x)

    tm, km = Unused(), KUnused()
    x, y = np.ones((8, 4), np.float32), np.zeros((8, 2), np.float32)
    km.build((None, 4))
    for layer_t, layer_k in ((tm.used, km.used), (tm.spare, km.spare)):
        layer_k.set_weights([layer_t.weight.detach().numpy().T, layer_t.bias.detach().numpy()])
    t = gt.train(tm, torch.optim.SGD(tm.parameters(), lr=0.1), x, y, steps=2)
    k = gk.train(km, keras.optimizers.SGD(0.1), x, y, steps=2)
    np.testing.assert_allclose(k.weight_norms, t.weight_norms, rtol=1e-5)


def test_more_arguments_are_named():
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        gk.weight_penalty("m", l2=1.0)
    for kwargs, name in ((dict(width=0), "width"), (dict(in_features=2.5), "in_features"),
                         (dict(out_features=-1), "out_features")):
        args = dict(in_features=4, width=8, blocks=2, out_features=2) | kwargs
        with pytest.raises((TypeError, ValueError), match=name):
            models.init_residual_mlp(**args)
    with pytest.raises(ValueError, match="recurrent"):
        models.init_rnn(2, 4, 1.0, recurrent="unitary")


def test_multi_input_models_train_and_subclassed_ones_measure():
    """The trainers take what layer_gradients takes; a subclassed model with two inputs works too."""
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    out = keras.layers.Dense(1)(keras.layers.Concatenate()([keras.layers.Dense(4)(a), b]))
    model = keras.Model([a, b], out)
    xa, xb, y = np.ones((5, 3), np.float32), np.ones((5, 2), np.float32), np.zeros((5, 1), np.float32)
    for x in ([xa, xb], {"a": xa, "b": xb}):
        assert np.all(np.isfinite(gk.train(model, keras.optimizers.SGD(0.01), x, y, steps=2).losses))
        assert np.all(np.isfinite(gk.train_full_batch(model, x, y, lr=0.01, steps=2)))

    class Two(keras.Model):
        def __init__(self):
            super().__init__()
            self.da, self.out = keras.layers.Dense(4), keras.layers.Dense(1)

        def call(self, inputs):
            first, second = inputs
            return self.out(keras.ops.concatenate([self.da(first), second], axis=-1))

    flow = gk.layer_gradients(Two(), [xa, xb], y)
    assert len(flow.names) == 2 and np.all(flow.grad_norms > 0)


def test_keras_penalty_of_mixed_precision_layers():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2, dtype="float64")])
    expected = sum(0.1 * np.abs(k).sum() + 0.1 * np.square(k).sum() for k in
                   (model.layers[0].kernel.numpy(), model.layers[1].kernel.numpy()))
    assert float(gk.weight_penalty(model, l1=0.1, l2=0.1)) == pytest.approx(expected, rel=1e-5)
    flow = gk.layer_gradients(model, np.ones((8, 4), np.float32), np.zeros((8, 2)), l2=0.1)
    assert np.all(np.isfinite(flow.grad_norms))
