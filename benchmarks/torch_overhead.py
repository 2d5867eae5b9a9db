"""Overhead of gradtools' statistics, measured side by side in one process.

Prints ratios (gradtools / baseline); each pair is timed in alternation over
several rounds and the median of the per-round ratios is reported, so that
drift in machine load affects both sides alike.

    .venv/bin/python benchmarks/torch_overhead.py [--device cuda] [--rounds 7]
"""

from __future__ import annotations

import argparse

import torch

import gradtools.torch as gt
import gradtools.torch.norms  # noqa: F401  (gt.norms.stats_of)
from gradtools.policies import SpikeDetector, ZClip
from gradtools.timing import median_ratio


def mlp(depth=12, width=256):
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def transformer(d=128, layers=2):
    enc = torch.nn.TransformerEncoderLayer(d_model=d, nhead=4, dim_feedforward=4 * d, batch_first=True, dropout=0.0)
    return torch.nn.Sequential(torch.nn.TransformerEncoder(enc, num_layers=layers), torch.nn.Flatten(),
                               torch.nn.LazyLinear(10))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(model, opt, x, y, steps, monitor=None):
    for i in range(steps):  # x, y: a few batches in turn (a skipped step must not meet its batch again)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[i % len(x)]), y[i % len(y)]).backward()
        if monitor is not None:
            monitor.record()
        opt.step()
    _sync(x.device)


def guarded_steps(model, opt, x, y, steps, guard):
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[i % len(x)]), y[i % len(y)]).backward()
        guard.step()
    _sync(x.device)


def bench_training(name, model, x, y, steps, rounds):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    mon = gt.Monitor(model, every=1, count_nonfinite=True)
    r, b, c = median_ratio(lambda: train_steps(model, opt, x, y, steps),
                           lambda: train_steps(model, opt, x, y, steps, mon), rounds)
    print(f"{name}: monitor every step (global + per-parameter norms + non-finite counts) "
          f"vs bare training: {r:.3f}x  ({1e3 * b / steps:.2f} ms vs {1e3 * c / steps:.2f} ms per step)")
    for sync in (True, False):
        guard = gt.GradGuard(model, opt, spike=SpikeDetector(), clipper=gt.Clipper(ZClip()),
                             monitor=gt.Monitor(model, every=1), sync=sync)
        r2, b2, c2 = median_ratio(lambda: train_steps(model, opt, x, y, steps),
                                  lambda: guarded_steps(model, opt, x, y, steps, guard), rounds)
        print(f"  monitor + guard (spike detector) + ZClip every step, sync={sync}: {r2:.3f}x "
              f"({1e3 * c2 / steps:.2f} ms per step)")
    return r


def bench_compiled(model, x, y, steps, rounds):
    """Inductor: a compiled forward/backward, then the guard's compiled decision, vs the same bare."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.compile(lambda xb, yb: torch.nn.functional.cross_entropy(model(xb), yb))

    def bare():
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(x[i % len(x)], y[i % len(y)]).backward()
            opt.step()
        _sync(x.device)

    for sync in (True, False):
        guard = gt.GradGuard(model, opt, spike=SpikeDetector(), clipper=gt.Clipper(ZClip()), sync=sync)
        decide = torch.compile(guard.decide, fullgraph=True)

        def guarded():
            for i in range(steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(x[i % len(x)], y[i % len(y)]).backward()
                guard.apply(decide())
            _sync(x.device)

        bare(), guarded()  # compile both outside the timing
        r, b, c = median_ratio(bare, guarded, rounds)
        print(f"compiled (Inductor) step with guard + ZClip (decide compiled, fullgraph), sync={sync}, "
              f"vs compiled bare step: {r:.3f}x ({1e3 * b / steps:.2f} ms vs {1e3 * c / steps:.2f} ms per step)")


def bench_norms(model, x, y, reps, rounds):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    device = x.device

    def total_only():
        for _ in range(reps):
            torch.nn.utils.get_total_norm(grads)
        _sync(device)

    names = [n for n, _ in model.named_parameters()]

    def ours():  # the per-step path (Monitor): names resolved once
        for _ in range(reps):
            gt.norms.stats_of(names, grads, count_nonfinite=False)
        _sync(device)

    def ours_with_counts():  # grad_stats' default: the counts are taken when first read, not here
        for _ in range(reps):
            gt.norms.stats_of(names, grads, count_nonfinite=True)
        _sync(device)

    def ours_convenience():  # grad_stats(model): walks named_parameters() on every call
        for _ in range(reps):
            gt.grad_stats(model, count_nonfinite=False)
        _sync(device)

    def item_loop():
        for _ in range(reps):
            norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
            sum(v * v for v in norms.values()) ** 0.5

    r1, b, c = median_ratio(total_only, ours, rounds)
    print(f"gradtools global + per-parameter norms vs torch.nn.utils.get_total_norm alone: {r1:.3f}x "
          f"({1e6 * b / reps:.0f} us vs {1e6 * c / reps:.0f} us)")
    r2, _, c2 = median_ratio(total_only, ours_with_counts, rounds)
    print(f"  ... count_nonfinite=True (grad_stats' default; counted when read): {r2:.3f}x "
          f"({1e6 * c2 / reps:.0f} us)")
    r4, _, c4 = median_ratio(total_only, ours_convenience, rounds)
    print(f"  ... grad_stats(model), resolving names on every call: {r4:.3f}x ({1e6 * c4 / reps:.0f} us)")
    r3, b3, c3 = median_ratio(item_loop, ours, rounds)
    print(f"gradtools (one foreach pass, no host sync) vs per-parameter .norm().item() loop: {r3:.3f}x "
          f"({1e6 * c3 / reps:.0f} us vs {1e6 * b3 / reps:.0f} us): {1 / r3:.1f} times faster")
    return r1, r2, r3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-compile", action="store_true", help="skip the Inductor benchmark (minutes on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")
    m = mlp().to(device)
    x = torch.randn(8, 256, 256, device=device)  # eight batches, in turn
    y = torch.randint(0, 10, (8, 256), device=device)
    bench_training("12-layer 256-wide MLP, batch 256", m, x, y, args.steps, args.rounds)
    t = transformer().to(device)
    xt = torch.randn(8, 16, 32, 128, device=device)
    yt = torch.randint(0, 10, (8, 16), device=device)
    t(xt[0])  # materialise the lazy layer
    bench_training("2-layer Transformer encoder (d=128, seq 32, batch 16)", t, xt, yt, args.steps, args.rounds)
    print("12-layer MLP: 26 gradient tensors")
    bench_norms(m, x[0], y[0], reps=200, rounds=args.rounds)
    many = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(250)])  # 500 small tensors
    print("250 small Linear layers: 500 gradient tensors")
    bench_norms(many, torch.randn(32, 8, device=device).to(device), torch.randint(0, 8, (32,), device=device),
                reps=50, rounds=args.rounds)
    if not args.skip_compile:
        bench_compiled(m, x, y, args.steps, max(3, args.rounds // 3))


if __name__ == "__main__":
    main()
