"""FSDP2 (``fully_shard``) on two gloo processes: gradtools on sharded parameters gives the numbers,
decisions and weights of the unsharded model fed the concatenated batch.

Every function below runs unchanged on the sharded model (in each of two processes, each with its
half of the batch) and on the unsharded one (in the test process, with the whole batch).
"""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD, BATCH, STEPS = 2, 8, 20
NAN_AT, SPIKE_AT = 9, 14


def _model(sizes=(5, 7, 7, 3)):
    torch.manual_seed(0)  # 7 rows: shards of 4 and 3 rows, uneven as FSDP2 allows
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _batches():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, WORLD * BATCH, 5, generator=g), torch.randn(STEPS, WORLD * BATCH, 3, generator=g)


def _backward(model, x, y, step):
    model.zero_grad()
    scale = 1000.0 if step == SPIKE_AT else 1.0
    (scale * torch.nn.functional.mse_loss(model(x), y)).backward()
    if step == NAN_AT:
        from gradtools.torch.norms import local

        grad = model[2].weight.grad
        if local(grad).shape[0] and (not dist.is_initialized() or dist.get_rank() == 0):
            local(grad)[0, 0] = math.nan  # row 0 lives on rank 0


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model, x, y, sync):
    """20 guarded, ZClip-clipped Adam steps with a NaN and a spike; what each step measured and decided."""
    import gradtools.torch as gt
    from gradtools.policies import SpikeDetector, ZClip

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    monitor = gt.Monitor(model)
    guard = gt.GradGuard(model, opt, spike=SpikeDetector(window=8, min_history=4),
                         clipper=gt.Clipper(ZClip(warmup_steps=4)), monitor=monitor, sync=sync)
    out = {"stats": [], "reasons": [], "thresholds": []}
    for step in range(STEPS):
        _backward(model, x[step], y[step], step)
        out["stats"].append(gt.grad_stats(model).as_dict() if step != NAN_AT else None)
        result = guard.step()
        out["reasons"].append(result.reason)
        out["thresholds"].append(float(result.threshold))
        if step == 6:
            out["clipped_grads"] = [_full(p.grad).clone() for p in model.parameters()]
    out["weights"] = [_full(p.detach()).clone() for p in model.parameters()]
    out["monitor"] = monitor.history["norms"]
    out["guard"] = guard.state_dict()
    return out


def _agc(model, x, y):
    """Five SGD steps with unit-wise clipping (AGC); the counts and the weights."""
    import gradtools.torch as gt

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counts = []
    for step in range(5):
        _backward(model, x[step], y[step], step=-1)
        counts.append(int(gt.adaptive_clip_grad_(model, clip_factor=0.05)))
        opt.step()
    return {"counts": counts, "weights": [_full(p.detach()).clone() for p in model.parameters()]}


def _accumulate(model, x, y):
    """Five guarded, clipped steps of two accumulated micro-batches (each rank splits its own half)."""
    import gradtools.torch as gt

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = gt.Accumulator(model, opt, 2, guard=gt.GradGuard(model, opt), clipper=gt.Clipper(0.05))
    norms = []
    for step in range(5):
        half = x.shape[1] // 2
        for part in (slice(0, half), slice(half, None)):
            loss = torch.nn.functional.mse_loss(model(x[step, part]), y[step, part])
            acc.backward(loss, batch_size=half)
        norms.append(float(acc.last_guard.stats.total))
    return {"norms": norms, "weights": [_full(p.detach()).clone() for p in model.parameters()]}


def _inf_norms(model, x):
    """The max-norm and unit-wise clipping of a layer with one row: rank 1's shard of it is empty."""
    import gradtools.torch as gt

    model.zero_grad()
    model(x[0]).pow(2).mean().backward()
    stats = gt.grad_stats(model, norm_type=math.inf).as_dict()
    agc = int(gt.adaptive_clip_grad_(model, clip_factor=0.01))
    clipped = gt.clip_grad_norm_(model.parameters(), 1e-3, norm_type=math.inf)
    return {"stats": stats, "agc": agc, "clipped": float(clipped),
            "grads": [_full(p.grad).clone() for p in model.parameters()]}


