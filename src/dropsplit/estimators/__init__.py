"""Gradient estimators of the analytic terms, one class each, chosen from one table.

Every estimator is a small frozen dataclass holding its own options, with
``estimate(model, forward_fn, batch, spec, generator) -> Estimate``; it declares the explicit
kinds it supports (``CURVATURES``) and whether its regularizers can be added to another loss
(``SEPARABLE``). :class:`~dropsplit.Analytic` and ``DropoutK(noise="analytic")`` take
``gradient=`` as an estimator object (``gradient=HVPDifference(step=1e-4)``) or as its name in
:data:`ESTIMATORS` (the class with its defaults). A new estimator is a new module with its class
and one entry here; no option of it appears anywhere else.

* ``"double-backward"``, :class:`DoubleBackward`: exact
  (:mod:`~dropsplit.estimators.double_backward`).
* ``"hvp-difference"``, :class:`HVPDifference` (``step``): the exact path's values and draws,
  gradients by one-sided differences along the exact directions
  (:mod:`~dropsplit.estimators.hvp_difference`).
* ``"jvp"``, :class:`JVP`: the exact path's values, draws and gradients (to rounding), by
  forward-mode over reverse-mode AD along the same directions, no double backward
  (:mod:`~dropsplit.estimators.jvp`).
* ``"finite-difference"``, :class:`FiniteDifference` (``epsilon``, ``examples``): two
  antithetic forwards along random signs (:mod:`~dropsplit.estimators.finite_difference`).
"""

from __future__ import annotations

from typing import Any

from dropsplit.estimators.base import Estimate, Estimator, EstimatorSpec, check_curvature
from dropsplit.estimators.double_backward import DoubleBackward
from dropsplit.estimators.finite_difference import FiniteDifference
from dropsplit.estimators.hvp_difference import HVPDifference
from dropsplit.estimators.jvp import JVP

ESTIMATORS: dict[str, type[Estimator]] = {
    "double-backward": DoubleBackward,
    "hvp-difference": HVPDifference,
    "jvp": JVP,
    "finite-difference": FiniteDifference,
}
GRADIENTS = tuple(ESTIMATORS)

__all__ = [
    "ESTIMATORS",
    "GRADIENTS",
    "JVP",
    "DoubleBackward",
    "Estimate",
    "Estimator",
    "EstimatorSpec",
    "FiniteDifference",
    "HVPDifference",
    "get_estimator",
]


def _instance(gradient: Any) -> Estimator:
    """The estimator object ``gradient`` names, or ``gradient`` itself.

    Raises:
        ValueError: For an unknown name.
        TypeError: For an estimator class (not an instance) or anything without ``estimate``.
    """
    if isinstance(gradient, str):
        if gradient not in ESTIMATORS:
            raise ValueError(
                f"gradient must be one of {tuple(ESTIMATORS)} or an estimator object "
                f"(e.g. HVPDifference(step=1e-3)), got {gradient!r}"
            )
        return ESTIMATORS[gradient]()
    if isinstance(gradient, type):
        raise TypeError(
            f"gradient={gradient.__name__} is a class: pass an instance, {gradient.__name__}()"
        )
    if not all(hasattr(gradient, a) for a in ("name", "CURVATURES", "SEPARABLE", "estimate")):
        raise TypeError(
            f"gradient must be a name in {tuple(ESTIMATORS)} or an estimator object (name, "
            f"CURVATURES, SEPARABLE, estimate), got {type(gradient).__name__}"
        )
    return gradient


def get_estimator(
    gradient: str | Estimator, curvature: str | None = None, *, separable: bool = False
) -> Estimator:
    """The estimator ``gradient`` gives, checked against what the caller needs.

    Args:
        gradient: A key of :data:`ESTIMATORS` (its class with the default options) or an
            estimator object (e.g. ``HVPDifference(step=1e-4)``).
        curvature: The explicit term's curvature it must support (``None``: no explicit term).
        separable: Whether the caller adds the regularizers to its own loss (Dropout_k).

    Raises:
        ValueError: For an unknown name, an unsupported curvature, or a non-separable
            estimator where a separable one is needed.
        TypeError: For something that is neither a name nor an estimator object.
    """
    estimator = _instance(gradient)
    check_curvature(estimator.name, estimator.CURVATURES, curvature)
    if separable and not estimator.SEPARABLE:
        usable = tuple(name for name, cls in ESTIMATORS.items() if cls.SEPARABLE)
        raise ValueError(
            f"gradient={estimator.name!r} cannot give the analytic noise alone (its surrogate "
            f"replaces the loss); DropoutK(noise='analytic') takes gradient in {usable}"
        )
    return estimator
