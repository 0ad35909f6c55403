"""Gradient estimators of the analytic terms, one module each, chosen from one table.

Every estimator is ``estimate(model, forward_fn, batch, spec, generator) -> Estimate`` and
declares the explicit kinds it supports (``CURVATURES``) and whether its regularizers can be
added to another loss (``SEPARABLE``). :class:`~dropsplit.Analytic` and
``DropoutK(noise="analytic")`` look their ``gradient=`` up in :data:`ESTIMATORS`; a new
estimator is a new module and one entry here.

* ``"double-backward"``: exact (:mod:`~dropsplit.estimators.double_backward`).
* ``"hvp-difference"``: the exact path's values and draws, gradients by one-sided differences
  along the exact directions (:mod:`~dropsplit.estimators.hvp_difference`).
* ``"jvp"``: the exact path's values, draws and gradients (to rounding), by forward-mode over
  reverse-mode AD along the same directions, no double backward
  (:mod:`~dropsplit.estimators.jvp`).
* ``"finite-difference"``: two antithetic forwards along random signs
  (:mod:`~dropsplit.estimators.finite_difference`).
"""

from __future__ import annotations

from types import ModuleType

from dropsplit.estimators import double_backward, finite_difference, hvp_difference, jvp
from dropsplit.estimators.base import Estimate, EstimatorSpec, check_curvature

ESTIMATORS: dict[str, ModuleType] = {
    "double-backward": double_backward,
    "hvp-difference": hvp_difference,
    "jvp": jvp,
    "finite-difference": finite_difference,
}
GRADIENTS = tuple(ESTIMATORS)

__all__ = ["ESTIMATORS", "GRADIENTS", "Estimate", "EstimatorSpec", "get_estimator"]


def get_estimator(
    gradient: str, curvature: str | None = None, *, separable: bool = False
) -> ModuleType:
    """The estimator module named ``gradient``, checked against what the caller needs.

    Args:
        gradient: A key of :data:`ESTIMATORS`.
        curvature: The explicit term's curvature it must support (``None``: no explicit term).
        separable: Whether the caller adds the regularizers to its own loss (Dropout_k).

    Raises:
        ValueError: For an unknown name, an unsupported curvature, or a non-separable
            estimator where a separable one is needed.
    """
    if gradient not in ESTIMATORS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    module = ESTIMATORS[gradient]
    check_curvature(gradient, module.CURVATURES, curvature)
    if separable and not module.SEPARABLE:
        usable = tuple(name for name, m in ESTIMATORS.items() if m.SEPARABLE)
        raise ValueError(
            f"gradient={gradient!r} cannot give the analytic noise alone (its surrogate replaces "
            f"the loss); DropoutK(noise='analytic') takes gradient in {usable}"
        )
    return module