def _nan_in_the_last_shard(model, x):
    """A NaN in row 6 of the first weight, which the last rank holds: every norm type sees it."""
    import gradtools.torch as gt
    from gradtools.torch.norms import local

    out = {}
    for norm_type in (1.0, 2.0, math.inf):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = gt.GradGuard(model, opt, clipper=gt.Clipper(1.0, norm_type=norm_type))
        model.zero_grad()
        model(x[0]).pow(2).mean().backward()
        grad = model[0].weight.grad
        if not dist.is_initialized():
            grad[6, 0] = math.nan
        elif dist.get_rank() == WORLD - 1:
            local(grad)[-1, 0] = math.nan
        stats = gt.grad_stats(model, norm_type=norm_type)
        out[norm_type] = (math.isnan(float(stats.total)), math.isnan(float(stats.norms[0])),
                          guard.step().reason, stats.first_nonfinite())
    return out


def _sharded_model(sizes=(5, 7, 7, 3)):
    from torch.distributed.fsdp import fully_shard

    model = _model(sizes)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _worker(rank, port, out_dir):
    import gradtools.torch as gt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = _batches()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    x, y = x[:, mine], y[:, mine]
    out = {sync: _train(_sharded_model(), x, y, sync) for sync in (True, False)}
    out["agc"] = _agc(_sharded_model(), x, y)
    out["accumulate"] = _accumulate(_sharded_model(), x, y)
    # one collective measures every layer
    model = _sharded_model()
    _backward(model, x[0], y[0], 0)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        gt.grad_stats(model)
        out["collectives"] = len(calls)
    finally:
        dist.all_reduce = real
    out["inf"] = _inf_norms(_sharded_model(sizes=(5, 1)), x)
    out["nan"] = _nan_in_the_last_shard(_sharded_model(), x)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, rtol=1e-5):
    """Per tensor ||a - b|| / ||b|| <= rtol."""
    for p, q in zip(a, b):
        assert float((p - q).norm()) <= rtol * float(q.norm()), (p, q)


def test_fsdp2_sharded_training_matches_the_unsharded_model(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, y = _batches()
    assert ranks[0]["collectives"] == 1  # all layers' norms in one all-reduce
    for sync in (True, False):
        ref = _train(_model(), x, y, sync)
        for got in (r[sync] for r in ranks):
            assert got["reasons"] == ref["reasons"]  # identical decisions on every rank
            assert got["reasons"][NAN_AT] == "nonfinite" and got["reasons"][SPIKE_AT] == "spike"
            assert "ok" in got["reasons"]
            for mine, want in zip(got["stats"], ref["stats"]):
                if want is None:
                    continue
                assert mine["total_norm"] == pytest.approx(want["total_norm"], rel=1e-5)
                assert mine["norms"].keys() == want["norms"].keys()
                for name in want["norms"]:  # the full per-layer norms, not each rank's shard
                    assert mine["norms"][name] == pytest.approx(want["norms"][name], rel=1e-5)
                assert mine["nonfinite"] == want["nonfinite"]
            finite = [t for t in ref["thresholds"] if math.isfinite(t)]
            assert finite and [t for t in got["thresholds"] if math.isfinite(t)] == pytest.approx(finite, rel=1e-5)
            for name, norms in ref["monitor"].items():
                assert got["monitor"][name] == pytest.approx(norms, rel=1e-5, nan_ok=True)
            _close(got["clipped_grads"], ref["clipped_grads"])
            _close(got["weights"], ref["weights"])
            assert got["guard"]["skipped"] == ref["guard"]["skipped"] == 2
    ref = _agc(_model(), x, y)
    for r in ranks:
        assert r["agc"]["counts"] == ref["counts"] and sum(ref["counts"]) > 0
        _close(r["agc"]["weights"], ref["weights"])
    ref = _accumulate(_model(), x, y)
    for r in ranks:
        assert r["accumulate"]["norms"] == pytest.approx(ref["norms"], rel=1e-5)
        _close(r["accumulate"]["weights"], ref["weights"])
    ref = _inf_norms(_model(sizes=(5, 1)), x)
    for r in ranks:
        assert r["inf"]["stats"]["total_norm"] == pytest.approx(ref["stats"]["total_norm"], rel=1e-6)
        assert r["inf"]["stats"]["norms"] == pytest.approx(ref["stats"]["norms"], rel=1e-6)
        assert r["inf"]["agc"] == ref["agc"] > 0
        assert r["inf"]["clipped"] == pytest.approx(ref["clipped"], rel=1e-6)
        _close(r["inf"]["grads"], ref["grads"])
    ref = _nan_in_the_last_shard(_model(), x)
    assert ref == {p: (True, True, "nonfinite", "0.weight") for p in (1.0, 2.0, math.inf)}
    for r in ranks:  # a max over NaN is no NaN to a gloo all-reduce: the NaN must still come through
        assert r["nan"] == ref
