"""What every gradient estimator takes and returns: one shape for all of them.

An estimator is a module with

* ``CURVATURES``: the explicit kinds it supports (besides ``None``, no explicit term);
* ``SEPARABLE``: whether its surrogate splits into the clean loss plus a part that carries the
  regularizers alone (``Estimate.regularizers``), so that Dropout_k can add that part to its
  dropout loss (Alg. 4);
* ``estimate(model, forward_fn, batch, spec, generator) -> Estimate``.

:data:`dropsplit.estimators.ESTIMATORS` maps each ``gradient=`` name to its module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from dropsplit.core.forward import ForwardOutput, autocast_disabled
from dropsplit.core.losses import Loss


@dataclass(frozen=True)
class EstimatorSpec:
    """The analytic terms to estimate and the estimator's own settings.

    Attributes:
        loss: The loss family.
        curvature: Curvature of the explicit term (``None``: no explicit term).
        implicit: Add the implicit scalar ``S`` of xi_approx.
        grouping: ``"mask"`` or ``"element"``.
        explicit_scale: Multiplies each site's ``lambda``.
        implicit_scale: Multiplies each site's noise variance ``v``.
        hvp_step: Largest gate displacement of ``"hvp-difference"``.
        fd_epsilon: Step of ``"finite-difference"``, relative to the noise's standard deviation.
        fd_examples: ``fd_examples(out)``: example index of each target (``"finite-difference"``).
        with_loss: Whether the caller backpropagates ``surrogate`` (loss + regularizers, the
            default) or only ``regularizers`` (Dropout_k adding the analytic noise to its own
            loss); an estimator that takes its gradients early (``"hvp-difference"``) needs to
            know which, and gives ``regularizers`` only when ``with_loss`` is ``False``.
    """

    loss: Loss
    curvature: str | None
    implicit: bool
    grouping: str = "mask"
    explicit_scale: float = 1.0
    implicit_scale: float = 1.0
    hvp_step: float = 1e-3
    fd_epsilon: float = 0.05
    fd_examples: Callable[[ForwardOutput], torch.Tensor] | None = None
    with_loss: bool = True


@dataclass
class Estimate:
    """One draw of an estimator.

    Attributes:
        surrogate: Scalar whose gradient is the estimated gradient of loss + regularizers.
        regularizers: The part of ``surrogate`` that carries the explicit and implicit terms
            (``None`` for an estimator that is not ``SEPARABLE``).
        loss: The token-mean data loss (detached).
        explicit: The scaled explicit term ``explicit_scale * lambda R`` (detached; ``None``
            without one).
        explicit_terms: The same per recorded site call, when the estimator has them.
        implicit: The implicit scalar ``S`` (detached; ``None`` without one).
        record: ``(site, gate or multiplier)`` per site call of the estimator's first forward.
        aux: The ``aux`` of that forward.
    """

    surrogate: torch.Tensor
    regularizers: torch.Tensor | None
    loss: torch.Tensor
    explicit: torch.Tensor | None
    explicit_terms: list[torch.Tensor] | None
    implicit: torch.Tensor | None
    record: list
    aux: Any

    @property
    def value(self) -> torch.Tensor:
        """The objective's value: loss + explicit + implicit (detached)."""
        value = self.loss + (0.0 if self.explicit is None else self.explicit)
        return value if self.implicit is None else value + self.implicit


def check_curvature(name: str, supported: tuple[str, ...], curvature: str | None) -> None:
    """Raise a clear error when an estimator does not support ``curvature``."""
    if curvature not in (*supported, None):
        raise ValueError(
            f"gradient={name!r} supports curvature in {supported} or None, got {curvature!r}"
        )


LOW_PRECISION = (torch.float16, torch.bfloat16)
Estimator = TypeVar("Estimator", bound=Callable[..., Estimate])


def without_autocast(estimate: Estimator) -> Estimator:
    """Run an estimator that takes differences outside any ``torch.autocast`` region.

    Its differences of displacements of size ``~1e-3`` vanish in float16 / bfloat16 rounding,
    so inside an autocast region its passes run in the parameters' own precision (float32):
    the caller's mixed-precision loop works, and these passes cost what they cost in float32.
    """

    @functools.wraps(estimate)
    def run(*args: Any, **kwargs: Any) -> Estimate:
        with autocast_disabled():
            return estimate(*args, **kwargs)

    return cast(Estimator, run)


def check_precision(name: str, logits: torch.Tensor, gates: list[torch.Tensor]) -> None:
    """Refuse half precision for an estimator that takes differences of small displacements.

    Its differences of size ~1e-3 vanish in float16 / bfloat16 rounding (measured: gradients
    43-248 % off the exact path's, implicit term exactly 0), so it must not run silently. The
    gates have the dtype of the tensors the sites act on: an autocast region inside the model's
    own forward (``accelerate``'s mixed precision wraps ``model.forward``) shows there even
    when the logits come back in float32.

    Raises:
        ValueError: For float16 or bfloat16 logits or site tensors.
    """
    dtypes = {logits.dtype, *(g.dtype for g in gates)}
    low = sorted(str(d) for d in dtypes if d in LOW_PRECISION)
    if low:
        raise ValueError(
            f"gradient={name!r} takes differences that {', '.join(low)} cannot resolve "
            "(gradients far off, the implicit term 0): keep the parameters in float32 "
            "(torch.autocast around the step is fine: these passes then run in float32; an "
            "autocast inside the model's forward, as accelerate's mixed precision adds, is "
            "not), or use gradient='double-backward' or 'jvp'"
        )
