r"""Differences along the exact direction: the analytic step without double backward (issue 5).

The gradient of each analytic term is a Hessian-vector product in gate space. With ``G^P`` the
gate gradient of the curvature probe ``P`` (:func:`~dropsplit.explicit.curvature_probe`),

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
:mod:`dropsplit.finite_difference`, the direction ``d`` is the exact one (from one backward to
the gates), so no products of random signs enter: the estimator has the exact path's noise,
and the explicit term's value is exact. Cost: three forwards (the clean gated one, one along
``d``, one along ``d'``), one backward to the gates and one through all three forwards, all with
single-backward kernels; without the implicit term, two forwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dropsplit.explicit import explicit_penalty, probe_function, site_gradients
from dropsplit.forward import ForwardFn, ForwardOutput, call_forward
from dropsplit.losses import Loss
from dropsplit.noise import explicit_coefficient, noise_variance, sample_rademacher
from dropsplit.sites import SiteContext, gated_forward, site_context

HVP_CURVATURES = ("sampled", "label", "identity")


@dataclass
class HvpDifference:
    """One step of the exact-direction difference estimator.

    Attributes:
        surrogate: Scalar whose gradient is the estimated gradient of the objective.
        regularizers: The part of ``surrogate`` that carries the explicit and implicit terms
            (``surrogate`` minus the clean loss).
        loss: The clean token-mean loss.
        explicit_terms: The exact ``explicit_scale * lambda R`` of each recorded site call.
        implicit: The difference estimate of the implicit scalar ``S``.
        record: ``(site, gate)`` per site call of the clean forward.
        aux: The ``aux`` of the clean forward.
    """

    surrogate: torch.Tensor
    regularizers: torch.Tensor
    loss: torch.Tensor
    explicit_terms: list[torch.Tensor]
    implicit: torch.Tensor
    record: list
    aux: Any


def forward_along(
    model: nn.Module, forward_fn: ForwardFn, batch: Any, loss: Loss, directions, step: float
) -> tuple[ForwardOutput, float]:
    """The forward at gates ``1 + t d``, ``t`` scaled so that the largest gate moves by ``step``."""
    largest = max(float(d.abs().max()) for d in directions)
    t = step / largest if largest > 0 else step
    multipliers = [1.0 + t * d for d in directions]
    with site_context(model, SiteContext("fixed", multipliers=multipliers)):
        out = call_forward(forward_fn, model, batch, loss)
    return out, t


def hvp_difference_step(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    loss: Loss,
    *,
    curvature: str | None,
    implicit: bool,
    step: float,
    grouping: str,
    generator: torch.Generator,
    explicit_scale: float = 1.0,
    implicit_scale: float = 1.0,
) -> HvpDifference:
    """Build the surrogate of Analytic's objective from differences along exact directions.

    The labels (or ``u``) and signs are drawn from ``generator`` in the order of the
    double-backward path, so both paths see the same draws.

    Args:
        model: The model (its sites are gated, then moved along the directions).
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        loss: The loss family.
        curvature: ``"sampled"``, ``"label"``, ``"identity"`` or ``None`` (no explicit term).
        implicit: Add the implicit noise.
        step: Largest gate displacement of each difference.
        grouping: ``"mask"`` or ``"element"``.
        generator: Source of the labels and signs.
        explicit_scale: Multiplies ``lambda``.
        implicit_scale: Multiplies the noise variance ``v``.

    Returns:
        The step; backpropagate ``surrogate``.

    Raises:
        ValueError: On an unsupported curvature or a forward that uses no site.
    """
    if curvature not in (*HVP_CURVATURES, None):
        raise ValueError(
            f"gradient='hvp-difference' supports explicit in {HVP_CURVATURES} or None, got "
            f"{curvature!r}"
        )
    out, ctx = gated_forward(model, forward_fn, batch, loss, grouping, twice=False)
    n, gates, qs = out.n, ctx.gates, [site.p for site, _ in ctx.record]
    summed = loss.summed(out.logits, out.targets)
    regularizers = summed.new_zeros(())
    terms, implicit_value = [], summed.new_zeros(())
    if curvature is not None:
        probe = probe_function(curvature, out, loss, generator)
        at_one = probe(out.logits)
        grads = [g.detach() for g in site_gradients(at_one, gates, create_graph=False)]
        terms = [explicit_scale * explicit_penalty(g, q, n) for g, q in zip(grads, qs, strict=True)]
        directions = [
            2 * explicit_scale * explicit_coefficient(q) / n * g
            for g, q in zip(grads, qs, strict=True)
        ]
        moved, t = forward_along(model, forward_fn, batch, loss, directions, step)
        regularizers = regularizers + (probe(moved.logits) - at_one) / t
    if implicit:
        scales = [math.sqrt(implicit_scale * noise_variance(q)) / n for q in qs]
        directions = [
            c * sample_rademacher(g.shape, generator, g.dtype, g.device)
            for g, c in zip(gates, scales, strict=True)
        ]
        moved, t = forward_along(model, forward_fn, batch, loss, directions, step)
        difference = (loss.summed(moved.logits, moved.targets) - summed) / t
        implicit_value = difference.detach()
        regularizers = regularizers + difference
    return HvpDifference(
        surrogate=summed / n + regularizers,
        regularizers=regularizers,
        loss=(summed / n).detach(),
        explicit_terms=[term.detach() for term in terms],
        implicit=implicit_value,
        record=ctx.record,
        aux=out.aux,
    )
