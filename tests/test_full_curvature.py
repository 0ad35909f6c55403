"""explicit_regularizer(curvature="full"): the whole second-order term lambda sum_m d2L/dg_m2 by
Hutchinson, against the gate Hessian computed by brute force (torch.autograd.functional)."""

import math

import pytest
import torch
from conftest import PROBLEMS, make_problem

import dropsplit as ds
from dropsplit.core.forward import call_forward, gated_forward
from dropsplit.core.losses import get_loss
from dropsplit.core.noise import explicit_coefficient
from dropsplit.core.sites import SiteContext, named_sites, site_context

LOSS = get_loss("cross_entropy")


def gate_hessian(pb, grouping):
    """The Hessian of the mean loss in all gates (flattened, in record order), the sites of the
    record and each gate's size."""
    _, ctx = gated_forward(pb.model, pb.forward_fn, pb.batch, LOSS, grouping)
    shapes = [g.shape for g in ctx.gates]
    sizes = [g.numel() for g in ctx.gates]

    def mean_loss_at(flat):
        multipliers = [p.reshape(s) for p, s in zip(flat.split(sizes), shapes, strict=True)]
        with site_context(pb.model, SiteContext("fixed", multipliers=multipliers)):
            out = call_forward(pb.forward_fn, pb.model, pb.batch, LOSS)
        return LOSS.summed(out.logits, out.targets) / out.n

    ones = torch.ones(sum(sizes), dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(mean_loss_at, ones)
    return hessian, [site for site, _ in ctx.record], sizes


def per_site_exact(pb, grouping):
    """Per site name: lambda * the sum of the Hessian diagonal over its gates, and the standard
    deviation of one Hutchinson draw (the off-diagonal entries it picks up)."""
    hessian, sites, sizes = gate_hessian(pb, grouping)
    names = {s: n for n, s in named_sites(pb.model)}
    owner = [names[site] for site, size in zip(sites, sizes, strict=True) for _ in range(size)]
    coefficient = {names[site]: explicit_coefficient(site.p) for site in sites}
    values, sds = {}, {}
    for name, lam in coefficient.items():
        block = torch.tensor([o == name for o in owner])
        inside = hessian[block][:, block]
        off = inside - torch.diag(torch.diagonal(inside))
        across = hessian[block][:, ~block]
        # z_i z_j with both in the site comes twice (H_ij + H_ji), with one outside once
        variance = 2 * float(off.pow(2).sum()) + float(across.pow(2).sum())
        values[name] = lam * float(torch.diagonal(inside).sum())
        sds[name] = lam * math.sqrt(variance)
    return values, sds


@pytest.mark.parametrize("grouping", ["mask", "element"])
@pytest.mark.parametrize("name", PROBLEMS)
def test_hutchinson_matches_the_brute_force_hessian_diagonal(name, grouping):
    pb = make_problem(name)
    exact, sd = per_site_exact(pb, grouping)
    samples = 400
    full = ds.explicit_regularizer(
        pb.model,
        pb.forward_fn,
        pb.batch,
        "full",
        grouping=grouping,
        samples=samples,
        per_site=True,
        seed=0,
    )
    assert full.keys() == exact.keys()
    for site, value in exact.items():
        # mean of 400 draws: within 5 of its standard errors (exact when the Hessian is diagonal)
        assert abs(full[site] - value) <= 5 * sd[site] / math.sqrt(samples) + 1e-10, site


def test_where_the_logits_are_linear_in_the_gate_the_full_term_is_gauss_newton():
    """The hidden site feeds the linear head: d2 logits / dg2 = 0, so the full curvature is
    R_approx's J^T H_out J exactly; at the input site (through tanh) it is not."""
    pb = make_problem("mlp-two-sites")
    exact, _ = per_site_exact(pb, "mask")
    gauss_newton = ds.explicit_regularizer(
        pb.model, pb.forward_fn, pb.batch, "exact", per_site=True
    )
    assert exact["hidden"] == pytest.approx(gauss_newton["hidden"], rel=1e-10)
    assert abs(exact["input"] - gauss_newton["input"]) > 1e-3 * abs(gauss_newton["input"])


def test_the_full_term_predicts_the_gap_at_small_q():
    """At q = 0.01 the gap's second-order term dominates: Monte Carlo and the full prediction
    agree (the Gauss-Newton one need not, where the model's own curvature matters)."""
    pb = make_problem("mlp-two-sites")
    for site in ds.sites(pb.model):
        site.p = 0.01
    full = ds.explicit_regularizer(pb.model, pb.forward_fn, pb.batch, "full", samples=400, seed=1)
    gap = ds.explicit_gap(pb.model, pb.forward_fn, pb.batch, samples=4000, seed=2)
    assert abs(gap.mean - full) < 4 * gap.stderr + 0.05 * abs(full)


def test_the_standard_error_is_that_of_the_hutchinson_draws():
    """full_curvature's error bar against the exact standard deviation of one draw / sqrt(S),
    from the brute-force Hessian; zero where the site's Hessian block is diagonal and alone."""
    pb = make_problem("mlp-two-sites")
    _, sd = per_site_exact(pb, "mask")
    samples = 400
    estimates = ds.full_curvature(pb.model, pb.forward_fn, pb.batch, samples, seed=3)
    for site, estimate in estimates.items():
        assert estimate.stderr == pytest.approx(sd[site] / math.sqrt(samples), rel=0.25), site
    with pytest.raises(ValueError, match="samples must be >= 2"):
        ds.full_curvature(pb.model, pb.forward_fn, pb.batch, 1)
