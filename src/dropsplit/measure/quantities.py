"""Measurements of both effects on any model with sites (no gradient step is taken).

* :func:`explicit_gap`: Monte-Carlo ``E_eta[loss_drop] - loss`` with a control variate.
* :func:`explicit_regularizer`: the prediction ``lambda * R_approx`` in the same units (or,
  with ``curvature="full"``, the whole second-order term, model curvature included:
  :func:`full_curvature`, with error bars).
* :func:`gradient_noise`: draws of the dropout, difference or analytic gradient noise.
* :func:`minibatch_noise`: draws of the noise SGD adds without dropout, the scale to judge it by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import nn

from dropsplit.core.buffers import buffer_scope, leaves_buffers
from dropsplit.core.explicit import CURVATURES, explicit_terms, site_gradients
from dropsplit.core.forward import (
    ForwardFn,
    ForwardOutput,
    call_forward,
    flat_gradient,
    gated_forward,
    mean_loss,
    model_device,
    trainable_parameters,
)
from dropsplit.core.implicit import implicit_scalar_sum
from dropsplit.core.losses import Loss, get_loss
from dropsplit.core.noise import explicit_coefficient, sample_rademacher
from dropsplit.core.sites import (
    GROUPINGS,
    Site,
    SiteContext,
    named_sites,
    require_sites,
    select_sites,
    site_context,
)

NOISE_KINDS = ("dropout", "difference", "analytic")
MEASURED_CURVATURES = (*CURVATURES, "full")  # "full": measurement only, no training gradient


class GapEstimate(NamedTuple):
    """A Monte-Carlo estimate with its standard error."""

    mean: float
    stderr: float


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``seed`` (or from the global RNG when ``None``)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator(device=device).manual_seed(seed)


def _positive_int(value: Any, argument: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value}")
    return value


def _gated_sites(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    loss: Loss,
    grouping: str,
    sites: Iterable[str] | None,
    caller: str,
) -> tuple[ForwardOutput, SiteContext, dict[Site, str]]:
    """The checks, the gated forward on the chosen sites, and each site's name."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    require_sites(model, caller)
    out, ctx = gated_forward(model, forward_fn, batch, loss, grouping, select_sites(model, sites))
    return out, ctx, {s: n for n, s in named_sites(model)}


@leaves_buffers
def explicit_gap(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    samples: int = 64,
    *,
    sites: Iterable[str] | None = None,
    control_variate: bool = True,
    seed: int | None = None,
    loss: str | Loss = "cross_entropy",
) -> GapEstimate:
    r"""Monte-Carlo estimate of the explicit effect ``E_eta[loss(F(x, eta))] - loss(F(x))``.

    With ``control_variate`` each draw subtracts the first-order term
    :math:`\sum_m \eta_m \partial L / \partial g_m`, which has mean exactly zero, so the
    estimate is unbiased and its variance comes only from second and higher orders.

    Args:
        model: A model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        samples: Number of mask draws (``>= 2``).
        sites: Names of the sites that drop (default: all); the others are off.
        control_variate: Subtract the zero-mean first-order term.
        seed: Seed of the mask draws.
        loss: Loss family.

    Returns:
        ``(mean, stderr)`` of the gap.
    """
    samples = _positive_int(samples, "samples", 2)
    loss = get_loss(loss)
    require_sites(model, "explicit_gap")
    active = select_sites(model, sites)
    out, ctx = gated_forward(model, forward_fn, batch, loss, "mask", active)
    clean = mean_loss(out, loss)
    firsts = site_gradients(clean, ctx.gates, create_graph=False)
    clean = clean.detach()
    gen = make_generator(seed, model_device(model))
    draws = []
    with torch.no_grad():
        for _ in range(samples):
            with site_context(model, SiteContext("sample", [gen], active=active)) as sctx:
                dropped = mean_loss(call_forward(forward_fn, model, batch, loss), loss)
            draw = dropped - clean
            if control_variate:
                draw = draw - sum(
                    ((m - 1) * g).sum() for m, g in zip(sctx.gates, firsts, strict=True)
                )
            draws.append(draw)
    values = torch.stack(draws).double()
    return GapEstimate(float(values.mean()), float(values.std() / math.sqrt(samples)))


