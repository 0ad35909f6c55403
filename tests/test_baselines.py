"""R-Drop and fraternal dropout: the penalties, the step, and their link to the paper's lambda R.

The link (see :mod:`dropsplit.baselines`): to second order in the noise, E[R-Drop penalty] =
2 alpha lambda R with the exact output curvature and E[fraternal penalty] = 4 kappa lambda R with
the identity curvature. The prediction comes from the brute-force oracle
(:func:`dropsplit.oracles.exact_explicit_regularizer`), the penalty from many mask pairs of the
method itself; the models' logits are linear in the dropped gates, so only the output side (the
KL's quadratic approximation) is approximate.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import HeadMLP, LinearRNN, locked_forward, make_problem, mlp_forward
from torch import nn

import dropsplit as ds
from dropsplit import oracles
from dropsplit.baselines import PENALTY_CURVATURE, PENALTY_MULTIPLE


class WeightHead(nn.Module):
    """tanh layer, then a linear head whose weight is a DropConnect site."""

    def __init__(self, q, d_in=3, hidden=8, classes=5):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.head = ds.DropConnect(nn.Linear(hidden, classes), "weight", q, label="head.weight")

    def forward(self, x):
        return self.head(torch.tanh(self.l1(x)))


def site_problem(kind, q, seed=0):
    """A model whose logits are linear in the gates of one site of the given kind, and a batch."""
    torch.manual_seed(seed)
    if kind == "elementwise":
        model = HeadMLP(d_in=3, d_hidden=12, classes=5, p_hidden=q)
        return model, mlp_forward, (torch.randn(4, 3), torch.randint(0, 5, (4,)))
    if kind == "locked":
        model = LinearRNN(q, d_in=4)
        x = 0.3 * torch.randn(1, 8, 4).expand(6, 8, 4) + 0.1 * torch.randn(6, 8, 4)
        return model, locked_forward, (x, torch.randint(0, 4, (6, 8)))
    model = WeightHead(q)
    return model, mlp_forward, (torch.randn(4, 3), torch.randint(0, 5, (4,)))


METHODS = {"rdrop": ds.RDrop, "fraternal": ds.Fraternal}


def penalty_ratio(kind, method, q, pairs, seed=0):
    """Monte-Carlo mean of the penalty at the matching strength over the oracle's lambda R."""
    model, forward_fn, batch = site_problem(kind, q, seed)
    m = METHODS[method](ds.matching_strength(method), seed=seed + 1)
    predicted = sum(
        oracles.exact_explicit_regularizer(
            model, forward_fn, batch, PENALTY_CURVATURE[method]
        ).values()
    )
    with torch.no_grad():
        draws = torch.stack(
            [
                m.strength * m.penalty(*(o.logits for o in m.passes(model, forward_fn, batch)))
                for _ in range(pairs)
            ]
        )
    return float(draws.mean()) / predicted, float(draws.std()) / pairs**0.5 / predicted


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["elementwise", "locked", "weight"])
def test_expected_penalty_is_the_predicted_multiple_fast(kind, method):
    ratio, stderr = penalty_ratio(kind, method, q=0.05, pairs=3000)
    print(f"{kind} {method} q=0.05: E[penalty] / (multiple strength lambda R) = {ratio:.4f}")
    assert abs(ratio - 1) < 4 * stderr + 0.02, (ratio, stderr)
    assert abs(ratio - 1) < 0.08, (ratio, stderr)


@pytest.mark.montecarlo
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["elementwise", "locked", "weight"])
def test_expected_penalty_is_the_predicted_multiple_slow(kind, method):
    ratio, stderr = penalty_ratio(kind, method, q=0.05, pairs=40_000)
    print(f"{kind} {method} q=0.05: ratio {ratio:.4f} +- {stderr:.4f}")
    assert abs(ratio - 1) < 0.03, (ratio, stderr)


@pytest.mark.parametrize("method", METHODS)
def test_penalty_ratio_at_q_04_is_reported(method):
    """At q = 0.4 a dropped unit is a large jump; the ratio is reported, loosely bounded."""
    for kind in ("elementwise", "locked", "weight"):
        ratio, stderr = penalty_ratio(kind, method, q=0.4, pairs=1500)
        print(f"{kind} {method} q=0.4: ratio {ratio:.3f} +- {stderr:.3f}")
        assert 0.7 < ratio < 1.3


