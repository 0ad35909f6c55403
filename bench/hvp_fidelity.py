"""Fidelity of ``Analytic(gradient="hvp-difference")`` against the double-backward step.

On a trained model and a real training batch, takes the step of both paths with the same seed
(the same labels and signs), so their difference is the estimator's own error: the one-sided
difference (``O(step)``) and float32 rounding. It is reported relative to the exact gradient's
norm and relative to the exact path's own draw-to-draw spread (the root mean square distance
between two exact draws with different seeds), for several steps.

    python bench/hvp_fidelity.py --run runs/paper-char/dropout-1/seed0 --draws 4 \
        --json docs/results/hvp_fidelity_char.json
"""

import argparse
import json
from pathlib import Path

import torch

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.data import batchify, bptt_batches
from dropsplit.models.awd import lm_forward
from dropsplit.training.runs import load_run


def gradient(method, model, batch):
    """The step's gradient, flattened, and its stats (speed: ``dropsplit bench``)."""
    model.zero_grad(set_to_none=True)  # step() adds to p.grad
    result = method.step(model, lm_forward, batch)
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)]), result.stats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/paper-char/dropout-1/seed0")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--steps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--data")
    parser.add_argument("--json")
    args = parser.parse_args()
    config, corpus, model = load_run(Path(args.run), args.data)
    data = batchify(corpus.train, config.data.batch_size)
    _, x, y = next(bptt_batches(data, config.data.bptt))
    batch = (x, y, model.init_state(config.data.batch_size))
    rows = {}
    for implicit in (False, True):
        kind = "explicit + implicit" if implicit else "explicit only"
        exact = [
            gradient(ds.Analytic("sampled", implicit, seed=s), model, batch)
            for s in range(args.draws)
        ]
        norm = sum(float(g.norm()) for g, _ in exact) / len(exact)
        spread = torch.stack(
            [(a - b).norm() for (a, _), (b, _) in zip(exact, exact[1:], strict=False)]
        )
        spread = float(spread.pow(2).mean().sqrt())
        for step in args.steps:
            errors, value_errors = [], []
            for s, (g_exact, stats_exact) in enumerate(exact):
                method = ds.Analytic(
                    "sampled", implicit, gradient=ds.HVPDifference(step=step), seed=s
                )
                g, stats = gradient(method, model, batch)
                errors.append(float((g - g_exact).norm()))
                value_errors.append(abs(stats["explicit"] - stats_exact["explicit"]))
            error = sum(errors) / len(errors)
            rows[f"{kind}, step={step:g}"] = {
                "relative_error": error / norm,
                "error_over_exact_spread": error / spread,
                "explicit_value_error": max(value_errors),
            }
    print(f"{'estimator':<34} {'rel. error':>10} {'/ spread':>9} {'value err':>10}")
    for name, r in rows.items():
        print(
            f"{name:<34} {r['relative_error']:10.2e} {r['error_over_exact_spread']:9.2e} "
            f"{r['explicit_value_error']:10.1e}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"run": args.run, "draws": args.draws, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
