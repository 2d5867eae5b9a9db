"""gradtools.torch clipping and norms against torch.nn.utils itself."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradtools.torch as gt
from gradtools.policies import AutoClip, ZClip
from torch_helpers import backward, tiny_mlp

shapes = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3), min_size=1, max_size=6)


def _grads(shape_list, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(s), generator=g) * scale for s in shape_list]


def _params(grads):
    out = []
    for gr in grads:
        p = torch.nn.Parameter(torch.zeros_like(gr))
        p.grad = gr.clone()
        out.append(p)
    return out


@given(shapes, st.integers(0, 2**16), st.sampled_from([1e-3, 1.0, 1e3]), st.sampled_from([2.0, math.inf, 1.0, 3.0]),
       st.floats(1e-3, 1e3), st.sampled_from([None, True, False]))
def test_clip_grad_norm_parity(shape_list, seed, scale, norm_type, max_norm, foreach):
    grads = _grads(shape_list, seed, scale)
    ours, ref = _params(grads), _params(grads)
    n_ours = gt.clip_grad_norm_(ours, max_norm, norm_type=norm_type, foreach=foreach)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=foreach)
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-6, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)
    total = gt.get_total_norm(grads, norm_type=norm_type, foreach=foreach)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=foreach),
                               rtol=1e-6, atol=0)


@given(shapes, st.integers(0, 2**16), st.floats(1e-3, 10.0), st.sampled_from([None, True, False]))
def test_clip_grad_value_parity(shape_list, seed, clip_value, foreach):
    grads = _grads(shape_list, seed, 3.0)
    ours, ref = _params(grads), _params(grads)
    assert gt.clip_grad_value_(ours, clip_value, foreach=foreach) is None
    torch.nn.utils.clip_grad_value_(ref, clip_value, foreach=foreach)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)


@given(shapes, st.integers(0, 2**16))
def test_grad_stats_total_equals_torch(shape_list, seed):
    grads = _grads(shape_list, seed, 1.0)
    params = _params(grads)
    stats = gt.grad_stats([(f"p{i}", p) for i, p in enumerate(params)])
    torch.testing.assert_close(stats.total, torch.nn.utils.get_total_norm(grads), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.norms, torch.stack([g.norm() for g in grads]), rtol=1e-6, atol=0)
    assert stats.names == [f"p{i}" for i in range(len(grads))]
    assert stats.nonfinite.tolist() == [0] * len(grads)


def test_nonfinite_counts_and_names():
    m = tiny_mlp()
    backward(m)
    m[0].weight.grad[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    m[2].bias.grad[1] = math.nan
    s = gt.grad_stats(m)
    assert s.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert s.nonfinite.tolist() == [3, 0, 0, 1]
    assert s.first_nonfinite() == "0.weight"
    assert not s.is_finite()
    d = s.as_dict()
    assert d["nonfinite"]["2.bias"] == 1 and math.isnan(d["total_norm"])


def test_error_if_nonfinite_matches_torch():
    m = tiny_mlp()
    backward(m)
    m[0].weight.grad[0, 0] = math.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gt.clip_grad_norm_(m, 1.0, error_if_nonfinite=True)


def test_update_ratios():
    m = tiny_mlp()
    before = gt.snapshot(m)
    with torch.no_grad():
        m[0].weight.mul_(1.5)
    r = gt.update_ratios(m, before)
    assert r[0].item() == pytest.approx(0.5, rel=1e-6)
    assert r[1].item() == 0.0


def test_agc_unitwise():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # row norms 5 and 0
    w.grad = torch.tensor([[30.0, 40.0], [1.0, 0.0]])  # row grad norms 50 and 1
    n = gt.adaptive_clip_grad_([("w", w)], clip_factor=0.1, eps=1e-3)
    assert n == 2
    torch.testing.assert_close(w.grad[0].norm(), torch.tensor(0.5))  # 0.1 * 5
    torch.testing.assert_close(w.grad[1].norm(), torch.tensor(1e-4))  # 0.1 * eps
    fc = torch.nn.Parameter(torch.ones(2, 2))
    fc.grad = torch.full((2, 2), 100.0)
    gt.adaptive_clip_grad_([("fc.weight", fc)], exclude=("fc",))
    assert torch.equal(fc.grad, torch.full((2, 2), 100.0))


@pytest.mark.parametrize("policy", [1.0, AutoClip(percentile=50), ZClip(warmup_steps=3)])
def test_clipper_reports_before_and_after(policy):
    m = tiny_mlp()
    clipper = gt.Clipper(policy)
    results = []
    for step in range(8):
        backward(m, seed=step, scale=100.0 if step == 6 else 1.0)
        results.append(clipper(m))
    spike = results[6]
    assert spike.clipped and float(spike.norm_after) == pytest.approx(float(spike.threshold), rel=1e-4)
    assert float(spike.norm_before) > float(spike.threshold)
    for r in results:
        if not r.clipped:
            assert torch.equal(r.norm_before, r.norm_after)


@pytest.mark.parametrize("call, exc, message", [
    (lambda m: gt.clip_grad_norm_(m, 0), ValueError, "max_norm must be a positive finite number, got 0"),
    (lambda m: gt.clip_grad_norm_(m, -1.0), ValueError, "max_norm must be a positive finite number, got -1.0"),
    (lambda m: gt.clip_grad_norm_(m, math.nan), ValueError, "max_norm must be a positive finite number, got nan"),
    (lambda m: gt.clip_grad_norm_(m, math.inf), ValueError, "max_norm must be a positive finite number, got inf"),
    (lambda m: gt.clip_grad_norm_(m, "1"), TypeError, "max_norm must be a real number, got '1'"),
    (lambda m: gt.clip_grad_norm_(m, 1.0, norm_type=-2), ValueError, "norm_type must be a number >= 1 or inf \\(a p-norm\\), got -2"),
    (lambda m: gt.clip_grad_norm_(42, 1.0), TypeError, "parameters must be a torch.nn.Module, a Tensor or an iterable"),
    (lambda m: gt.clip_grad_norm_([1.0, 2.0], 1.0), TypeError, r"parameters\[0\] must be a Tensor, got float"),
    (lambda m: gt.clip_grad_value_(m, 0.0), ValueError, "clip_value must be a positive finite number, got 0.0"),
    (lambda m: gt.adaptive_clip_grad_(m, clip_factor=-0.01), ValueError, "clip_factor must be a positive finite number"),
    (lambda m: gt.adaptive_clip_grad_(m, exclude=None), TypeError, "exclude must be a string or an iterable of strings"),
    (lambda m: gt.adaptive_clip_grad_(m, exclude=[1]), TypeError, "exclude must hold strings, got 1"),
    (lambda m: gt.top_hessian_eigenvalue(1, lambda m: 0), TypeError, "model must be a torch.nn.Module, got int"),
    (lambda m: gt.top_hessian_eigenvalue(m, 1), TypeError, "loss_fn must be callable, got int"),
    (lambda m: gt.top_hessian_eigenvalue(m, lambda m: m(torch.ones(2, 5)).pow(2).sum(), seed="a"), TypeError,
     "seed must be an int"),
    (lambda m: gt.grad_stats(tiny_mlp(1)), ValueError, "none has a gradient: call loss.backward"),
    (lambda m: gt.Clipper("never"), ValueError, "policy .never. is not a registered policy"),
    (lambda m: gt.GradGuard(m, "sgd"), TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
    (lambda m: gt.GradGuard(m, torch.optim.SGD(m.parameters(), lr=0.1), action="ignore"), ValueError,
     r"action must be one of \['raise', 'skip', 'zero'\], got 'ignore'"),
    (lambda m: gt.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), accumulation_steps=0), ValueError,
     "accumulation_steps must be an int >= 1, got 0"),
    (lambda m: gt.Monitor(m, every=0), ValueError, "every must be an int >= 1, got 0"),
    (lambda m: gt.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), 2, clipper=gt.Clipper(1.0),
                              guard=gt.GradGuard(m, torch.optim.SGD(m.parameters(), lr=0.1), clipper=gt.Clipper(2.0))),
     ValueError, "clipper and guard.clipper are both set and differ"),
])
def test_bad_input(call, exc, message):
    m = tiny_mlp()
    backward(m)
    before = [p.grad.clone() for p in m.parameters()]
    with pytest.raises(exc, match=message):
        call(m)
    for p, g in zip(m.parameters(), before):  # nothing was touched
        assert torch.equal(p.grad, g)


def test_clipping_takes_model_parameters_a_generator_read_once():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    m(torch.randn(8, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    total = gt.clip_grad_norm_(m.parameters(), 0.1)
    want = torch.nn.utils.get_total_norm(ref)
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert float(gt.get_total_norm([p.grad for p in m.parameters()])) == pytest.approx(0.1, rel=1e-4)
    r = gt.Clipper(0.05)(m.parameters())
    assert r.clipped and float(gt.get_total_norm([p.grad for p in m.parameters()])) == pytest.approx(0.05, rel=1e-4)


def _forms(model):
    """The forms ``torch.nn.utils`` accepts, plus gradtools' Module and named_parameters()."""
    return {"generator": lambda: model.parameters(), "list": lambda: list(model.parameters()),
            "named": lambda: model.named_parameters(), "module": lambda: model}


