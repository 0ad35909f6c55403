"""The deprecated estimator keywords and config keys, mapped onto the estimators' own options.

Before the estimators held their options, ``Analytic`` took ``hvp_step=``, ``fd_epsilon=`` and
``fd_examples=`` (``DropoutK`` took ``hvp_step=``), and a config's ``[method]`` section had
``hvp_step``, ``fd_epsilon`` and ``fd_per_example``. They still work, with a
``DeprecationWarning`` naming the replacement; each one goes to the option of the estimator
that takes it, and is ignored (as it always was) when another estimator is chosen.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from dropsplit.estimators import ESTIMATORS, get_estimator
from dropsplit.estimators.base import Estimator

# deprecated keyword of Analytic / DropoutK -> (the estimator that takes it, its option there)
KEYWORDS = {
    "hvp_step": ("hvp-difference", "step"),
    "fd_epsilon": ("finite-difference", "epsilon"),
    "fd_examples": ("finite-difference", "examples"),
}
# deprecated key of a config's [method] section -> the same, an option of [method.estimator]
CONFIG_KEYS = {
    "hvp_step": ("hvp-difference", "step"),
    "fd_epsilon": ("finite-difference", "epsilon"),
    "fd_per_example": ("finite-difference", "per_example"),
}

__all__ = ["CONFIG_KEYS", "KEYWORDS", "estimator_from", "legacy_config", "pop_keywords"]


def pop_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the deprecated estimator keywords from ``kwargs`` and return them."""
    return {key: kwargs.pop(key) for key in list(kwargs) if key in KEYWORDS}


def estimator_from(
    gradient: str | Estimator,
    legacy: dict[str, Any],
    caller: str,
    curvature: str | None = None,
    *,
    separable: bool = False,
) -> Estimator:
    """The estimator of ``gradient`` with the deprecated keywords of ``caller`` applied.

    ``gradient`` goes through :func:`~dropsplit.estimators.get_estimator`; ``legacy`` holds the
    deprecated keywords that ``caller`` (e.g. ``"Analytic"``) was given. A keyword for another
    estimator than the chosen one is checked by that estimator's class (as it was before) and
    ignored, with a warning that says so.

    Raises:
        ValueError: From :func:`~dropsplit.estimators.get_estimator`, from the estimator's
            checks of the value, or for a keyword that sets an option of an estimator object
            (set it on the object).
        TypeError: From the estimator's checks of the value.
    """
    estimator = get_estimator(gradient, curvature, separable=separable)
    for keyword, value in legacy.items():
        name, option = KEYWORDS[keyword]
        owner = ESTIMATORS[name]
        use = f"use gradient=ds.{owner.__name__}({option}=...)"
        if estimator.name != name:
            owner(**{option: value})  # checked as it always was, though unused
            message = f"is deprecated ({use}) and ignored: {estimator.name!r} has no {option}"
        elif not isinstance(gradient, str):
            raise ValueError(f"{caller}({keyword}=...) and an estimator object: set {option} on it")
        else:
            estimator = dataclasses.replace(estimator, **{option: value})  # type: ignore[type-var]
            message = f"is deprecated: {use}"
        warnings.warn(f"{caller}({keyword}=...) {message}", DeprecationWarning, stacklevel=3)
    return estimator


def legacy_config(values: dict[str, Any], gradient: str) -> dict[str, Any]:
    """A config's ``[method]`` table with its deprecated keys moved to ``[method.estimator]``.

    Args:
        values: The ``[method]`` table as read (its ``estimator`` entry is a table, if any).
        gradient: The estimator the config chooses (``method.gradient``).

    Raises:
        ValueError: When a deprecated key and the option it became are both given.
    """
    out = dict(values)
    table = out.get("estimator", {})
    if not isinstance(table, dict):
        return out  # the config's type check names it
    table = dict(table)
    for key, (name, option) in CONFIG_KEYS.items():
        if key not in out:
            continue
        value = out.pop(key)
        new = f"[method.estimator] {option} (gradient {name!r})"
        if name != gradient:
            message = f"is deprecated (now {new}) and ignored: gradient is {gradient!r}"
        elif option in table:
            raise ValueError(
                f"config has both method.{key} and method.estimator.{option}; keep the latter"
            )
        else:
            table[option] = value
            message = f"is deprecated: use {new}"
        warnings.warn(f"config key method.{key} {message}", DeprecationWarning, stacklevel=4)
    out["estimator"] = table
    return out