def full_curvature_draws(
    out: ForwardOutput,
    record: Sequence[tuple[Site, torch.Tensor]],
    loss: Loss,
    samples: int,
    generator: torch.Generator,
) -> torch.Tensor:
    r"""The whole second-order term of the explicit effect per recorded gate, by Hutchinson.

    The second-order Taylor expansion of :math:`\mathbb{E}_\eta L(1 + \eta) - L(1)` in the gates
    (independent mask groups, :math:`\operatorname{Var}\eta_m = q/(1-q)`) is

    .. math::
        \lambda \sum_m \frac{\partial^2 L}{\partial g_m^2}, \qquad
        \frac{\partial^2 L}{\partial g_m^2} = J_m^\top H_{out} J_m
            + \sum_c \frac{\partial L}{\partial z_c} \frac{\partial^2 z_c}{\partial g_m^2},

    R_approx (Sec. 3.1) keeping only the first (Gauss-Newton) part. With Rademacher ``z`` over
    all gates, :math:`z_m (H z)_m` has mean :math:`H_{mm}`, so each site's term is the mean over
    ``samples`` draws of :math:`\lambda \sum_{m \in site} z_m (Hz)_m`: one Hessian-vector
    product (a double backward) per draw.

    Args:
        out: A gated forward's output (built so its gates can be differentiated twice).
        record: ``(site, gate)`` per site call of that forward.
        loss: The loss family.
        samples: Hutchinson draws.
        generator: Source of the Rademacher vectors.

    Returns:
        ``[samples, len(record)]`` float64: each draw's value per recorded gate, in the units
        of :func:`explicit_gap` (their mean is the estimate).
    """
    gates = [g for _, g in record]
    coefficients = [explicit_coefficient(site.p) for site, _ in record]
    mean = loss.summed(out.logits, out.targets) / out.n
    firsts = site_gradients(mean, gates, create_graph=True)
    draws = torch.zeros(samples, len(gates), dtype=torch.float64)
    for k in range(samples):
        zs = [sample_rademacher(g.shape, generator, g.dtype, g.device) for g in gates]
        tangent = torch.stack([(f * z).sum() for f, z in zip(firsts, zs, strict=True)]).sum()
        hz = site_gradients(tangent, gates, create_graph=False)
        for i, (c, z, h) in enumerate(zip(coefficients, zs, hz, strict=True)):
            draws[k, i] = c * float((z * h).sum())
    return draws


@leaves_buffers
def full_curvature(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    samples: int = 16,
    *,
    grouping: str = "mask",
    sites: Iterable[str] | None = None,
    seed: int | None = None,
    loss: str | Loss = "cross_entropy",
) -> dict[str, GapEstimate]:
    """The whole second-order explicit term per site, with its Hutchinson standard error.

    :func:`full_curvature_draws` on one batch, the draws of each site's calls summed per draw.
    ``explicit_regularizer(..., "full")`` gives the means; this adds the error bars.

    Args:
        model: A model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        samples: Hutchinson draws (``>= 2``).
        grouping: ``"mask"`` or ``"element"``.
        sites: Names of the sites to include (default: all).
        seed: Seed of the Rademacher draws.
        loss: Loss family.

    Returns:
        ``{site name: (mean, stderr)}``.
    """
    samples = _positive_int(samples, "samples", 2)
    loss = get_loss(loss)
    out, ctx, names = _gated_sites(
        model, forward_fn, batch, loss, grouping, sites, "full_curvature"
    )
    gen = make_generator(seed, model_device(model))
    draws = full_curvature_draws(out, ctx.record, loss, samples, gen)
    per_name: dict[str, torch.Tensor] = {}
    for i, (site, _) in enumerate(ctx.record):
        name = names[site]
        per_name[name] = per_name.get(name, torch.zeros(samples, dtype=torch.float64)) + draws[:, i]
    return {
        name: GapEstimate(float(v.mean()), float(v.std() / math.sqrt(samples)))
        for name, v in per_name.items()
    }


@overload
def explicit_regularizer(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    curvature: str = ...,
    *,
    grouping: str = ...,
    samples: int = ...,
    sites: Iterable[str] | None = ...,
    per_site: Literal[False] = ...,
    seed: int | None = ...,
    loss: str | Loss = ...,
) -> float: ...


@overload
def explicit_regularizer(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    curvature: str = ...,
    *,
    grouping: str = ...,
    samples: int = ...,
    sites: Iterable[str] | None = ...,
    per_site: Literal[True],
    seed: int | None = ...,
    loss: str | Loss = ...,
) -> dict[str, float]: ...


