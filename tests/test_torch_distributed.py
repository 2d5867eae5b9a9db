"""Two processes, gloo on loopback: accumulation under DDP equals one process on the large batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD, MICRO, STEPS, ACC = 2, 3, 3, 2  # per rank: ACC micro-batches of MICRO samples per step


def _data():
    g = torch.Generator().manual_seed(1)
    n = WORLD * MICRO * ACC * STEPS
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _worker(rank, port, out_dir):
    import gradtools.torch as gt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        fut = dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    clipper = gt.Clipper(0.05)
    acc = gt.Accumulator(model, opt, accumulation_steps=ACC, clipper=clipper)
    x, y = _data()
    per_step = WORLD * MICRO * ACC
    norms = []
    for s in range(STEPS):
        chunk = slice(s * per_step, (s + 1) * per_step)
        xs, ys = x[chunk], y[chunk]
        for m in range(ACC):
            # rank r takes micro-batch m of its half of the step's batch
            lo = rank * MICRO * ACC + m * MICRO
            with acc.accumulate(batch_size=MICRO):
                acc.backward(torch.nn.functional.mse_loss(model(xs[lo:lo + MICRO]), ys[lo:lo + MICRO]))
        if s == 0 and rank == 0:
            with pytest.raises(RuntimeError, match="inside `with acc.accumulate"):
                acc.backward(torch.zeros(()), batch_size=1)  # no DDP forward: the check comes first
        norms.append(float(acc.last_clip.norm_before))
    torch.save({"params": [p.detach() for p in model.module.parameters()], "allreduces": len(calls), "norms": norms},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_no_sync_accumulation_matches_single_process(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # no_sync: one all-reduce per optimizer step (one bucket for this small model), not per micro-batch
    assert results[0]["allreduces"] == STEPS
    # clipping saw the same global norm on both ranks, and the weights are identical
    assert results[0]["norms"] == results[1]["norms"]
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
    # one process, the whole batch at once, clipped the same way
    import gradtools.torch as gt

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = _data()
    per_step = WORLD * MICRO * ACC
    for s in range(STEPS):
        opt.zero_grad()
        chunk = slice(s * per_step, (s + 1) * per_step)
        torch.nn.functional.mse_loss(model(x[chunk]), y[chunk]).backward()
        gt.clip_grad_norm_(model, 0.05)
        opt.step()
    for a, b in zip(results[0]["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
