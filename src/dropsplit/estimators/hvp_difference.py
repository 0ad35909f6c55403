r"""Differences along the exact direction: the analytic step without double backward (ours).

The gradient of each analytic term is a Hessian-vector product in gate space. With ``G^P`` the
gate gradient of the curvature probe ``P`` (:func:`~dropsplit.core.explicit.curvature_probe`),

.. math::
    \nabla_W \lambda R = \nabla_W \sum_m d_m G^P_m(W), \qquad
    d = \frac{2 s \lambda}{N} G^P \ \text{(held fixed)},

and :math:`\sum_m d_m G^P_m = D_d P`, the derivative of ``P`` along ``d`` at gates ``1``. The
implicit scalar of xi_approx (Sec. 3.2) is likewise :math:`S = D_{d'} L` with
:math:`d' = \sqrt{s' v}\, r / N`. Both derivatives are replaced by one-sided differences,

.. math::
    D_d P \approx \frac{P(1 + t d) - P(1)}{t}, \qquad
    D_{d'} L \approx \frac{L(1 + t' d') - L(1)}{t'},

with ``t`` chosen so that the largest gate moves by ``step``. The gradients are those of the
double-backward path with the same labels and signs, up to :math:`O(t)` and rounding. Unlike
:mod:`~dropsplit.estimators.finite_difference`, the direction ``d`` is the exact one (from one
backward to the gates), so no products of random signs enter: the estimator has the exact
path's noise, and the explicit term's value is exact. Cost: three forwards (the clean gated
one, one along ``d``, one along ``d'``), one backward to the gates and one through each forward,
all with single-backward kernels; without the implicit term, two forwards.

Memory: ``t`` and ``t'`` are known before the moved forwards, so the clean forward's part of
the surrogate (``L / N - P(1) / t - L(1) / t'``) is backpropagated first and its graph freed,
then each moved forward right after it is built; the parameter gradients add up in one buffer
that enters the surrogate as a zero-valued linear term (:func:`inject`). At most one graph is
alive at a time (three at once cost 3.5 dropout steps' memory at the paper's size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from dropsplit.core.explicit import explicit_penalty, probe_function, site_gradients
from dropsplit.core.forward import (
    ForwardFn,
    ForwardOutput,
    call_forward,
    gated_forward,
    trainable_parameters,
)
from dropsplit.core.losses import Loss
from dropsplit.core.noise import explicit_coefficient, noise_variance, sample_rademacher
from dropsplit.core.sites import SiteContext, site_context
from dropsplit.estimators.base import (
    Estimate,
    Estimator,
    EstimatorSpec,
    check_curvature,
    check_number,
    check_precision,
    without_autocast,
)

__all__ = [
    "HVPDifference",
    "explicit_directions",
    "forward_along",
    "implicit_directions",
    "inject",
]

Gradients = list[torch.Tensor | None]
Directions = list[torch.Tensor]


def inject(grads: Gradients, params: list[nn.Parameter]) -> torch.Tensor:
    """A zero-valued scalar whose gradient with respect to ``params`` is ``grads``.

    ``sum_p <p, g_p> - sum_p <p, g_p>.detach()``: gradients taken early, their graphs freed,
    enter the caller's single backward.
    """
    terms = [(p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None]
    if not terms:
        return torch.zeros((), dtype=params[0].dtype if params else None)
    linear = torch.stack(terms).sum()
    return linear - linear.detach()


def _add_gradient(total: Gradients, scalar: torch.Tensor, params: list[nn.Parameter]) -> Gradients:
    """``total + d scalar / d params``, taken now so that ``scalar``'s graph is freed."""
    grads = torch.autograd.grad(scalar, params, allow_unused=True)
    return [
        g if t is None else t if g is None else t + g for t, g in zip(total, grads, strict=True)
    ]


def _step_size(directions: list[torch.Tensor], step: float) -> float:
    """``t`` such that the largest gate of ``1 + t d`` moves by ``step``."""
    largest = max(float(d.abs().max()) for d in directions)
    return step / largest if largest > 0 else step


