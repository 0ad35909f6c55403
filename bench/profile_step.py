"""Where the time of a step goes: the library's own phases of each method, and its top operators.

Every method's ``step`` and every estimator label their phases with
``torch.profiler.record_function`` (``dropsplit.<part>.<phase>``); this script profiles real
steps of Dropout_1 and of the exact, HVP-difference and finite-difference analytic steps and
reports each label's time (median over repeats, nested labels included in their parents) and
the top operators, so it measures the library's code instead of a copy of its maths.

    python bench/profile_step.py --size small --repeats 5 --json docs/results/profile_small.json
    python bench/profile_step.py --model qrnn --size char --repeats 3
"""

import argparse
import json
import statistics

from torch.profiler import profile

import dropsplit as ds
from dropsplit.experiments.benchmark import MODELS, SIZES, problem
from dropsplit.models.awd import column_examples, lm_forward

METHODS = {
    "DropoutK(1)": lambda batch: ds.DropoutK(1, seed=0),
    "Analytic(sampled, implicit), double backward": lambda batch: ds.Analytic(
        "sampled", True, seed=0
    ),
    "Analytic(sampled, implicit), HVP differences": lambda batch: ds.Analytic(
        "sampled", True, gradient="hvp-difference", seed=0
    ),
    "Analytic(sampled, implicit), finite difference": lambda batch: ds.Analytic(
        "sampled",
        True,
        gradient=ds.FiniteDifference(examples=column_examples(batch)),
        seed=0,
    ),
}


def profile_steps(method, model, batch, repeats, n_ops=8):
    """Median seconds per ``dropsplit.*`` label over ``repeats`` profiled steps; top operators."""
    method.step(model, lm_forward, batch)  # warm-up
    phases, last = [], None
    for _ in range(repeats):
        with profile() as prof:
            method.step(model, lm_forward, batch)
        last = prof.key_averages()
        phases.append(
            {e.key: e.cpu_time_total / 1e6 for e in last if e.key.startswith("dropsplit.")}
        )
    keys = sorted(phases[0], key=lambda k: -phases[0][k])
    median = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in keys}
    events = sorted(last, key=lambda e: e.self_cpu_time_total, reverse=True)
    events = [e for e in events if not e.key.startswith("dropsplit.")]
    total = sum(e.self_cpu_time_total for e in events)
    ops = [
        {"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in events[:n_ops]
    ]
    return median, ops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--model", choices=MODELS, default="lstm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, batch = problem(args.size, model=args.model)
    result, ops = {}, {}
    for name, make in METHODS.items():
        method = make(SIZES[args.size]["batch"])
        result[name], ops[name] = profile_steps(method, model, batch, args.repeats)
        step = next(v for k, v in result[name].items() if k.endswith(".step"))
        print(f"\n{name}: {step:.3f} s a step")
        for phase, seconds in result[name].items():
            print(f"  {phase:<58} {seconds:7.3f} s  {100 * seconds / step:5.1f} %")
        print("  top operators:")
        for r in ops[name]:
            print(f"    {r['op']:<44} {100 * r['share']:5.1f} %  {r['calls']:6d} calls")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"size": args.size, "model": args.model, "phases": result, "top_ops": ops},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
