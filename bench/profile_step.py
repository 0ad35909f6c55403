"""Where the time of a step goes, phase by phase: Dropout_1, the exact, HVP and FD analytic steps.

Each phase is timed on its own (median of repeats) with the library's building blocks, in the
order the methods run them; the top operators of each whole step come from ``torch.profiler``.

    python bench/profile_step.py --size small --repeats 5 --json docs/results/profile_small.json
"""

import argparse
import json
import statistics
import time

import torch
from torch.profiler import profile

import dropsplit as ds
from dropsplit.benchmark import SIZES, problem
from dropsplit.explicit import (
    explicit_penalty,
    joint_site_gradients,
    probe_function,
    site_gradients,
)
from dropsplit.finite_difference import finite_difference_step
from dropsplit.forward import call_forward, trainable_parameters
from dropsplit.hvp_difference import forward_along
from dropsplit.losses import get_loss
from dropsplit.methods import gated_forward
from dropsplit.models.awd import lm_forward, sequence_examples
from dropsplit.noise import explicit_coefficient, noise_variance, sample_rademacher
from dropsplit.sites import SiteContext, site_context

LOSS = get_loss("cross_entropy")


def phases_dropout(model, batch, gen):
    """Dropout_1: forward with masks, loss, backward."""
    t = {}
    start = time.perf_counter()
    with site_context(model, SiteContext("sample", [gen])):
        out = call_forward(lm_forward, model, batch, LOSS)
    t["forward (LSTM + decoder)"] = time.perf_counter() - start
    start = time.perf_counter()
    loss = LOSS.summed(out.logits, out.targets) / out.n
    t["softmax cross-entropy"] = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    t["backward"] = time.perf_counter() - start
    return t


def phases_exact(model, batch, gen):
    """Analytic(sampled, implicit), double backward, in the order the method runs."""
    t = {}
    start = time.perf_counter()
    out, ctx = gated_forward(model, lm_forward, batch, LOSS, "mask")
    t["gated forward (LSTM loop + decoder)"] = time.perf_counter() - start
    start = time.perf_counter()
    summed = LOSS.summed(out.logits, out.targets)
    t["softmax cross-entropy"] = time.perf_counter() - start
    start = time.perf_counter()
    targets = LOSS.sample_targets(out.logits, gen)
    probe = LOSS.summed(out.logits, targets)
    t["label sampling over the 10k softmax"] = time.perf_counter() - start
    start = time.perf_counter()
    label_grads, grads = joint_site_gradients([summed, probe], out.logits, ctx.gates, True)
    t["one batched create_graph backward (both labels)"] = time.perf_counter() - start
    start = time.perf_counter()
    value = summed / out.n
    for (site, _), g, gy in zip(ctx.record, grads, label_grads, strict=True):
        signs = torch.where(torch.rand(gy.shape, generator=gen) < 0.5, -1.0, 1.0)
        value = value + explicit_penalty(g, site.p, out.n) + (signs * gy).sum() / out.n
    t["penalty and implicit scalar"] = time.perf_counter() - start
    start = time.perf_counter()
    value.backward()
    t["final backward (double backward through it)"] = time.perf_counter() - start
    return t


def phases_hvp(model, batch, gen):
    """Analytic(sampled, implicit), HVP differences, in the order the method runs."""
    t = {}
    start = time.perf_counter()
    out, ctx = gated_forward(model, lm_forward, batch, LOSS, "mask", twice=False)
    summed = LOSS.summed(out.logits, out.targets)
    probe = probe_function("sampled", out, LOSS, gen)
    at_one = probe(out.logits)
    t["gated forward (nn.LSTM kernel) + losses + label sampling"] = time.perf_counter() - start
    start = time.perf_counter()
    grads = site_gradients(at_one, ctx.gates, create_graph=False)
    t["backward to the gates (probe)"] = time.perf_counter() - start
    start = time.perf_counter()
    qs = [site.p for site, _ in ctx.record]
    d = [2 * explicit_coefficient(q) / out.n * g for g, q in zip(grads, qs, strict=True)]
    moved, step = forward_along(model, lm_forward, batch, LOSS, d, 1e-3)
    surrogate = summed / out.n + (probe(moved.logits) - at_one) / step
    t["forward along the explicit direction"] = time.perf_counter() - start
    start = time.perf_counter()
    r = [
        noise_variance(q) ** 0.5 / out.n * sample_rademacher(g.shape, gen, g.dtype)
        for g, q in zip(grads, qs, strict=True)
    ]
    moved, step = forward_along(model, lm_forward, batch, LOSS, r, 1e-3)
    surrogate = surrogate + (LOSS.summed(moved.logits, moved.targets) - summed) / step
    t["forward along the noise direction"] = time.perf_counter() - start
    start = time.perf_counter()
    surrogate.backward()
    t["one backward through the three forwards"] = time.perf_counter() - start
    return t


def phases_fd(model, batch, gen):
    """Analytic(sampled, implicit), finite differences: the two passes and one backward."""
    t = {}
    start = time.perf_counter()
    fd = finite_difference_step(
        model,
        lm_forward,
        batch,
        LOSS,
        curvature="sampled",
        implicit=True,
        epsilon=0.05,
        grouping="mask",
        generator=gen,
        examples=sequence_examples,
    )
    t["two perturbed forwards + losses + label sampling"] = time.perf_counter() - start
    start = time.perf_counter()
    fd.surrogate.backward()
    t["one backward through both passes"] = time.perf_counter() - start
    return t


def run(phases, model, batch, repeats):
    gen = torch.Generator().manual_seed(0)
    for p in trainable_parameters(model):
        p.grad = None
    phases(model, batch, gen)  # warm-up
    samples = []
    for _ in range(repeats):
        for p in trainable_parameters(model):
            p.grad = None
        samples.append(phases(model, batch, gen))
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def top_ops(method, model, batch, n=8):
    method.step(model, lm_forward, batch)
    with profile() as prof:
        method.step(model, lm_forward, batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:n]
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, batch = problem(args.size)
    result = {}
    for name, phases in (
        ("DropoutK(1)", phases_dropout),
        ("Analytic(sampled, implicit), double backward", phases_exact),
        ("Analytic(sampled, implicit), HVP differences", phases_hvp),
        ("Analytic(sampled, implicit), finite difference", phases_fd),
    ):
        result[name] = run(phases, model, batch, args.repeats)
        total = sum(result[name].values())
        print(f"\n{name}: {total:.3f} s")
        for phase, seconds in result[name].items():
            print(f"  {phase:<52} {seconds:7.3f} s  {100 * seconds / total:5.1f} %")
    ops = {
        "DropoutK(1)": top_ops(ds.DropoutK(1, seed=0), model, batch),
        "Analytic exact": top_ops(ds.Analytic("sampled", True, seed=0), model, batch),
        "Analytic HVP": top_ops(
            ds.Analytic("sampled", True, gradient="hvp-difference", seed=0), model, batch
        ),
    }
    for name, rows in ops.items():
        print(f"\ntop operators, {name}:")
        for r in rows:
            print(f"  {r['op']:<44} {100 * r['share']:5.1f} %  {r['calls']:6d} calls")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "phases": result, "top_ops": ops}, f, indent=2)


if __name__ == "__main__":
    main()
