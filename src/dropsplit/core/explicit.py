r"""The explicit regularizer R_approx under the mask grouping rule (paper Sec. 3.1).

For a site with drop probability ``q``, coefficient :math:`\lambda = q/(2(1-q))` and mask
groups ``m`` (elements of the site tensor ``h`` that share one mask value),

.. math::
    \lambda R = \lambda \frac{1}{N} \sum_m \mathbb{E}_{\hat y}
        \Big(\sum_{e \in m} G_e h_e\Big)^2
    = \lambda \frac{1}{N} \sum_n \sum_m J_{n,m}^\top H_{out,n} J_{n,m},

where ``G`` is the gradient of the *summed* loss at labels drawn from the model and
``J_{n,m}`` is the Jacobian of the logits of target ``n`` with respect to the gate of group
``m``. The gradient of a loss with respect to a site's gate is exactly ``sum_{e in m} G_e h_e``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from dropsplit.core.forward import ForwardOutput
from dropsplit.core.losses import Loss
from dropsplit.core.noise import explicit_coefficient, sample_rademacher
from dropsplit.core.sites import Site

CURVATURES = ("sampled", "exact", "label", "identity")
MAX_EXACT_JACOBIAN_ROWS = 50_000


def site_gradients(
    scalar: torch.Tensor, gates: Sequence[torch.Tensor], create_graph: bool
) -> list[torch.Tensor]:
    """Gradients of ``scalar`` with respect to the gates, zeros for gates it does not reach.

    Args:
        scalar: A summed loss (or probe) built on a gated forward.
        gates: The gates recorded by that forward.
        create_graph: Keep the graph so the result can be differentiated again.

    Returns:
        ``[sum_{e in m} G_e h_e]`` per gate, each of the gate's shape.
    """
    grads = torch.autograd.grad(
        scalar, list(gates), create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(g) if d is None else d for g, d in zip(gates, grads, strict=True)]


def logit_vjps(
    logits: torch.Tensor,
    gates: Sequence[torch.Tensor],
    cotangents: torch.Tensor,
    create_graph: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``cotangents[i]^T d logits / d gate`` for every ``i`` and gate, in one batched backward.

    Args:
        logits: The gated forward's ``[N, C]`` outputs.
        gates: The gates recorded by that forward.
        cotangents: ``[K, N, C]``, one cotangent of the logits per row.
        create_graph: Keep the graph so the results can be differentiated again.

    Returns:
        Per gate, ``[K, *gate.shape]`` (``None`` for a gate the logits do not depend on).
    """
    return torch.autograd.grad(
        logits,
        list(gates),
        grad_outputs=cotangents,
        is_grads_batched=True,
        create_graph=create_graph,
        retain_graph=True,
        allow_unused=True,
    )


def joint_site_gradients(
    scalars: Sequence[torch.Tensor],
    logits: torch.Tensor,
    gates: Sequence[torch.Tensor],
    create_graph: bool,
) -> list[list[torch.Tensor]]:
    """:func:`site_gradients` of several losses of the same logits in one batched backward.

    Each scalar's gradient with respect to the logits is cheap (it only crosses the loss); the
    expensive backward from the logits through the model to the gates is then taken once for
    all of them (``is_grads_batched``). With ``create_graph`` the logit gradients keep their
    own graph, so differentiating the result again is exact.

    Args:
        scalars: Losses (or probes) computed from ``logits``.
        logits: The gated forward's ``[N, C]`` outputs.
        gates: The gates recorded by that forward.
        create_graph: Keep the graph so the results can be differentiated again.

    Returns:
        Per scalar, the gradient per gate (zeros for gates it does not reach).
    """
    cotangents = torch.stack(
        [
            torch.autograd.grad(s, logits, create_graph=create_graph, retain_graph=True)[0]
            for s in scalars
        ]
    )
    grads = logit_vjps(logits, gates, cotangents, create_graph)
    return [
        [torch.zeros_like(g) if d is None else d[i] for g, d in zip(gates, grads, strict=True)]
        for i in range(len(scalars))
    ]


