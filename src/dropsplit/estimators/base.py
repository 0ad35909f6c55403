"""What every gradient estimator is, takes and returns: one shape for all of them.

An estimator is an object (a small frozen dataclass holding its own options, see
:class:`Estimator`) with

* ``name``: its ``gradient=`` name in :data:`dropsplit.estimators.ESTIMATORS`;
* ``CURVATURES``: the explicit kinds it supports (besides ``None``, no explicit term);
* ``SEPARABLE``: whether its surrogate splits into the clean loss plus a part that carries the
  regularizers alone (``Estimate.regularizers``), so that Dropout_k can add that part to its
  dropout loss (Alg. 4);
* ``estimate(model, forward_fn, batch, spec, generator) -> Estimate``.

The problem (:class:`EstimatorSpec`: the loss, the terms, their scales) comes with each call;
the estimator's own settings (a step, an epsilon) live on the object.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import torch

from dropsplit.core.forward import ForwardFn, autocast_disabled
from dropsplit.core.losses import Loss


@dataclass(frozen=True)
class EstimatorSpec:
    """The analytic terms to estimate: the problem, the same for every estimator.

    The estimator's own settings (a step, an epsilon) are attributes of the estimator object.

    Attributes:
        loss: The loss family.
        curvature: Curvature of the explicit term (``None``: no explicit term).
        implicit: Add the implicit scalar ``S`` of xi_approx.
        grouping: ``"mask"`` or ``"element"``.
        explicit_scale: Multiplies each site's ``lambda``.
        implicit_scale: Multiplies each site's noise variance ``v``.
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


class Estimator:
    """Base of the estimator classes: its options are its dataclass fields.

    A subclass is a frozen dataclass whose fields are its options (checked in
    ``__post_init__``), with the class attributes ``name``, ``CURVATURES`` and ``SEPARABLE``
    and the method :meth:`estimate`. Adding an estimator is such a class in its own module and
    one entry in :data:`dropsplit.estimators.ESTIMATORS`; ``Analytic``, ``DropoutK``,
    :class:`EstimatorSpec` and the trainer know none of its options.
    """

    name: ClassVar[str]
    CURVATURES: ClassVar[tuple[str, ...]]
    SEPARABLE: ClassVar[bool]

    def estimate(
        self,
        model: torch.nn.Module,
        forward_fn: ForwardFn,
        batch: Any,
        spec: EstimatorSpec,
        generator: torch.Generator,
    ) -> Estimate:
        """One draw of the estimator for the terms of ``spec`` (see the subclasses)."""
        raise NotImplementedError

    @classmethod
    def config_options(cls) -> dict[str, Any]:
        """The options a config file's ``[method.estimator]`` table may set, with defaults.

        By default the fields whose default is a TOML scalar (a number, a bool, a string).
        """
        fields = dataclasses.fields(cast(Any, cls))
        scalar = (bool, int, float, str)
        return {f.name: f.default for f in fields if isinstance(f.default, scalar)}

    @classmethod
    def from_config(
        cls, options: Mapping[str, Any], examples: Callable[[Any], torch.Tensor] | None = None
    ) -> Estimator:
        """The estimator a config's ``[method.estimator]`` table gives.

        Args:
            options: Keys of :meth:`config_options`.
            examples: The trainer's batch layout, ``examples(out)``: the example index of each
                target. Offered to every estimator; one that has no use for it ignores it.

        Raises:
            ValueError: For a key the estimator does not take, listing those it takes.
            TypeError: From the class's own checks of the values (as are ``ValueError``).
        """
        check_options(cls, options)
        return cls(**options)


def check_options(cls: type[Estimator], options: Mapping[str, Any]) -> None:
    """Refuse keys that ``cls`` does not take, in one line listing those it does."""
    known = cls.config_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(sorted(known)) or "no options"
        raise ValueError(
            f"gradient={cls.name!r} takes {takes} in [method.estimator], got {', '.join(unknown)}"
        )


def check_number(owner: str, option: str, value: Any, high: float) -> float:
    """``value`` as a float in ``(0, high]``, or a clear error naming ``owner``'s option.

    Raises:
        TypeError: For anything but an int or a float (a bool too).
        ValueError: Outside ``(0, high]`` (nan too).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {option} must be a number, got {type(value).__name__}")
    if not 0.0 < value <= high:
        raise ValueError(f"{owner}: {option} must be in (0, {high:g}], got {value}")
    return float(value)


def check_curvature(name: str, supported: tuple[str, ...], curvature: str | None) -> None:
    """Raise a clear error when an estimator does not support ``curvature``."""
    if curvature not in (*supported, None):
        raise ValueError(
            f"gradient={name!r} supports curvature in {supported} or None, got {curvature!r}"
        )


LOW_PRECISION = (torch.float16, torch.bfloat16)
EstimateFn = TypeVar("EstimateFn", bound=Callable[..., Estimate])


def without_autocast(estimate: EstimateFn) -> EstimateFn:
    """Run an estimator that takes differences outside any ``torch.autocast`` region.

    Its differences of displacements of size ``~1e-3`` vanish in float16 / bfloat16 rounding,
    so inside an autocast region its passes run in the parameters' own precision (float32):
    the caller's mixed-precision loop works, and these passes cost what they cost in float32.
    """

    @functools.wraps(estimate)
    def run(*args: Any, **kwargs: Any) -> Estimate:
        with autocast_disabled():
            return estimate(*args, **kwargs)

    return cast(EstimateFn, run)


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
