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
one, one along ``d``, one along ``d'``), one backward to the gates and one through all three
forwards, all with single-backward kernels; without the implicit term, two forwards.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dropsplit.core.explicit import explicit_penalty, probe_function, site_gradients
from dropsplit.core.forward import ForwardFn, ForwardOutput, call_forward, gated_forward
from dropsplit.core.losses import Loss
from dropsplit.core.noise import explicit_coefficient, noise_variance, sample_rademacher
from dropsplit.core.sites import SiteContext, site_context
from dropsplit.estimators.base import Estimate, EstimatorSpec, check_curvature, check_precision

CURVATURES = ("sampled", "label", "identity")
SEPARABLE = True
__all__ = ["CURVATURES", "SEPARABLE", "estimate", "forward_along"]


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


def estimate(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    spec: EstimatorSpec,
    generator: torch.Generator,
) -> Estimate:
    """Build the surrogate of Analytic's objective from differences along exact directions.

    The labels (or ``u``) and signs are drawn from ``generator`` in the order of the
    double-backward path, so both paths see the same draws. ``spec.hvp_step`` is the largest
    gate displacement of each difference.

    Args:
        model: The model (its sites are gated, then moved along the directions).
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        spec: The terms, their scales and the step.
        generator: Source of the labels and signs.

    Returns:
        The estimate; backpropagate ``surrogate``.

    Raises:
        ValueError: On an unsupported curvature or a forward that uses no site.
    """
    check_curvature("hvp-difference", CURVATURES, spec.curvature)
    loss, step = spec.loss, spec.hvp_step
    with torch.profiler.record_function("dropsplit.hvp_difference.gated_forward"):
        out, ctx = gated_forward(model, forward_fn, batch, loss, spec.grouping, twice=False)
    check_precision("hvp-difference", out.logits.dtype)
    n, gates, qs = out.n, ctx.gates, [site.p for site, _ in ctx.record]
    summed = loss.summed(out.logits, out.targets)
    regularizers = summed.new_zeros(())
    terms, explicit, implicit_value = None, None, None
    if spec.curvature is not None:
        probe = probe_function(spec.curvature, out, loss, generator)
        at_one = probe(out.logits)
        with torch.profiler.record_function("dropsplit.hvp_difference.gate_gradients"):
            grads = [g.detach() for g in site_gradients(at_one, gates, create_graph=False)]
        scale = spec.explicit_scale
        terms = [scale * explicit_penalty(g, q, n) for g, q in zip(grads, qs, strict=True)]
        explicit = torch.stack(terms).sum()
        directions = [
            2 * scale * explicit_coefficient(q) / n * g for g, q in zip(grads, qs, strict=True)
        ]
        with torch.profiler.record_function("dropsplit.hvp_difference.explicit_forward"):
            moved, t = forward_along(model, forward_fn, batch, loss, directions, step)
        regularizers = regularizers + (probe(moved.logits) - at_one) / t
    if spec.implicit:
        scales = [math.sqrt(spec.implicit_scale * noise_variance(q)) / n for q in qs]
        directions = [
            c * sample_rademacher(g.shape, generator, g.dtype, g.device)
            for g, c in zip(gates, scales, strict=True)
        ]
        with torch.profiler.record_function("dropsplit.hvp_difference.implicit_forward"):
            moved, t = forward_along(model, forward_fn, batch, loss, directions, step)
        difference = (loss.summed(moved.logits, moved.targets) - summed) / t
        implicit_value = difference.detach()
        regularizers = regularizers + difference
    return Estimate(
        surrogate=summed / n + regularizers,
        regularizers=regularizers,
        loss=(summed / n).detach(),
        explicit=explicit,
        explicit_terms=terms,
        implicit=implicit_value,
        record=ctx.record,
        aux=out.aux,
    )
