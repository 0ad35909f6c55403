"""Step cost and gradient error of each analytic-gradient estimator, per model.

For every model of ``BUILDERS`` and every configuration of ``CONFIGS`` (``Analytic("sampled",
implicit=True)``, and the implicit term alone: the form of ``DropoutK(noise="analytic")``), one
step per estimator (double backward with two backwards or one batched backward to the gates,
the one-sided difference, forward over reverse) is timed as a ratio to a ``DropoutK(1)`` step
of the same round (interleaved rounds in one process, median ratio, as ``dropsplit bench``),
and its gradient is compared with the double-backward gradient of the same draws (same seed):
``||g - g_db|| / ||g_db||``, on the model as built (float32) and on a float64 copy (there the
error is the estimator's own; in float32 it adds rounding). A model is one more function in
``BUILDERS``: ``() -> (name, model, forward_fn, batch)``.

    OMP_NUM_THREADS=1 python bench/estimator_cost.py --repeats 5 > docs/results/estimator_cost.md
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.experiments import benchmark
from dropsplit.models.awd import lm_forward

ESTIMATORS = {  # row name -> gradient=
    "double-backward": ds.DoubleBackward(batched=False),  # the reference of the error columns
    "double-backward batched": ds.DoubleBackward(batched=True),  # the default
    "hvp-difference": "hvp-difference",
    "jvp": "jvp",
}
CONFIGS = {
    "sampled + implicit": lambda gradient: ds.Analytic("sampled", True, gradient=gradient, seed=0),
    "implicit only": lambda gradient: ds.Analytic(None, True, gradient=gradient, seed=0),
}


def mlp_forward(model, batch):
    x, y = batch
    return model(x), y


def mlp(activation, name):
    """Two hidden layers of 512, dropout 0.5 after each activation; 256 examples, 10 classes."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(256, 512),
            activation(),
            ds.Dropout(0.5),
            nn.Linear(512, 512),
            activation(),
            ds.Dropout(0.5),
            nn.Linear(512, 10),
        )
        return name, model, mlp_forward, (torch.randn(256, 256), torch.randint(0, 10, (256,)))

    return build


def conv_bn():
    """Two conv + BatchNorm + ReLU blocks, channel dropout between, dropout before the head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        ds.Dropout(0.2, shared_dims=(2, 3)),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        ds.Dropout(0.5),
        nn.Linear(32 * 8 * 8, 10),
    )
    batch = (torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)))
    return "conv+BN (64 x 3x16x16)", model, mlp_forward, batch


def language_model(kind):
    """The LM of ``dropsplit bench`` at its small size (PTB-small shapes)."""

    def build():
        model, batch = benchmark.problem("small", "cpu", kind)
        return f"{kind} LM (small)", model, lm_forward, batch

    return build


BUILDERS = [
    mlp(nn.ReLU, "MLP ReLU (2 x 512)"),
    mlp(nn.GELU, "MLP GELU (2 x 512)"),
    mlp(nn.Tanh, "MLP tanh (2 x 512)"),
    conv_bn,
    language_model("lstm"),
    language_model("qrnn"),
    language_model("transformer"),
]


def step(method, model, forward_fn, batch):
    """One step from zeroed gradients (as a training loop runs it); the gradient, flattened."""
    model.zero_grad(set_to_none=True)
    method.step(model, forward_fn, batch)
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


def to_float64(obj):
    """A float64 copy of a (nested) batch; integer tensors and None as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_float64(o) for o in obj)
    return obj


def errors(config, model, forward_fn, batch):
    """Relative error of each estimator against double backward with the same draws."""
    out = {}
    for tag, m, b in (
        ("float32", model, batch),
        ("float64", copy.deepcopy(model).double(), to_float64(batch)),
    ):
        exact = step(config(ESTIMATORS["double-backward"]), m, forward_fn, b)
        for gradient, estimator in ESTIMATORS.items():
            g = step(config(estimator), m, forward_fn, b)
            out[gradient, tag] = float((g - exact).norm() / exact.norm())
    return out


def ratios(config, model, forward_fn, batch, repeats):
    """Median, min and max ratio of each estimator's step time to DropoutK(1)'s, same round."""
    methods = {"DropoutK(1)": ds.DropoutK(1, seed=0)}
    methods.update({gradient: config(estimator) for gradient, estimator in ESTIMATORS.items()})
    times = {name: [] for name in methods}
    for method in methods.values():  # warm-up
        step(method, model, forward_fn, batch)
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            step(method, model, forward_fn, batch)
            times[name].append(time.perf_counter() - start)
    base = times["DropoutK(1)"]
    out = {"DropoutK(1)": (statistics.median(base), 1.0, 1.0, 1.0)}
    for name in ESTIMATORS:
        r = [a / b for a, b in zip(times[name], base, strict=True)]
        out[name] = (statistics.median(times[name]), statistics.median(r), min(r), max(r))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="substrings of model names to run")
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join(["python", *sys.argv])
    print(f"`{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}{command}`\n")
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s). Analytic steps; time: step / DropoutK(1) step "
        f"of the same round, median [min, max] of {args.repeats} rounds; error: "
        "||g - g_double-backward|| / ||g_double-backward||, same draws.\n"
    )
    print(
        "| model | terms | estimator | DropoutK(1) s | ratio | [min, max] | error f32 | error f64 |"
    )
    print("|---|---|---|---:|---:|---|---:|---:|")
    for build in BUILDERS:
        name, model, forward_fn, batch = build()
        if args.only and not any(s in name for s in args.only):
            continue
        for terms, config in CONFIGS.items():
            err = errors(config, model, forward_fn, batch)
            rows = ratios(config, model, forward_fn, batch, args.repeats)
            for gradient in ESTIMATORS:
                _, ratio, low, high = rows[gradient]
                print(
                    f"| {name} | {terms} | {gradient} | {rows['DropoutK(1)'][0]:.4f} | "
                    f"{ratio:.2f} | [{low:.2f}, {high:.2f}] | {err[gradient, 'float32']:.1e} | "
                    f"{err[gradient, 'float64']:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
