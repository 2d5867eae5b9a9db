"""Every spike defence x scenario x framework: the full matrix behind "Spike defences compared".

Two models, built from the same NumPy weights in PyTorch and Keras:

* a small MLP (teacher-student regression, 32 -> 64 -> 64 -> 1, ReLU), trained
  ``--steps`` steps with Adam(1e-3): clean training, injected gradient spikes
  (x10, x100, x1000 on the first weight matrix, two steps in a row at 40 % of the
  run) and a burst of three corrupted batches (inputs x100);
* the field guide's small Transformer (character LM on the Zen of Python),
  ``--lm-steps`` steps with Adam(1e-2), clean and with the learning rate ten
  times too high (0.1) for the first 100 steps, no warm-up.

Each scenario is judged against the clean, undefended run of the same
framework with the same seed (:func:`gradtools.spikes.score_run`); times are
medians per step relative to no defence in the same scenario and process.
Writes one CSV row per framework, model, scenario and defence:

    .venv/bin/python benchmarks/spike_defences.py [--out benchmarks/spike_defences.csv]

About 4 minutes on 2 CPU cores (``--quick``: fewer steps, for a smoke run).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

from gradtools.runtime import setup

FIELDS = ["framework", "model", "scenario", "defence", "outcome", "diverged", "final_rel", "steps_lost", "v_growth",
          "skipped", "time_rel"]


def mlp_problem(framework: str, steps: int):
    from gradtools.data import teacher_student
    from gradtools.models import init_mlp

    x, y = teacher_student(n=64 * steps, d=32, seed=0)
    batches = [(x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64]) for i in range(steps)]
    weights = init_mlp([32, 64, 64, 1], seed=0)
    if framework == "torch":
        import torch

        import gradtools.torch as gt

        batches = [(torch.tensor(a), torch.tensor(b)) for a, b in batches]
        return (lambda: gt.mlp(weights)), batches, torch.nn.functional.mse_loss
    import keras

    import gradtools.keras as gk

    return (lambda: gk.mlp(weights)), batches, (lambda t, o: keras.ops.mean(keras.ops.square(t - o)))


def lm_problem(framework: str, steps: int):
    from gradtools.data import char_tokens, lm_batches, zen_of_python
    from gradtools.models import init_transformer

    ids, vocab = char_tokens(zen_of_python())
    x, y = lm_batches(ids, context=16, batch_size=16, steps=steps, seed=0)
    weights = init_transformer(len(vocab), context=16, width=32, heads=2, layers=2, seed=0)
    if framework == "torch":
        import torch

        import gradtools.torch as gt

        batches = [(torch.tensor(a), torch.tensor(b)) for a, b in zip(x, y)]

        def loss(logits, target):
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

        return (lambda: gt.transformer(weights)), batches, loss
    import keras

    import gradtools.keras as gk

    def loss(target, logits):
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(target, logits, from_logits=True))

    return (lambda: gk.transformer(weights)), list(zip(x, y)), loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "spike_defences.csv"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lm-steps", type=int, default=200)
    parser.add_argument("--frameworks", nargs="+", default=["torch", "keras"])
    parser.add_argument("--quick", action="store_true", help="40 MLP and 40 LM steps: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = args.lm_steps = 40
    setup(seed=0, frameworks=args.frameworks)
    from gradtools.spikes import Scenario, default_scenarios

    rows = []
    for framework in args.frameworks:
        module = __import__(f"gradtools.{framework}", fromlist=["compare_defences"])
        start = time.perf_counter()
        mlp_scenarios = [s for s in default_scenarios(args.steps) if not s.name.startswith("lr")]
        table = module.compare_defences(*mlp_problem(framework, args.steps), steps=args.steps, lr=1e-3,
                                        scenarios=mlp_scenarios)
        rows += [{**r, "model": "mlp"} for r in table.to_dict("records")]
        lr_steps = min(100, args.lm_steps // 2)
        lm_scenarios = [Scenario("clean"), Scenario("lr x10", lr_scale=10.0, lr_steps=lr_steps)]
        table = module.compare_defences(*lm_problem(framework, args.lm_steps), steps=args.lm_steps, lr=1e-2,
                                        scenarios=lm_scenarios)
        rows += [{**r, "model": "transformer"} for r in table.to_dict("records")]
        print(f"{framework}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