def test_matching_strength():
    assert ds.matching_strength("rdrop") == 0.5 and ds.matching_strength("fraternal") == 0.25
    assert ds.matching_strength("rdrop", 3.0) == 3.0 / PENALTY_MULTIPLE["rdrop"]
    with pytest.raises(ValueError, match="method must be one of"):
        ds.matching_strength("dropout")
    with pytest.raises(ValueError, match="non-negative"):
        ds.matching_strength("rdrop", -1.0)


def test_penalties_equal_torch_formulas():
    """The penalties against torch's own KL and MSE, written independently."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(7, 5), torch.randn(7, 5)
    p1, p2 = z1.log_softmax(-1), z2.log_softmax(-1)
    kl12 = F.kl_div(p2, p1, log_target=True, reduction="batchmean")  # KL(p1 || p2)
    kl21 = F.kl_div(p1, p2, log_target=True, reduction="batchmean")
    # without the strength factor, as stats["penalty"] reports it (the API's convention)
    torch.testing.assert_close(ds.RDrop(0.7).penalty(z1, z2), (kl12 + kl21) / 2)
    torch.testing.assert_close(ds.Fraternal(0.3).penalty(z1, z2), F.mse_loss(z1, z2))


@pytest.mark.parametrize("method", ["rdrop", "fraternal"])
@pytest.mark.parametrize("name", ["mlp-two-sites", "rnn-locked"])
def test_step_is_the_gradient_of_the_two_pass_objective(name, method):
    """The step's gradient equals autograd of (CE1 + CE2) / 2 + strength * penalty with the same
    masks; stats["penalty"] is the penalty without its factor."""
    pb = make_problem(name)
    make = lambda: METHODS[method](0.8, seed=3)  # noqa: E731
    pb.model.zero_grad(set_to_none=True)
    result = make().step(pb.model, pb.forward_fn, pb.batch)
    replay = make()
    first, second = replay.passes(pb.model, pb.forward_fn, pb.batch)
    ce = (
        F.cross_entropy(first.logits, first.targets)
        + F.cross_entropy(second.logits, second.targets)
    ) / 2
    penalty = replay.penalty(first.logits, second.logits)
    params = [p for p in pb.model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(ce + 0.8 * penalty, params)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert result.stats["penalty"] == pytest.approx(float(penalty.detach()))
    assert result.stats["loss"] == pytest.approx(float(ce.detach()))
    assert result.stats["objective"] == pytest.approx(float((ce + 0.8 * penalty).detach()))


@pytest.mark.parametrize("method", ["rdrop", "fraternal"])
def test_zero_strength_is_dropout_2(method):
    """With no penalty, the mean of the two dropout losses is Dropout_2 with the same draws."""
    pb = make_problem("rnn-locked")
    pb.model.zero_grad(set_to_none=True)
    METHODS[method](0.0, seed=5).step(pb.model, pb.forward_fn, pb.batch)
    ours = [p.grad.clone() for p in pb.model.parameters()]
    pb.model.zero_grad(set_to_none=True)
    ds.DropoutK(2, seed=5).step(pb.model, pb.forward_fn, pb.batch)
    for a, p in zip(ours, pb.model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_resuming_the_generator_replays_the_step():
    pb = make_problem("mlp-two-sites")
    m = ds.RDrop(1.0, seed=2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    pb.model.zero_grad(set_to_none=True)
    first = m.step(pb.model, pb.forward_fn, pb.batch).stats
    m.load_state_dict(state)
    pb.model.zero_grad(set_to_none=True)
    assert m.step(pb.model, pb.forward_fn, pb.batch).stats == first


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ds.RDrop(-0.1), ValueError, "alpha must be a non-negative number"),
        (lambda: ds.Fraternal("a"), ValueError, "kappa must be a non-negative number"),
        (lambda: ds.RDrop(0.5, loss="squared_error"), ValueError, "cross_entropy"),
    ],
    ids=["alpha<0", "kappa-str", "rdrop-squared-error"],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_model_without_sites_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="site"):
        model.zero_grad(set_to_none=True)
        ds.Fraternal(0.1).step(model, mlp_forward, (torch.randn(4, 3), torch.randint(0, 2, (4,))))