def explicit_directions(
    out: ForwardOutput,
    gates: list[torch.Tensor],
    qs: list[float],
    spec: EstimatorSpec,
    generator: torch.Generator,
    part: str = "hvp_difference",
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, list[torch.Tensor], Directions]:
    r"""The explicit term's probe, its value, its terms and its direction :math:`d`.

    Draws the probe (labels or ``u``) from ``generator`` as the double-backward path does, and
    takes the gate gradients :math:`G^P` of the probe at gates 1 (one backward, the gated
    graph kept). Sec. 3.1: :math:`\lambda R = \sum_{\text{sites}} s \lambda \frac1N
    \sum_m (G^P_m)^2`, so :math:`\nabla_W \lambda R = \nabla_W \sum_m d_m G^P_m(W)` with
    :math:`d = 2 s \lambda G^P / N` held fixed.

    Args:
        out: The gated forward's output.
        gates: Its gates.
        qs: Each gate's drop probability.
        spec: Gives the loss, the curvature and ``s = explicit_scale``.
        generator: Source of the probe's draws.
        part: The estimator's name in the profiler label ``dropsplit.<part>.gate_gradients``.

    Returns:
        ``(probe, probe at gates 1 (with its graph), explicit term per gate, d per gate)``.
    """
    assert spec.curvature is not None
    n, scale = out.n, spec.explicit_scale
    probe = probe_function(spec.curvature, out, spec.loss, generator)
    at_one = probe(out.logits)
    with torch.profiler.record_function(f"dropsplit.{part}.gate_gradients"):
        grads = [g.detach() for g in site_gradients(at_one, gates, create_graph=False)]
    terms = [scale * explicit_penalty(g, q, n) for g, q in zip(grads, qs, strict=True)]
    directions = [
        2 * scale * explicit_coefficient(q) / n * g for g, q in zip(grads, qs, strict=True)
    ]
    return probe, at_one, terms, directions


def implicit_directions(
    gates: list[torch.Tensor],
    qs: list[float],
    n: int,
    implicit_scale: float,
    generator: torch.Generator,
) -> Directions:
    r"""The implicit scalar's direction :math:`d' = \sqrt{s' v}\, r / N` (Sec. 3.2).

    :math:`S = \sum_m d'_m G^y_m = D_{d'} L`; the signs ``r`` are drawn from ``generator`` per
    gate in call order, as :func:`~dropsplit.core.implicit.implicit_scalar_sum` draws them.
    """
    scales = [math.sqrt(implicit_scale * noise_variance(q)) / n for q in qs]
    return [
        c * sample_rademacher(g.shape, generator, g.dtype, g.device)
        for g, c in zip(gates, scales, strict=True)
    ]


def forward_along(
    model: nn.Module, forward_fn: ForwardFn, batch: Any, loss: Loss, directions, t: float
) -> ForwardOutput:
    """The forward at gates ``1 + t d`` (``t`` from :func:`_step_size`)."""
    multipliers = [1.0 + t * d for d in directions]
    with site_context(model, SiteContext("fixed", multipliers=multipliers)):
        return call_forward(forward_fn, model, batch, loss)


Move = tuple[str, list[torch.Tensor], float, Callable, torch.Tensor]


def _backpropagate(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    loss: Loss,
    params: list[nn.Parameter],
    clean: torch.Tensor,
    moves: list[Move],
) -> tuple[Gradients, dict[str, torch.Tensor]]:
    """The parameter gradients of ``clean`` and of each moved forward, one graph at a time.

    ``clean`` is backpropagated first (its graph freed), then each move's forward is built
    and backpropagated right away. Returns the summed gradients and each move's difference
    ``(f(moved) - f(1)) / t`` by its label.
    """
    with torch.profiler.record_function("dropsplit.hvp_difference.clean_backward"):
        total = _add_gradient([None] * len(params), clean, params)  # frees the clean graph
    values = {}
    for label, directions, t, function, at_start in moves:
        with torch.profiler.record_function(f"dropsplit.hvp_difference.{label}_forward"):
            at_end = function(forward_along(model, forward_fn, batch, loss, directions, t).logits)
            total = _add_gradient(total, at_end / t, params)  # frees the moved graph
        values[label] = (at_end.detach() - at_start) / t
    return total, values


