"""Fidelity of the finite-difference estimator against the exact (double-backward) analytic step.

On a trained model and real batches, draws the step of ``Analytic(gradient="double-backward")``
and of ``Analytic(gradient=ds.FiniteDifference(epsilon=eps))`` (one slope per batch, and one
per example with ``examples=sequence_examples``) many times (fresh signs and
labels each draw) and compares the explicit regularizer's value (mean and spread) and the
gradient: the bias of the mean gradient relative to the exact mean, with its Monte-Carlo error,
and the total variance (trace of the covariance) relative to the exact path's.

    python bench/fd_fidelity.py --run runs/ptb-small-dropout1 --draws 16 \
        --json docs/results/fd_fidelity.json
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.data import batchify, bptt_batches
from dropsplit.models.awd import lm_forward, sequence_examples
from dropsplit.training.runs import load_run


def draws(method, model, batch, n):
    """``n`` steps of ``method``: gradients ``[n, P]``, explicit values, seconds per step."""
    params = trainable_parameters(model)
    grads, explicit = [], []
    start = time.perf_counter()
    for _ in range(n):
        model.zero_grad(set_to_none=True)  # step() adds to p.grad
        result = method.step(model, lm_forward, batch)
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        explicit.append(result.stats.get("explicit", float("nan")))
    return torch.stack(grads), torch.tensor(explicit), (time.perf_counter() - start) / n


def compare(exact, estimate):
    """Bias of the mean and variance ratio of ``estimate`` against ``exact`` gradient draws."""
    mean_e, mean_f = exact.mean(0), estimate.mean(0)
    norm = float(mean_e.norm())
    # Monte-Carlo error of the difference of two means, in the same relative units
    mc = math.sqrt(
        float(exact.var(0).sum()) / len(exact) + float(estimate.var(0).sum()) / len(estimate)
    )
    return {
        "relative_bias": float((mean_f - mean_e).norm()) / norm,
        "relative_mc_error": mc / norm,
        "cosine_of_means": float(torch.nn.functional.cosine_similarity(mean_e, mean_f, dim=0)),
        "variance_ratio": float(estimate.var(0).sum() / exact.var(0).sum()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/ptb-small-dropout1")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.1, 0.2])
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
        exact_g, exact_r, exact_s = draws(
            ds.Analytic("sampled", implicit, seed=0), model, batch, args.draws
        )
        rows[f"{kind}, double backward"] = {
            "explicit_mean": float(exact_r.mean()),
            "explicit_sd": float(exact_r.std()),
            "seconds_per_step": exact_s,
        }
        for eps in args.epsilons:
            for variant, examples in (("one slope", None), ("per example", sequence_examples)):
                method = ds.Analytic(
                    "sampled",
                    implicit,
                    gradient=ds.FiniteDifference(epsilon=eps, examples=examples),
                    seed=1,
                )
                g, r, s = draws(method, model, batch, args.draws)
                rows[f"{kind}, FD {variant}, eps={eps}"] = {
                    "explicit_mean": float(r.mean()),
                    "explicit_sd": float(r.std()),
                    "seconds_per_step": s,
                    **compare(exact_g, g),
                }
    print(
        f"{'estimator':<46} {'lambdaR mean':>12} {'sd':>8} {'bias':>6} {'+-MC':>6} "
        f"{'cos':>5} {'var x':>7} {'s/step':>7}"
    )
    for name, r in rows.items():
        print(
            f"{name:<46} {r['explicit_mean']:12.4f} {r['explicit_sd']:8.4f} "
            f"{r.get('relative_bias', float('nan')):6.3f} "
            f"{r.get('relative_mc_error', float('nan')):6.3f} "
            f"{r.get('cosine_of_means', float('nan')):5.2f} "
            f"{r.get('variance_ratio', float('nan')):7.1f} {r['seconds_per_step']:7.3f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"run": args.run, "draws": args.draws, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
