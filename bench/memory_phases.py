"""Where the HVP-difference step's memory peaks: the resident set, polled every 0.5 ms, per phase.

Phases are tagged by wrapping the estimator's functions (gated forward, backward to the gates,
moved forwards) and ``Tensor.backward``; each phase's highest resident set is printed as a rise
over the one before the measured steps (two steps after a warm-up, as ``dropsplit bench``).

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 \
        python bench/memory_phases.py "Analytic(sampled, implicit) HVP" --size paper
"""

import argparse
import gc

import torch

from dropsplit.estimators import hvp_difference
from dropsplit.experiments import benchmark

phase = ["start"]


def tag(module, name: str, label: str) -> None:
    """Make ``module.name`` set the phase on entry and after it returns."""
    original = getattr(module, name)

    def tagged(*args, **kwargs):
        phase[0] = f"{label} (in)"
        result = original(*args, **kwargs)
        phase[0] = f"after {label}"
        return result

    setattr(module, name, tagged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="a row of `dropsplit bench`")
    parser.add_argument("--size", default="paper", choices=("small", "char", "paper"))
    args = parser.parse_args()
    tag(hvp_difference, "gated_forward", "gated forward")
    tag(hvp_difference, "site_gradients", "backward to the gates")
    tag(hvp_difference, "forward_along", "moved forward")
    backward = torch.Tensor.backward

    def tagged_backward(self, *a, **k):
        phase[0] = "final backward"
        backward(self, *a, **k)
        phase[0] = "after the final backward"

    torch.Tensor.backward = tagged_backward
    step = benchmark.steps(args.size, "cpu", "lstm")[args.method]
    step()
    gc.collect()
    before = benchmark._rss_bytes()
    peaks = benchmark.rss_peaks(lambda: (step(), step()), lambda: phase[0])
    for label, rss in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"{label:32s} {(rss - before) / 2**20:8.0f} MiB")


if __name__ == "__main__":
    main()
