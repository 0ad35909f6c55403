"""Brute-force exact values for small models, computed independently of the estimators.

Used by the test suite and offered to users who want to check their own (small) models:

* :func:`exact_explicit_regularizer`: ``lambda * R`` from full Jacobians (``torch.func.jacrev``)
  and the output Hessian from ``torch.func.hessian`` of the per-target loss.
* :func:`exact_dropout_loss`: ``E_eta[loss]`` by enumerating every mask configuration.
* :func:`exact_noise_covariance`: the covariance of the dropout gradient noise (enumeration)
  or of xi_approx (``J^T J`` from ``torch.func``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from dropsplit.core.forward import (
    ForwardFn,
    call_forward,
    flat_gradient,
    gated_forward,
    trainable_parameters,
)
from dropsplit.core.losses import Loss, get_loss
from dropsplit.core.noise import explicit_coefficient, noise_variance
from dropsplit.core.sites import (
    SiteContext,
    named_sites,
    require_sites,
    select_sites,
    site_context,
)

MAX_CONFIGURATIONS = 2**16


class _Bound(nn.Module):
    """``forward_fn`` bound to ``model`` so ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch: Any):
        return self.forward_fn(self.model, batch)


def _fixed_forward(model, forward_fn, batch, loss, multipliers, active):
    with site_context(model, SiteContext("fixed", multipliers=multipliers, active=active)):
        return call_forward(forward_fn, model, batch, loss)


def per_target_loss(loss: Loss):
    """``(z[C], y) -> ell(z, y)`` for one target, for ``torch.func`` transforms."""

    def per_target(z, y):
        return loss.summed(z.unsqueeze(0), y.unsqueeze(0))

    return per_target


def output_hessians(logits: torch.Tensor, targets: torch.Tensor, loss: Loss, curvature: str):
    """Per-target ``H`` of shape ``[N, C, C]`` for the curvature kinds, by ``torch.func``.

    Args:
        logits: ``[N, C]``.
        targets: ``[N]`` (or ``[N, D]``).
        loss: Loss family.
        curvature: ``"exact"`` (the loss Hessian), ``"label"`` (``g g^T``) or ``"identity"``.

    Returns:
        ``[N, C, C]``.
    """
    per_target = per_target_loss(loss)
    n, c = logits.shape
    if curvature == "exact":
        return vmap(hessian(per_target))(logits, targets)
    if curvature == "label":
        g = vmap(grad(per_target))(logits, targets)
        return g.unsqueeze(-1) * g.unsqueeze(-2)
    if curvature == "identity":
        eye = torch.eye(c, dtype=logits.dtype, device=logits.device) / c
        return eye.expand(n, c, c)
    raise ValueError(f"curvature must be 'exact', 'label' or 'identity', got {curvature!r}")


def exact_explicit_regularizer(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    curvature: str = "exact",
    *,
    grouping: str = "mask",
    sites: Iterable[str] | None = None,
    loss: str | Loss = "cross_entropy",
) -> dict[str, float]:
    """Exact ``lambda / N * sum_n sum_m J_{n,m}^T H_n J_{n,m}`` per site, by brute force.

    Args:
        model: A small model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        curvature: ``"exact"``, ``"label"`` or ``"identity"``. For ``"label"`` (R-tilde) the
            labels are fixed, so cross-target terms stay: the value is
            ``lambda / N * sum_m (sum_n g_n^T J_{n,m})^2``.
        grouping: ``"mask"`` or ``"element"``.
        sites: Names of the sites to include (default: all).
        loss: Loss family.

    Returns:
        ``{site name: value}``.
    """
    loss = get_loss(loss)
    require_sites(model, "exact_explicit_regularizer")
    active = select_sites(model, sites)
    out, ctx = gated_forward(model, forward_fn, batch, loss, grouping, active)
    ones = tuple(torch.ones_like(g).detach() for g in ctx.gates)

    def logits_of(*multipliers):
        return _fixed_forward(model, forward_fn, batch, loss, multipliers, active).logits

    with torch.no_grad():
        jacobians = jacrev(logits_of, argnums=tuple(range(len(ones))))(*ones)
        h = output_hessians(out.logits.detach(), out.targets, loss, curvature)
    n, c = out.logits.shape
    names = {s: name for name, s in named_sites(model)}
    values: dict[str, float] = {}
    for (site, _), jac in zip(ctx.record, jacobians, strict=True):
        j = jac.reshape(n, c, -1)
        if curvature == "label":
            # fixed labels: cross-target terms do not vanish, R-tilde squares the summed gradient
            g = vmap(grad(per_target_loss(loss)))(out.logits.detach(), out.targets)
            curv = torch.einsum("nc,ncm->m", g, j).pow(2).sum()
        else:
            curv = torch.einsum("ncm,ncd,ndm->", j, h, j)
        value = explicit_coefficient(site.p) / n * curv
        values[names[site]] = values.get(names[site], 0.0) + float(value)
    return values


