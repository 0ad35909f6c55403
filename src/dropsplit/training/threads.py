"""How many intra-op threads a training or evaluation process uses.

Small models on a shared CPU lose most of their time to thread contention: a second thread
saves little when the cores are idle and, when another process competes for them, every
parallel region waits for the slowest thread (measured on a 2-core host: ``eval`` of a quick
run 457 s with two threads against 21 s with one, the same perplexity). The rule
(:func:`default_threads`) gives one thread to a model below :data:`LARGE_MODEL` parameters and
the process's share of its usable cores to a larger one; ``--threads N`` (the config key
``train.threads``) overrides it, and so does an ``OMP_NUM_THREADS`` the user set. The table
that chose the rule is in ``BENCHMARKS.md`` ("Threads").
"""

from __future__ import annotations

import os

import torch
from torch import nn

LARGE_MODEL = 20_000_000  # parameters from which a model gets more than one thread
_jobs = 1  # processes this one shares its cores with (``reproduce --jobs``), itself included


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_cores(jobs: int) -> None:
    """Declare that ``jobs`` processes (this one included) train at once on these cores."""
    global _jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    _jobs = jobs


def default_threads(parameters: int, cores: int, jobs: int = 1) -> int:
    """The rule: one thread below :data:`LARGE_MODEL` parameters, else a share of the cores.

    Args:
        parameters: The model's parameter count.
        cores: The cores the process may use.
        jobs: Processes sharing those cores.
    """
    if parameters < LARGE_MODEL:
        return 1
    return max(1, cores // jobs)


def set_threads(requested: int, model: nn.Module) -> int:
    """Set this process's intra-op thread count for ``model`` and return it.

    Args:
        requested: A count (``--threads`` or ``train.threads``), or ``0`` for the rule, which
            gives way to an ``OMP_NUM_THREADS`` set in the environment.
        model: The model the process trains or evaluates.
    """
    if requested > 0:
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        parameters = sum(p.numel() for p in model.parameters())
        threads = default_threads(parameters, usable_cores(), _jobs)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
