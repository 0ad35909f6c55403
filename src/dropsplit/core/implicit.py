r"""The implicit regularizer: the analytic gradient noise xi_approx (paper Sec. 3.2, Alg. 2).

Linearizing the two-sample difference of dropout losses gives the scalar

.. math::
    S = \frac{1}{N} \sum_{\text{sites}} \sqrt{v} \sum_m r_m \sum_{e \in m} G^y_e h_e,
    \qquad r_m \in \{\pm 1\}, \quad v = \frac{q}{1-q},

with ``G^y`` the gradient of the summed true-label loss. ``xi_approx = grad_W S`` with ``r``
held fixed (both ``G^y`` and ``h`` depend on ``W``). Its covariance is that of the first-order
dropout gradient noise. With Dropout_k the variance is scaled by ``1 - 1/k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dropsplit.core.noise import noise_variance, sample_rademacher
from dropsplit.core.sites import Site


def implicit_scalar(
    label_gradient: torch.Tensor,
    q: float,
    n: int,
    generator: torch.Generator,
    variance_scale: float = 1.0,
) -> torch.Tensor:
    r"""One site's share of ``S``: :math:`\frac{\sqrt{s v}}{N} \sum_m r_m G^y_m`.

    Args:
        label_gradient: ``sum_{e in m} G^y_e h_e`` per group (true-label gate gradient,
            built with ``create_graph=True`` so ``grad_W`` of the result is xi_approx).
        q: The site's drop probability.
        n: Number of targets ``N``.
        generator: Source of the signs ``r``.
        variance_scale: ``s``, multiplies the noise variance (``1 - 1/k`` for Dropout_k).

    Returns:
        The scalar; its gradient with respect to the weights is the noise sample.
    """
    r = sample_rademacher(
        label_gradient.shape, generator, label_gradient.dtype, label_gradient.device
    )
    return math.sqrt(variance_scale * noise_variance(q)) / n * (r * label_gradient).sum()


def implicit_scalar_sum(
    record: Sequence[tuple[Site, torch.Tensor]],
    label_gradients: Sequence[torch.Tensor],
    n: int,
    generator: torch.Generator,
    variance_scale: float = 1.0,
) -> torch.Tensor:
    """The whole scalar ``S`` of xi_approx: :func:`implicit_scalar` summed over the site calls.

    Args:
        record: ``(site, gate)`` per site call of a gated forward.
        label_gradients: True-label gate gradient per site call.
        n: Number of targets ``N``.
        generator: Source of the signs ``r`` (drawn in call order).
        variance_scale: ``s``, multiplies every site's noise variance.

    Returns:
        ``S``; its gradient with respect to the weights is one draw of xi_approx.
    """
    terms = [
        implicit_scalar(g, site.p, n, generator, variance_scale)
        for (site, _), g in zip(record, label_gradients, strict=True)
    ]
    return torch.stack(terms).sum()