def _mask_configurations(model, forward_fn, batch, loss, active, max_configurations):
    out, ctx = gated_forward(model, forward_fn, batch, loss, "mask", active)
    shapes = [g.shape for g in ctx.gates]
    qs = [site.p for site, _ in ctx.record]
    bits = sum(g.numel() for g in ctx.gates)
    if 2**bits > max_configurations:
        raise ValueError(
            f"enumeration needs 2**{bits} mask configurations, more than {max_configurations}"
        )
    dtype = out.logits.dtype
    device = out.logits.device
    codes = torch.arange(2**bits, device=device).unsqueeze(1)
    keep = ((codes >> torch.arange(bits, device=device)) & 1).to(dtype)  # [configs, bits]
    q_flat = torch.cat(
        [
            torch.full((s.numel(),), q, dtype=dtype, device=device)
            for s, q in zip(shapes, qs, strict=True)
        ]
    )
    probs = torch.where(keep.bool(), 1 - q_flat, q_flat).prod(dim=1)
    scale = 1 / (1 - q_flat)
    for row, prob in zip(keep, probs, strict=True):
        mult = (row * scale).split([s.numel() for s in shapes])
        yield prob, [m.view(s) for m, s in zip(mult, shapes, strict=True)]


def exact_dropout_loss(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    *,
    sites: Iterable[str] | None = None,
    loss: str | Loss = "cross_entropy",
    max_configurations: int = MAX_CONFIGURATIONS,
) -> float:
    """``E_eta[loss(F(x, eta))]`` exactly, enumerating every joint mask configuration.

    Args:
        model: A tiny model with sites (at most ``log2(max_configurations)`` mask values).
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        sites: Names of the sites that drop (default: all).
        loss: Loss family.
        max_configurations: Refuse larger enumerations.

    Returns:
        The expected dropout loss.
    """
    loss = get_loss(loss)
    require_sites(model, "exact_dropout_loss")
    active = select_sites(model, sites)
    total = 0.0
    with torch.no_grad():
        for prob, mults in _mask_configurations(
            model, forward_fn, batch, loss, active, max_configurations
        ):
            out = _fixed_forward(model, forward_fn, batch, loss, mults, active)
            total += float(prob) * float(loss.summed(out.logits, out.targets) / out.n)
    return total


def clean_loss(model: nn.Module, forward_fn: ForwardFn, batch: Any, loss="cross_entropy") -> float:
    """The loss with every site off."""
    loss = get_loss(loss)
    with torch.no_grad(), site_context(model, SiteContext("off")):
        out = call_forward(forward_fn, model, batch, loss)
        return float(loss.summed(out.logits, out.targets) / out.n)


def exact_noise_covariance(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    kind: str = "dropout",
    *,
    grouping: str = "mask",
    loss: str | Loss = "cross_entropy",
    max_configurations: int = 2**12,
) -> torch.Tensor:
    """Exact covariance ``[n_params, n_params]`` of a gradient noise.

    * ``"dropout"``: ``Cov_eta[grad loss(F(x, eta))]`` by enumerating every mask.
    * ``"analytic"``: ``sum_sites (v / N^2) J^T J`` with ``J = d(sum_{e in m} G^y_e h_e)/dW``
      computed by ``torch.func`` (``grad`` for ``G^y``, ``jacrev`` over the parameters).

    Args:
        model: A tiny model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        kind: ``"dropout"`` or ``"analytic"``.
        grouping: Mask grouping of the analytic noise.
        loss: Loss family.
        max_configurations: Refuse larger enumerations.

    Returns:
        The covariance, flattened over the trainable parameters in ``model.parameters()`` order.
    """
    loss = get_loss(loss)
    require_sites(model, "exact_noise_covariance")
    params = trainable_parameters(model)
    if kind == "dropout":
        mean = torch.zeros(())
        second = torch.zeros(())
        for prob, mults in _mask_configurations(
            model, forward_fn, batch, loss, None, max_configurations
        ):
            out = _fixed_forward(model, forward_fn, batch, loss, mults, None)
            g = flat_gradient(loss.summed(out.logits, out.targets) / out.n, params).detach()
            mean = mean + prob * g
            second = second + prob * torch.outer(g, g)
        return second - torch.outer(mean, mean)
    if kind != "analytic":
        raise ValueError(f"kind must be 'dropout' or 'analytic', got {kind!r}")
    out, ctx = gated_forward(model, forward_fn, batch, loss, grouping, None)
    ones = tuple(torch.ones_like(g).detach() for g in ctx.gates)
    qs = [site.p for site, _ in ctx.record]
    bound = _Bound(model, forward_fn)
    names = [n for n, p in bound.named_parameters() if p.requires_grad]
    values = {n: p.detach() for n, p in bound.named_parameters() if p.requires_grad}

    def label_gradients(theta):
        def summed(*multipliers):
            with site_context(model, SiteContext("fixed", multipliers=multipliers)):
                o = functional_call(bound, theta, (batch,))
            return loss.summed(o[0], o[1])

        return grad(summed, argnums=tuple(range(len(ones))))(*ones)

    jac = jacrev(label_gradients)(values)  # per gate: {param name: [*gate, *param]}
    n = out.n
    rows = []
    for i, q in enumerate(qs):
        per_param = [jac[i][name].reshape(ones[i].numel(), -1) for name in names]
        rows.append((noise_variance(q) ** 0.5 / n) * torch.cat(per_param, dim=1))
    j = torch.cat(rows, dim=0)
    return j.T @ j
