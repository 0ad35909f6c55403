r"""A finite-difference estimator of the analytic step: no double backward (ours).

Perturb every site antithetically along one random sign direction scaled per site,

.. math::
    m_\pm = 1 \pm \varepsilon \sqrt{v}\, s, \qquad s_m \in \{\pm 1\}, \quad v = \frac{q}{1-q},

one sign per mask group (the grouping rule), and run the forward at ``m_+`` and at ``m_-``.
With ``P`` the curvature probe (summed loss at labels drawn from the model for ``"sampled"``,
at the true labels for ``"label"``, ``<u, F> / sqrt(C)`` with fixed Rademacher ``u`` for
``"identity"``; see :func:`~dropsplit.core.explicit.curvature_probe`) and ``L`` the summed
true-label loss,

.. math::
    A = \frac{P(m_+) - P(m_-)}{2\varepsilon} = \sum_m \sqrt{v_m} s_m G^P_m + O(\varepsilon^2),
    \qquad
    A^y = \frac{L(m_+) - L(m_-)}{2\varepsilon} = \sum_m \sqrt{v_m} s_m G^y_m + O(\varepsilon^2).

Since :math:`\mathbb{E}_s[A^2] = \sum_m v_m (G^P_m)^2 = 2N \lambda R`, the explicit term is
estimated by :math:`A^2 / 2N` and its gradient by :math:`A \nabla A / N` (unbiased up to
:math:`O(\varepsilon^2)`; a Hutchinson-type estimator, noisier than the exact path: the products
of different groups' signs cancel only in expectation).

Per example (``examples``): with :math:`A_b` the slope of example ``b``'s probe, the estimate
:math:`\sum_b A_b^2 / 2N` drops the sign products between groups of different examples, the
bulk of the noise. It is exact in expectation for every site whose mask groups each belong to
one example (activation dropout, locked dropout); for a site whose mask is shared by the batch
(DropConnect, embedding rows) it keeps only the within-example part of each group's square. With the
signs ``r = s``, :math:`A^y / N` is the implicit scalar ``S`` of xi_approx (Sec. 3.2), so one pair
of passes gives both terms. The loss gradient is the antithetic mean of the two passes,
:math:`(\nabla L(m_+) + \nabla L(m_-)) / 2N = \nabla L(1) / N + O(\varepsilon^2)`. The cost is two
forwards and one backward through both: that of Dropout_2, with single backward kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dropsplit.core.forward import ForwardFn, ForwardOutput, call_forward
from dropsplit.core.noise import sample_rademacher
from dropsplit.core.sites import SiteContext, site_context
from dropsplit.estimators.base import (
    Estimate,
    Estimator,
    EstimatorSpec,
    check_curvature,
    check_number,
    check_options,
    check_precision,
    without_autocast,
)

__all__ = ["FiniteDifference", "FiniteDifferenceEstimate"]


@dataclass
class FiniteDifferenceEstimate(Estimate):
    """An :class:`~dropsplit.estimators.base.Estimate` with the draw's directions and probe.

    Attributes:
        directions: Per site call, ``sqrt(v) * s`` (the perturbation is ``1 +- eps * it``).
        probe: The per-target probe as a function of the logits, with this draw's labels or
            ``u``: for ``"sampled"`` the labels are drawn from the model at ``m_+`` (the O(eps)
            shift of that law is odd in ``s`` and cancels in expectation).
    """

    directions: list[torch.Tensor] = field(default_factory=list)
    probe: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class FiniteDifference(Estimator):
    """``gradient="finite-difference"``: two antithetic forwards along random signs.

    Attributes:
        epsilon: The step, relative to each site's noise standard deviation ``sqrt(v)``, in
            ``(0, 1]``; the estimate is unbiased up to ``O(epsilon^2)``.
        examples: ``examples(out)``: the example index of each target, so that the explicit
            term squares one slope per example (much less noise; see the module doc), e.g.
            :func:`dropsplit.models.awd.sequence_examples`. ``None``: one slope per batch.

    In a config file (``[method.estimator]``) the example map is not written out: the option
    ``per_example`` (default ``true``) takes the batch layout that the trainer offers every
    estimator (:meth:`from_config`), ``false`` one slope per batch.
    """

    name: ClassVar[str] = "finite-difference"
    CURVATURES: ClassVar[tuple[str, ...]] = ("sampled", "label", "identity")
    # the antithetic loss stands in for the clean loss: no regularizer-only part
    SEPARABLE: ClassVar[bool] = False
    epsilon: float = 0.05
    examples: Callable[[ForwardOutput], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        epsilon = check_number("FiniteDifference", "epsilon", self.epsilon, 1.0)
        object.__setattr__(self, "epsilon", epsilon)
        if self.examples is not None and not callable(self.examples):
            raise TypeError(
                "FiniteDifference: examples must be None or a callable out -> example index "
                f"per target, got {type(self.examples).__name__}"
            )

    @classmethod
    def config_options(cls) -> dict[str, Any]:
        """``epsilon`` and ``per_example`` (the example map itself is the trainer's)."""
        return {**super().config_options(), "per_example": True}

    @classmethod
    def from_config(
        cls, options: Mapping[str, Any], examples: Callable[[Any], torch.Tensor] | None = None
    ) -> FiniteDifference:
        """One slope per example of the trainer's layout ``examples`` unless ``per_example``.

        Raises:
            ValueError: For an option it does not take, or a bad ``epsilon``.
            TypeError: For a ``per_example`` that is not a bool, or an ``epsilon`` that is not a
                number.
        """
        check_options(cls, options)
        values = {**cls.config_options(), **options}
        per_example = values.pop("per_example")
        if not isinstance(per_example, bool):
            raise TypeError(f"FiniteDifference: per_example must be a bool, got {per_example!r}")
        return cls(**values, examples=examples if per_example else None)

    @without_autocast
    def estimate(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        batch: Any,
        spec: EstimatorSpec,
        generator: torch.Generator,
    ) -> FiniteDifferenceEstimate:
        r"""Run the two antithetic passes and build the surrogate of Analytic's objective.

        ``self.epsilon`` is the step relative to each site's noise standard deviation
        ``sqrt(v)``; with ``self.examples`` (``examples(out)``: the example index of each
        target) the explicit term squares one slope per example (see the module doc).

        Args:
            model: The model (its sites are perturbed).
            forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
            batch: Passed to ``forward_fn``.
            spec: The terms and their scales.
            generator: Source of the signs and the probe labels.

        Returns:
            The estimator's draw; backpropagate ``surrogate``.
        """
        check_curvature(self.name, self.CURVATURES, spec.curvature)
        loss, epsilon = spec.loss, self.epsilon
        with (
            torch.profiler.record_function("dropsplit.finite_difference.forward_plus"),
            site_context(
                model, SiteContext("perturb", [generator], grouping=spec.grouping, epsilon=epsilon)
            ) as plus_ctx,
        ):
            plus = call_forward(forward_fn, model, batch, loss)
        if not plus_ctx.record:
            raise ValueError("the forward pass used none of the model's dropout sites")
        check_precision(self.name, plus.logits, plus_ctx.gates)
        minus_multipliers = [2.0 - m for m in plus_ctx.gates]
        with (
            torch.profiler.record_function("dropsplit.finite_difference.forward_minus"),
            site_context(model, SiteContext("fixed", multipliers=minus_multipliers)),
        ):
            minus = call_forward(forward_fn, model, batch, loss)
        n = plus.n
        loss_plus, loss_minus, probe_plus, probe_minus, probe = _per_target_values(
            spec, plus, minus, generator
        )
        summed_plus, summed_minus = loss_plus.sum(), loss_minus.sum()
        mean_loss = (summed_plus + summed_minus) / (2 * n)
        surrogate = mean_loss
        explicit = implicit_value = None
        if spec.curvature is not None:
            ids = _example_ids(self.examples, plus)
            slopes = (probe_plus - probe_minus) / (2 * epsilon)  # per target
            slopes = slopes.new_zeros(int(ids.max()) + 1).index_add(0, ids, slopes)  # per example
            explicit = spec.explicit_scale * slopes.detach().pow(2).sum() / (2 * n)
            surrogate = surrogate + spec.explicit_scale * (slopes.detach() * slopes).sum() / n
        if spec.implicit:
            slope = (summed_plus - summed_minus) / (2 * epsilon)
            implicit_value = math.sqrt(spec.implicit_scale) / n * slope
            surrogate = surrogate + implicit_value
        return FiniteDifferenceEstimate(
            surrogate=surrogate,
            regularizers=None,
            loss=mean_loss.detach(),
            explicit=explicit,
            explicit_terms=None,
            implicit=None if implicit_value is None else implicit_value.detach(),
            record=plus_ctx.record,
            aux=plus.aux,
            directions=[(m - 1.0) / epsilon for m in plus_ctx.gates],
            probe=probe,
        )


def _example_ids(
    examples: Callable[[ForwardOutput], torch.Tensor] | None, out: ForwardOutput
) -> torch.Tensor:
    """The example index of each target (``examples(out)``; all zeros without it)."""
    if examples is None:
        return torch.zeros(out.n, dtype=torch.long, device=out.logits.device)
    ids = examples(out).to(out.logits.device)
    if ids.shape != (out.n,):
        raise ValueError(f"examples(out) must give one example index per target, shape ({out.n},)")
    return ids


def _per_target_values(
    spec: EstimatorSpec, plus: ForwardOutput, minus: ForwardOutput, generator: torch.Generator
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]
]:
    """The true-label losses and the probe at ``m_+`` and ``m_-``, and the probe itself.

    Draws ``u`` (``"identity"``) or the probe labels (``"sampled"``, from the model at ``m_+``:
    the O(eps) shift of that law cancels in expectation) from ``generator``.
    """
    loss, curvature = spec.loss, spec.curvature
    if curvature == "identity":
        u = sample_rademacher(plus.logits.shape, generator, plus.logits.dtype, plus.logits.device)
        (loss_plus,), (loss_minus,) = (
            loss.per_target_at(o.logits, o.targets) for o in (plus, minus)
        )

        def probe(logits: torch.Tensor) -> torch.Tensor:
            return (u * logits).sum(1) / math.sqrt(logits.shape[1])

        return loss_plus, loss_minus, probe(plus.logits), probe(minus.logits), probe
    targets = plus.targets
    if curvature == "sampled":
        targets = loss.sample_targets(plus.logits, generator)
    loss_plus, probe_plus = loss.per_target_at(plus.logits, plus.targets, targets)
    loss_minus, probe_minus = loss.per_target_at(minus.logits, minus.targets, targets)

    def label_probe(logits: torch.Tensor) -> torch.Tensor:
        return loss.per_target(logits, targets)

    return loss_plus, loss_minus, probe_plus, probe_minus, label_probe
