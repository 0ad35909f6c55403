"""The explicit regularizer against exact oracles, the true dropout gap, and a closed form."""

import math

import pytest
import torch
from conftest import PROBLEMS, HeadMLP, LinearRNN, locked_forward, make_problem, mlp_forward
from torch import nn

import dropsplit as ds
from dropsplit import oracles

CURVATURES = ["exact", "label", "identity"]


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("grouping", ["mask", "element"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_deterministic_curvatures_match_the_brute_force_oracle(name, grouping, curvature):
    pb = make_problem(name)
    ours = (
        ds.explicit_regularizer(
            pb.model,
            pb.forward_fn,
            pb.batch,
            curvature if curvature != "identity" else "exact",
            grouping=grouping,
            per_site=True,
        )
        if curvature != "identity"
        else None
    )
    oracle = oracles.exact_explicit_regularizer(
        pb.model, pb.forward_fn, pb.batch, curvature, grouping=grouping
    )
    if curvature == "identity":
        # the identity curvature is only estimated (Rademacher probes): checked below
        return
    if curvature == "label":
        ours = ds.explicit_regularizer(
            pb.model, pb.forward_fn, pb.batch, "label", grouping=grouping, per_site=True
        )
    assert ours.keys() == oracle.keys()
    for site in ours:
        assert ours[site] == pytest.approx(oracle[site], rel=1e-10, abs=1e-14)


def _mc_check(pb, curvature, samples, sigmas, seed=0):
    """Mean of `samples` one-draw estimates is within `sigmas` standard errors of the oracle."""
    exact = sum(
        oracles.exact_explicit_regularizer(pb.model, pb.forward_fn, pb.batch, curvature).values()
    )
    draws = torch.tensor(
        [
            ds.explicit_regularizer(
                pb.model,
                pb.forward_fn,
                pb.batch,
                "sampled" if curvature == "exact" else curvature,
                seed=seed + i,
            )
            for i in range(samples)
        ]
    )
    stderr = draws.std().item() / math.sqrt(samples)
    assert abs(draws.mean().item() - exact) < sigmas * stderr, (draws.mean().item(), exact, stderr)
    return draws.mean().item(), exact, stderr


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("curvature", ["exact", "identity"], ids=["sampled-label", "identity"])
def test_sampled_estimators_are_unbiased_fast(name, curvature):
    _mc_check(make_problem(name), curvature, samples=300, sigmas=4.5)


@pytest.mark.montecarlo
@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("curvature", ["exact", "identity"], ids=["sampled-label", "identity"])
def test_sampled_estimators_are_unbiased_slow(name, curvature):
    mean, exact, stderr = _mc_check(make_problem(name), curvature, samples=20_000, sigmas=4.5)
    assert stderr < 0.01 * exact  # the slow tier pins the mean to 1 percent or better


def test_sampled_labels_have_the_output_hessian_as_covariance():
    """E[(p - e_y)(p - e_y)^T] = diag(p) - pp^T, checked by enumerating all labels."""
    loss = ds.CrossEntropy()
    logits = torch.randn(3, 5)
    p = torch.softmax(logits, -1)
    brute = sum(
        p[:, c, None, None]
        * torch.einsum(
            "ni,nj->nij",
            p - nn.functional.one_hot(torch.tensor(c), 5),
            p - nn.functional.one_hot(torch.tensor(c), 5),
        )
        for c in range(5)
    )
    assert torch.allclose(brute, loss.hessian(logits))
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([loss.sample_targets(logits, g) for _ in range(40_000)])
    freq = torch.stack([(labels == c).double().mean(0) for c in range(5)], -1)
    assert torch.allclose(freq, p, atol=0.01)


def _gap_and_prediction(q, seed=0, d=12, classes=5, n=1):
    torch.manual_seed(seed)
    model = HeadMLP(d_in=3, d_hidden=d, classes=classes, p_hidden=q)
    batch = (torch.randn(n, 3), torch.randint(0, classes, (n,)))
    gap = oracles.exact_dropout_loss(model, mlp_forward, batch) - oracles.clean_loss(
        model, mlp_forward, batch
    )
    pred = ds.explicit_regularizer(model, mlp_forward, batch, "exact")
    return gap, pred


@pytest.mark.parametrize("q", [0.02, 0.05], ids=lambda q: f"q={q}")
def test_taylor_gap_before_a_linear_head(q):
    """Dropout just before a linear head: the exact gap (all 2^12 masks) is lambda * R."""
    for seed in range(3):
        gap, pred = _gap_and_prediction(q, seed)
        print(f"q={q} seed {seed}: gap / lambda R = {gap / pred:.4f}")
        assert gap / pred == pytest.approx(1.0, abs=0.03), (seed, gap / pred)


def test_taylor_ratio_at_q_04_is_reported():
    """At q = 0.4 the second-order expansion is no longer accurate: report the ratio."""
    ratios = [(lambda gp: gp[0] / gp[1])(_gap_and_prediction(0.4, seed)) for seed in range(3)]
    print(f"gap / lambda R at q=0.4: {[round(r, 4) for r in ratios]}")
    assert all(0.75 < r < 1.25 for r in ratios)


class LinearRegression(nn.Module):
    def __init__(self, d, q):
        super().__init__()
        self.input_dropout = ds.Dropout(q)
        self.w = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        return self.w(self.input_dropout(x))


@pytest.mark.parametrize("q", [0.1, 0.5], ids=lambda q: f"q={q}")
def test_linear_regression_with_input_dropout_closed_form(q):
    """Squared loss: the gap is exactly q/(2(1-q)) * mean_n sum_j w_j^2 x_nj^2."""
    torch.manual_seed(0)
    d, n = 6, 8
    model = LinearRegression(d, q)
    x, y = torch.randn(n, d), torch.randn(n, 1)
    closed = q / (2 * (1 - q)) * (model.w.weight[0] ** 2 * x**2).sum(1).mean().item()
    batch = (x, y)
    kw = dict(loss="squared_error")
    assert ds.explicit_regularizer(model, mlp_forward, batch, "exact", **kw) == pytest.approx(
        closed, rel=1e-12
    )
    sampled = ds.explicit_regularizer(
        model, mlp_forward, batch, "sampled", samples=4000, seed=1, **kw
    )
    assert sampled == pytest.approx(closed, rel=0.05)
    gap = ds.explicit_gap(model, mlp_forward, batch, samples=4000, seed=2, **kw)
    assert abs(gap.mean - closed) < 4 * gap.stderr
    small = LinearRegression(3, q)
    small_batch = (torch.randn(2, 3), torch.randn(2, 1))
    closed_small = q / (2 * (1 - q)) * (small.w.weight[0] ** 2 * small_batch[0] ** 2).sum(1).mean()
    exact_gap = oracles.exact_dropout_loss(
        small, mlp_forward, small_batch, **kw
    ) - oracles.clean_loss(small, mlp_forward, small_batch, **kw)
    assert exact_gap == pytest.approx(closed_small.item(), rel=1e-10)


def test_control_variate_keeps_the_mean_and_shrinks_the_error():
    torch.manual_seed(0)
    model = HeadMLP(d_in=3, d_hidden=4, classes=3, p_input=0.3, p_hidden=0.2)
    batch = (torch.randn(2, 3), torch.randint(0, 3, (2,)))  # 14 mask bits: enumerable
    exact = oracles.exact_dropout_loss(model, mlp_forward, batch) - oracles.clean_loss(
        model, mlp_forward, batch
    )
    with_cv = ds.explicit_gap(model, mlp_forward, batch, samples=3000, seed=0)
    without = ds.explicit_gap(
        model, mlp_forward, batch, samples=3000, seed=0, control_variate=False
    )
    for est in (with_cv, without):
        assert abs(est.mean - exact) < 4.5 * est.stderr
    assert with_cv.stderr < 0.5 * without.stderr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_grouping_predicts_the_locked_dropout_gap(seed):
    """Locked dropout on an RNN input: the grouped prediction matches the exact gap (all 2^6
    masks) and a Monte-Carlo gap; squaring per element drops the cross-time terms."""
    q = 0.05
    torch.manual_seed(seed)
    model = LinearRNN(q)
    x = torch.randn(1, 2, 3).expand(6, 2, 3) + 0.3 * torch.randn(6, 2, 3)  # slowly varying
    batch = (x, torch.randint(0, 4, (6, 2)))
    gap = oracles.exact_dropout_loss(model, locked_forward, batch) - oracles.clean_loss(
        model, locked_forward, batch
    )
    mc = ds.explicit_gap(model, locked_forward, batch, samples=2000, seed=seed)
    grouped = ds.explicit_regularizer(model, locked_forward, batch, "exact", grouping="mask")
    element = ds.explicit_regularizer(model, locked_forward, batch, "exact", grouping="element")
    print(
        f"seed {seed}: gap {gap:.5f} MC {mc.mean:.5f}+-{mc.stderr:.5f} "
        f"mask {grouped:.5f} ({gap / grouped:.3f}) element {element:.5f} ({gap / element:.3f})"
    )
    assert abs(mc.mean - gap) < 4.5 * mc.stderr
    assert gap / grouped == pytest.approx(1.0, abs=0.05)
    assert gap / element > 1.5  # the per-element form misses most of the effect


@pytest.mark.parametrize("name", PROBLEMS)
def test_joint_site_gradients_equal_separate_backward_passes(name):
    """One batched backward gives the gradients (and their derivatives) of two backward passes."""
    from dropsplit.core.explicit import joint_site_gradients, site_gradients
    from dropsplit.core.forward import gated_forward
    from dropsplit.core.losses import get_loss

    pb = make_problem(name)
    loss = get_loss("cross_entropy")
    params = [p for p in pb.model.parameters() if p.requires_grad]
    out, ctx = gated_forward(pb.model, pb.forward_fn, pb.batch, loss, "mask")
    gen = torch.Generator().manual_seed(0)
    scalars = [
        loss.summed(out.logits, out.targets),
        loss.summed(out.logits, loss.sample_targets(out.logits, gen)),
    ]
    joint = joint_site_gradients(scalars, out.logits, ctx.gates, create_graph=True)
    separate = [site_gradients(s, ctx.gates, create_graph=True) for s in scalars]
    weights = torch.linspace(-1.0, 2.0, 2)
    for j, s in zip(joint, separate, strict=True):
        for a, b in zip(j, s, strict=True):
            torch.testing.assert_close(a, b)

    def second(grads):
        value = sum(
            w * sum(g.pow(2).sum() for g in gs) for w, gs in zip(weights, grads, strict=True)
        )
        return torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)

    for a, b in zip(second(joint), second(separate), strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)