@dataclass(frozen=True)
class HVPDifference(Estimator):
    """``gradient="hvp-difference"``: one-sided differences along the exact directions.

    Attributes:
        step: Largest gate displacement of each difference, in ``(0, 0.1]`` (``1e-3``: the
            smallest error in float32, about 1e-4 of the gradient's norm on the test problems;
            the error is ``O(step)`` plus rounding of order ``eps_machine / step``).
    """

    name: ClassVar[str] = "hvp-difference"
    CURVATURES: ClassVar[tuple[str, ...]] = ("sampled", "label", "identity")
    SEPARABLE: ClassVar[bool] = True
    step: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", check_number("HVPDifference", "step", self.step, 0.1))

    @without_autocast
    def estimate(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        batch: Any,
        spec: EstimatorSpec,
        generator: torch.Generator,
    ) -> Estimate:
        """Build the surrogate of Analytic's objective from differences along exact directions.

        The labels (or ``u``) and signs are drawn from ``generator`` in the order of the
        double-backward path, so both paths see the same draws. ``self.step`` is the largest
        gate displacement of each difference.

        Args:
            model: The model (its sites are gated, then moved along the directions).
            forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
            batch: Passed to ``forward_fn``.
            spec: The terms and their scales.
            generator: Source of the labels and signs.

        Returns:
            The estimate; backpropagate ``surrogate``.

        Raises:
            ValueError: On an unsupported curvature or a forward that uses no site.
        """
        check_curvature(self.name, self.CURVATURES, spec.curvature)
        loss, step = spec.loss, self.step
        with torch.profiler.record_function("dropsplit.hvp_difference.gated_forward"):
            out, ctx = gated_forward(model, forward_fn, batch, loss, spec.grouping, twice=False)
        check_precision(self.name, out.logits, ctx.gates)
        n, gates, qs = out.n, ctx.gates, [site.p for site, _ in ctx.record]
        params = trainable_parameters(model)
        summed = loss.summed(out.logits, out.targets)
        clean = summed / n if spec.with_loss else summed.new_zeros(())  # the clean graph's part
        # (label, directions, t, the function of the logits it differentiates, its value at 1)
        moves: list[Move] = []
        terms, explicit = None, None
        if spec.curvature is not None:
            probe, at_one, terms, directions = explicit_directions(out, gates, qs, spec, generator)
            explicit = torch.stack(terms).sum()
            t = _step_size(directions, step)
            clean = clean - at_one / t
            moves.append(("explicit", directions, t, probe, at_one.detach()))
        if spec.implicit:
            directions = implicit_directions(gates, qs, n, spec.implicit_scale, generator)
            t = _step_size(directions, step)
            clean = clean - summed / t
            true_loss = partial(loss.summed, targets=out.targets)
            moves.append(("implicit", directions, t, true_loss, summed.detach()))
        total, values = _backpropagate(model, forward_fn, batch, loss, params, clean, moves)
        implicit_value = values.get("implicit")
        injected = sum(values.values(), summed.new_zeros(())) + inject(total, params)
        # with the loss, the injected gradient is the whole surrogate's: no separable part to give
        regularizers = None if spec.with_loss else injected
        surrogate = (summed / n).detach() + injected if spec.with_loss else injected
        return Estimate(
            surrogate=surrogate,
            regularizers=regularizers,
            loss=(summed / n).detach(),
            explicit=explicit,
            explicit_terms=terms,
            implicit=implicit_value,
            record=ctx.record,
            aux=out.aux,
        )
