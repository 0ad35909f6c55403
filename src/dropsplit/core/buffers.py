"""The model is left as it was: buffers (BatchNorm statistics, counters) move once per step.

Plain dropout training runs one forward per step, so BatchNorm's running statistics and its
``num_batches_tracked`` move once. A method runs several passes (Dropout_k's ``k`` replicas,
the gated and moved passes of an estimator, R-Drop's two), and a measurement runs many: every
train-mode forward would move the statistics again. Inside :func:`buffer_scope` every pass a
:func:`~dropsplit.core.sites.site_context` drives reports its end (:func:`pass_ended`), and at
the end of the scope the buffers are as the scope's first pass left them (a method's step: its
real training pass) or as they were before it (a measurement).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import torch
from torch import nn


@dataclass
class _Scope:
    model: nn.Module
    keep_first_pass: bool
    saved: dict[str, torch.Tensor] | None = None
    passes: int = 0


_SCOPE: ContextVar[_Scope | None] = ContextVar("dropsplit_buffer_scope", default=None)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            old = saved.get(name)
            if old is None or buffer is old:
                continue
            if buffer.shape == old.shape and buffer.dtype == old.dtype:
                if not torch.equal(buffer, old):
                    # through .data: the step's graph may have saved this buffer (BatchNorm
                    # does), and a version bump would fail its backward; a train-mode backward
                    # does not read the running statistics
                    buffer.data.copy_(old)
            else:  # a module that replaced its buffer: put the old one back
                owner_path, _, leaf = name.rpartition(".")
                model.get_submodule(owner_path)._buffers[leaf] = old


@contextlib.contextmanager
def buffer_scope(model: nn.Module, keep_first_pass: bool) -> Iterator[None]:
    """Leave every buffer of ``model`` as the block's first pass left it, or as it was.

    Args:
        model: The model whose buffers are kept.
        keep_first_pass: ``True`` for a method's step (the first pass is the real training
            pass, as in plain dropout training); ``False`` for a measurement (no pass counts).
    """
    scope = _Scope(model, keep_first_pass, None if keep_first_pass else _snapshot(model))
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)
        if scope.saved is not None:
            _restore(model, scope.saved)


def pass_ended() -> None:
    """Called at the end of every driven pass: the first one of a step fixes the buffers."""
    scope = _SCOPE.get()
    if scope is None:
        return
    scope.passes += 1
    if scope.keep_first_pass and scope.passes == 1:
        scope.saved = _snapshot(scope.model)


P = ParamSpec("P")
R = TypeVar("R")


def leaves_buffers(
    measurement: Callable[Concatenate[nn.Module, P], R],
) -> Callable[Concatenate[nn.Module, P], R]:
    """Decorate a measurement ``f(model, ...)`` so that it leaves every buffer as it was."""

    @functools.wraps(measurement)
    def measured(model: nn.Module, *args: P.args, **kwargs: P.kwargs) -> R:
        with buffer_scope(model, keep_first_pass=False):
            return measurement(model, *args, **kwargs)

    return measured