def probe_function(
    curvature: str, out: ForwardOutput, loss: Loss, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The probe of :func:`curvature_probe` as a function of the logits, its draws fixed.

    Evaluating it at the logits of another forward (the same targets) gives the same probe
    there: the labels drawn for ``"sampled"`` and the ``u`` of ``"identity"`` are drawn once,
    here, from ``out``'s logits.

    Args:
        curvature: ``"sampled"``, ``"label"`` or ``"identity"``.
        out: The gated forward's output.
        loss: The loss family.
        generator: Source of randomness for labels or probes.

    Returns:
        ``logits -> probe scalar``.
    """
    if curvature == "sampled":
        targets = loss.sample_targets(out.logits, generator)
        return lambda logits: loss.summed(logits, targets)
    if curvature == "label":
        return lambda logits: loss.summed(logits, out.targets)
    if curvature == "identity":
        u = sample_rademacher(out.logits.shape, generator, out.logits.dtype, out.logits.device)
        return lambda logits: (u * logits).sum() / math.sqrt(logits.shape[1])
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")


def curvature_probe(
    curvature: str, out: ForwardOutput, loss: Loss, generator: torch.Generator
) -> torch.Tensor:
    r"""A scalar whose gate gradient ``G`` has :math:`\mathbb{E}[G G^\top] = J^\top H J`.

    * ``"sampled"``: the summed loss at labels drawn from the model, ``H = H_out``.
    * ``"label"``: the summed loss at the true labels, ``H = g g^T`` (R-tilde, Sec. 5.2).
    * ``"identity"``: ``<u, F> / sqrt(C)`` with Rademacher ``u``, ``H = I / C`` (the
      original code's scaling of the identity ablation, Sec. 5.2).

    Args:
        curvature: ``"sampled"``, ``"label"`` or ``"identity"``.
        out: The gated forward's output.
        loss: The loss family.
        generator: Source of randomness for labels or probes.

    Returns:
        The probe scalar.
    """
    return probe_function(curvature, out, loss, generator)(out.logits)


def explicit_penalty(site_gradient: torch.Tensor, q: float, n: int) -> torch.Tensor:
    r"""One site's explicit term :math:`\lambda \frac1N \sum_m G_m^2` (one-sample estimator).

    Args:
        site_gradient: ``sum_{e in m} G_e h_e`` per group (the gate gradient of a probe).
        q: The site's drop probability.
        n: Number of targets ``N``.

    Returns:
        The scalar penalty.
    """
    return explicit_coefficient(q) / n * site_gradient.pow(2).sum()


def exact_gauss_newton(
    out: ForwardOutput, gates: Sequence[torch.Tensor], loss: Loss, create_graph: bool
) -> list[torch.Tensor]:
    r"""Exact :math:`\sum_n \sum_m J_{n,m}^\top H_{out,n} J_{n,m}` per gate (small ``N C``).

    The Jacobian of the ``N x C`` logits with respect to each gate comes from one batched
    backward pass over the ``N C`` basis vectors.

    Args:
        out: The gated forward's output.
        gates: The gates recorded by that forward.
        loss: The loss family (provides ``H_out``).
        create_graph: Keep the graph so the result can be differentiated again.

    Returns:
        The curvature sum per gate.

    Raises:
        ValueError: If ``N * C`` is too large for an exact Jacobian.
    """
    n, c = out.logits.shape
    if n * c > MAX_EXACT_JACOBIAN_ROWS:
        raise ValueError(
            f"curvature='exact' needs N*C = {n * c} backward passes (limit "
            f"{MAX_EXACT_JACOBIAN_ROWS}); use curvature='sampled' for large outputs"
        )
    eye = torch.eye(n * c, dtype=out.logits.dtype, device=out.logits.device).view(n * c, n, c)
    jacobians = logit_vjps(out.logits, gates, eye, create_graph)
    hessian = loss.hessian(out.logits)
    if not create_graph:
        hessian = hessian.detach()
    values = []
    for gate, jac in zip(gates, jacobians, strict=True):
        if jac is None:
            values.append(gate.new_zeros(()))
            continue
        j = jac.reshape(n, c, -1)
        values.append(torch.einsum("ncm,ncd,ndm->", j, hessian, j))
    return values


def explicit_terms(
    out: ForwardOutput,
    record: Sequence[tuple[Site, torch.Tensor]],
    loss: Loss,
    curvature: str,
    generator: torch.Generator,
    create_graph: bool,
    label_gradients: Sequence[torch.Tensor] | None = None,
    probe_gradients: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The explicit regularizer ``lambda * R`` of each recorded gate.

    Args:
        out: The gated forward's output.
        record: ``(site, gate)`` per site call of that forward.
        loss: The loss family.
        curvature: One of :data:`CURVATURES`.
        generator: Source of randomness for ``"sampled"`` and ``"identity"``.
        create_graph: Keep the graph so the result can be differentiated again.
        label_gradients: True-label gate gradients, reused for ``"label"`` when given.
        probe_gradients: Gate gradients of this curvature's probe, when already computed
            (drawn from ``generator`` by :func:`curvature_probe`).

    Returns:
        One scalar per recorded gate.
    """
    gates = [g for _, g in record]
    qs = [site.p for site, _ in record]
    if curvature == "exact":
        curv = exact_gauss_newton(out, gates, loss, create_graph)
        return [explicit_coefficient(q) / out.n * c for q, c in zip(qs, curv, strict=True)]
    if curvature == "label" and label_gradients is not None:
        grads = list(label_gradients)
    elif probe_gradients is not None:
        grads = list(probe_gradients)
    else:
        probe = curvature_probe(curvature, out, loss, generator)
        grads = site_gradients(probe, gates, create_graph)
    return [explicit_penalty(g, q, out.n) for g, q in zip(grads, qs, strict=True)]