def explicit_regularizer(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    curvature: str = "exact",
    *,
    grouping: str = "mask",
    samples: int = 1,
    sites: Iterable[str] | None = None,
    per_site: bool = False,
    seed: int | None = None,
    loss: str | Loss = "cross_entropy",
) -> float | dict[str, float]:
    """The predicted explicit effect ``sum_sites lambda * R`` in the units of the gap.

    Args:
        model: A model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        curvature: ``"exact"`` (full ``H_out``), ``"sampled"`` (mean of ``samples`` one-label
            estimates), ``"label"`` (R-tilde), ``"identity"`` (``H_out = I / C``), or
            ``"full"``: not R_approx but the whole second-order term, the model's own curvature
            included (:func:`full_curvature`, ``samples >= 2`` Hutchinson draws).
        grouping: ``"mask"`` (the site's real mask groups) or ``"element"``.
        samples: Draws averaged for the random curvatures.
        sites: Names of the sites to include (default: all).
        per_site: Return ``{site name: value}`` instead of the total.
        seed: Seed of the label or probe draws.
        loss: Loss family.

    Returns:
        The total, or the value per site.
    """
    if curvature not in MEASURED_CURVATURES:
        raise ValueError(f"curvature must be one of {MEASURED_CURVATURES}, got {curvature!r}")
    if curvature == "full":
        estimates = full_curvature(
            model, forward_fn, batch, samples, grouping=grouping, sites=sites, seed=seed, loss=loss
        )
        full = {name: estimate.mean for name, estimate in estimates.items()}
        return full if per_site else sum(full.values())
    samples = _positive_int(samples, "samples")
    loss = get_loss(loss)
    caller = "explicit_regularizer"
    with buffer_scope(model, keep_first_pass=False):  # the measurement moves no statistics
        out, ctx, names = _gated_sites(model, forward_fn, batch, loss, grouping, sites, caller)
    gen = make_generator(seed, model_device(model))
    draws = 1 if curvature in ("exact", "label") else samples
    totals: dict[str, float] = {}
    for _ in range(draws):
        terms = explicit_terms(out, ctx.record, loss, curvature, gen, create_graph=False)
        for (site, _), term in zip(ctx.record, terms, strict=True):
            totals[names[site]] = totals.get(names[site], 0.0) + float(term) / draws
    if per_site:
        return totals
    return sum(totals.values())


@leaves_buffers
def gradient_noise(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    kind: str = "dropout",
    samples: int = 32,
    *,
    grouping: str = "mask",
    seed: int | None = None,
    loss: str | Loss = "cross_entropy",
) -> torch.Tensor:
    """Draws of the gradient noise of one batch, flattened over the trainable parameters.

    * ``"dropout"``: dropout gradients centred on their sample mean and scaled by
      ``sqrt(S / (S - 1))``, so that ``X^T X / S`` is unbiased for the covariance.
    * ``"difference"``: ``(grad loss(a) - grad loss(b)) / sqrt(2)`` (Sec. 3.1, zero mean).
    * ``"analytic"``: xi_approx ``= grad_W S`` with fresh signs per draw (Sec. 3.2).

    Args:
        model: A model with sites.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        kind: ``"dropout"``, ``"difference"`` or ``"analytic"``.
        samples: Number of draws.
        grouping: Mask grouping of the analytic noise.
        seed: Seed of the draws.
        loss: Loss family.

    Returns:
        ``Tensor[samples, n_params]`` of mean-zero noise draws.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    samples = _positive_int(samples, "samples", 2 if kind == "dropout" else 1)
    loss = get_loss(loss)
    require_sites(model, "gradient_noise")
    params = trainable_parameters(model)
    gen = make_generator(seed, model_device(model))

    def dropout_grad() -> torch.Tensor:
        with site_context(model, SiteContext("sample", [gen])):
            out = call_forward(forward_fn, model, batch, loss)
        return flat_gradient(mean_loss(out, loss), params)

    if kind == "dropout":
        draws = torch.stack([dropout_grad() for _ in range(samples)])
        return (draws - draws.mean(0)) * math.sqrt(samples / (samples - 1))
    if kind == "difference":
        return torch.stack(
            [(dropout_grad() - dropout_grad()) / math.sqrt(2.0) for _ in range(samples)]
        )
    out, ctx = gated_forward(model, forward_fn, batch, loss, grouping)
    grads = site_gradients(loss.summed(out.logits, out.targets), ctx.gates, create_graph=True)
    return torch.stack(
        [
            flat_gradient(implicit_scalar_sum(ctx.record, grads, out.n, gen), params, True)
            for _ in range(samples)
        ]
    )


@leaves_buffers
def minibatch_noise(
    model: nn.Module,
    forward_fn: ForwardFn,
    batches: Sequence[Any],
    *,
    loss: str | Loss = "cross_entropy",
) -> torch.Tensor:
    """Draws of the minibatch gradient noise: each batch's clean gradient about their mean.

    ``(g_b - mean_c g_c) * sqrt(B / (B - 1))`` for the ``B`` batches, with ``g_b`` the gradient of
    the mean loss of batch ``b`` with every site off, so that ``X^T X / B`` is unbiased for the
    covariance of one batch's clean gradient: the noise plain SGD has at that batch size, the
    scale against which dropout's own noise (:func:`gradient_noise`) is small or large.

    Args:
        model: The model (sites are switched off).
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batches: At least two batches of the same size, ideally disjoint text.
        loss: Loss family.

    Returns:
        ``Tensor[B, n_params]`` of mean-zero draws.
    """
    if len(batches) < 2:
        raise ValueError(f"minibatch_noise needs at least 2 batches, got {len(batches)}")
    loss = get_loss(loss)
    params = trainable_parameters(model)
    grads = []
    for batch in batches:
        with site_context(model, SiteContext("off")):
            out = call_forward(forward_fn, model, batch, loss)
        grads.append(flat_gradient(mean_loss(out, loss), params))
    draws = torch.stack(grads)
    return (draws - draws.mean(0)) * math.sqrt(len(batches) / (len(batches) - 1))