def _run_form(name, call):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    m(torch.randn(8, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
    out = call(_forms(m)[name]())
    return out, [p.grad.clone() for p in m.parameters()]


CALLS = {
    "clip_grad_norm_": lambda p: gt.clip_grad_norm_(p, 0.1),
    "clip_grad_value_": lambda p: gt.clip_grad_value_(p, 0.05),
    "clip_grads_with_norm_": lambda p: gt.clip_grads_with_norm_(p, 0.1, torch.tensor(2.0)),
    "adaptive_clip_grad_": lambda p: gt.adaptive_clip_grad_(p, clip_factor=0.01),
    "Clipper": lambda p: gt.Clipper(0.05)(p).norm_before,
    "Clipper.clip_to": lambda p: gt.Clipper(0.05).clip_to(p, 0.02).norm_after,
    "grad_stats": lambda p: gt.grad_stats(p).total,
    "snapshot": lambda p: torch.stack([t.sum() for t in gt.snapshot(p)]),
}


@pytest.mark.parametrize("form", ["generator", "named", "module"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_function_reads_its_parameters_once_with_the_result_of_a_list(name, form):
    want, want_grads = _run_form("list", CALLS[name])
    got, got_grads = _run_form(form, CALLS[name])
    assert (got is None) == (want is None)
    if want is not None:
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    untouched = _run_form("list", lambda p: None)[1]
    changed = not all(torch.equal(a, b) for a, b in zip(got_grads, untouched))
    assert changed == (name not in ("grad_stats", "snapshot"))  # each clipping function did clip


@pytest.mark.parametrize("empty", [lambda: [], lambda: torch.nn.ReLU(), lambda: torch.nn.ReLU().parameters(),
                                   lambda: iter([])], ids=["list", "module", "generator", "iterator"])
@pytest.mark.filterwarnings("ignore:`parameters` is an empty generator")  # torch's own, on the reference call
def test_no_parameters_gives_what_torch_nn_utils_gives(empty):
    for_torch = (lambda: torch.nn.ReLU().parameters()) if isinstance(empty(), torch.nn.Module) else empty
    assert torch.equal(gt.clip_grad_norm_(empty(), 1.0), torch.nn.utils.clip_grad_norm_(for_torch(), 1.0))
    assert torch.equal(gt.get_total_norm([]), torch.nn.utils.get_total_norm([]))  # it takes tensors, not modules
    # torch.nn.utils.clip_grad_value_([]) fails inside a foreach kernel; ours is the no-op it means
    assert gt.clip_grad_value_(empty(), 1.0) is None
    assert gt.clip_grads_with_norm_(empty(), 1.0, torch.tensor(2.0)) is None
    assert int(gt.adaptive_clip_grad_(empty())) == 0
    policy = AutoClip()
    r = gt.Clipper(policy)(empty())
    assert (float(r.norm_before), r.clipped, policy.steps) == (0.0, False, 0)  # the policy saw nothing


def test_parameters_without_gradients_give_what_torch_nn_utils_gives():
    m = torch.nn.Linear(3, 2)  # no backward yet: every grad is None
    assert torch.equal(gt.clip_grad_norm_(m.parameters(), 1.0), torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0))
    assert gt.clip_grad_value_(m.parameters(), 1.0) is None


def _timm_agc(grads_and_weights, clip_factor, eps):
    """timm.utils.agc.adaptive_clip_grad's rule, written out: a unit under its limit is left alone."""
    out = []
    for g, w in grads_and_weights:
        dims = tuple(range(1, g.ndim)) if g.ndim > 1 else None
        unit = (lambda x: x.norm(2, dim=dims, keepdim=True)) if dims else (lambda x: x.norm(2))
        max_norm = unit(w).clamp(min=eps) * clip_factor
        grad_norm = unit(g)
        out.append(torch.where(grad_norm < max_norm, g, g * (max_norm / grad_norm.clamp(min=1e-6))))
    return out


@pytest.mark.parametrize("eps, scale", [(1e-3, 1.0), (1e-5, 1e-8), (1e-5, 1.0)])
def test_agc_leaves_a_unit_under_its_limit_alone_as_timm_does(eps, scale):
    # eps=1e-5 on zero weights: the limit clip_factor * eps = 1e-7 is below the 1e-6 floor
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(4, 3)
    w[0] = torch.randn(3, generator=g)
    grad = torch.randn(4, 3, generator=g) * scale
    want = _timm_agc([(grad, w)], 0.01, eps)[0]
    p = torch.nn.Parameter(w.clone())
    p.grad = grad.clone()
    n = gt.adaptive_clip_grad_([("w", p)], clip_factor=0.01, eps=eps)
    assert torch.equal(p.grad, want)
    assert int(n) == int((~torch.isclose(want, grad)).any(dim=1).sum())


@pytest.mark.parametrize("norm", [1e-6, 1e-3, 1.0])
def test_the_clipper_scales_like_clip_grad_norm_when_the_norm_equals_the_threshold(norm):
    # AutoClip's first threshold is the first norm itself: torch.nn.utils multiplies by t / (t + 1e-6) there.
    ours, theirs = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    ours.grad = torch.tensor([0.6, 0.8]) * norm
    theirs.grad = ours.grad.clone()
    result = gt.Clipper(AutoClip(percentile=50))([ours])
    torch.nn.utils.clip_grad_norm_([theirs], float(torch.linalg.vector_norm(theirs.grad)))
    assert torch.equal(ours.grad, theirs.grad)
    assert result.clipped  # by t / (t + 1e-6): a hair at norm 1, a half at norm 1e-6
    assert float(result.norm_after) == pytest.approx(float(torch.linalg.vector_norm(ours.grad)), rel=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_mixed_dtypes_are_summed_in_torchs_order_bit_for_bit(seed):
    torch.manual_seed(seed)
    grads = [torch.randn(3), torch.randn(3).half(), torch.randn(3), torch.randn(4).bfloat16(), torch.randn(2).half()]
    assert torch.equal(gt.get_total_norm(grads), torch.nn.utils.get_total_norm(grads))
    ours, theirs = ([torch.nn.Parameter(g.clone()) for g in grads] for _ in range(2))
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    assert torch.equal(gt.clip_grad_norm_(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert torch.equal(gt.grad_stats(ours).total, torch.nn.utils.get_total_norm([a.grad for a in ours]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_result_says_clipped_exactly_when_the_factor_is_below_one(dtype):
    # thresholds within 1e-5 of the norm: where a flag worked out in float64 and a factor applied in
    # the norm's dtype disagree
    g = torch.Generator().manual_seed(0)
    disagreements = 0
    for _ in range(300):
        grad = (torch.randn(3, generator=g) * 10 ** (4 * torch.rand(1, generator=g) - 2)).to(dtype)
        norm = float(torch.linalg.vector_norm(grad))
        threshold = norm * float(1 + (torch.rand(1, generator=g) - 0.5) * 1e-5)  # right at the edge
        p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        p.grad = grad.clone()
        result = gt.Clipper(threshold)([p])
        # torch.nn.utils.clip_grad_norm_'s factor, in the norm's dtype
        factor = torch.clamp(threshold / (torch.nn.utils.get_total_norm([grad]) + 1e-6), max=1.0)
        disagreements += result.clipped != bool(factor < 1)
    assert disagreements == 0
