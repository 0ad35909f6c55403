"""Matrix-product FLOPs of the exact analytic step, as a ratio to a dropout step's.

A floor under the timed ratios of ``estimator_cost.py`` and ``real_models.py`` that no
implementation of double backward can go below where matrix products dominate: for every
model of their ``BUILDERS``, one ``DropoutK(1)`` step and one exact step
(``Analytic(curvature, implicit=True, gradient=DoubleBackward(batched=False))``, and the
implicit term alone) run under ``torch.profiler`` with ``with_flops=True``, and the FLOPs of
the matrix products (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``, by the profiler's own
formulas) are summed. Counts, not timings: the same on any machine, busy or idle.

Why the ratio exceeds 3.0 on some models (the derivation is in
:mod:`dropsplit.estimators.double_backward`): a product of a weight and an activation costs the
dropout step three products and the exact step nine; a product whose two operands both depend
on the sites (attention's ``q k^T`` and ``a v``, a DropConnect weight ``(W * m) h``) needs both
operand gradients already in the gate-gradient backward, and costs the exact step about fifteen.

Two models are counted differently from how they are timed: the LSTM's dropout step runs
``torch.lstm``'s fused kernel, whose products the profiler does not see, so every LSTM layer is
switched to its ``"loop"`` implementation (the same products; the exact step runs it anyway);
attention runs ``scaled_dot_product_attention``'s math backend in both steps (the fused kernels'
products are the same but invisible to the profiler); the profiler has no formula for a
convolution's backward, so models with convolutions print ``n/a``.

    OMP_NUM_THREADS=1 python bench/exact_step_flops.py > docs/results/exact_step_flops.md
"""

import argparse
import sys

import torch
from estimator_cost import BUILDERS as SMALL_BUILDERS
from estimator_cost import CONFIGS
from real_models import BUILDERS as REAL_BUILDERS
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import dropsplit as ds
from dropsplit.models.lstm import LSTMLayer

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
EXACT = ds.DoubleBackward(batched=False)


def product_flops(method, model, forward_fn, batch):
    """FLOPs of the matrix products of one step (after one unprofiled warm-up step)."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with (
            sdpa_kernel(SDPBackend.MATH),
            profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof,
        ):
            method.step(model, forward_fn, batch)
    return sum(event.flops for event in prof.events() if event.name in PRODUCTS)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="substrings of model names to run")
    args = parser.parse_args()
    print(f"`python {' '.join(['bench/exact_step_flops.py', *sys.argv[1:]])}`\n")
    print(
        f"torch {torch.__version__}. Matrix-product FLOPs of one step (torch.profiler, "
        "with_flops=True; aten::mm, addmm, bmm, baddbmm) over those of a DropoutK(1) step; "
        "the exact step is Analytic(..., gradient=DoubleBackward(batched=False)).\n"
    )
    print("| model | DropoutK(1) GFLOP | sampled + implicit | implicit only |")
    print("|---|---:|---:|---:|")
    for build in SMALL_BUILDERS + REAL_BUILDERS:
        name, model, forward_fn, batch = build()
        if args.only and not any(s in name for s in args.only):
            continue
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            print(f"| {name} | n/a | n/a | n/a |", flush=True)
            continue
        for layer in model.modules():
            if isinstance(layer, LSTMLayer):
                layer.implementation = "loop"
        base = product_flops(ds.DropoutK(1, seed=0), model, forward_fn, batch)
        ratios = [
            product_flops(make(EXACT), model, forward_fn, batch) / base for make in CONFIGS.values()
        ]
        print(f"| {name} | {base / 1e9:.2f} | {ratios[0]:.2f} | {ratios[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
