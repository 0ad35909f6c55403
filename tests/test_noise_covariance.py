"""Gradient noise: difference and analytic noise against dropout's exact covariance."""

import pytest
import torch
from conftest import HeadMLP, make_problem, mlp_forward

import dropsplit as ds
from dropsplit import oracles


def _small(q, seed=0, classes=4):
    torch.manual_seed(seed)
    model = HeadMLP(d_in=3, d_hidden=5, classes=classes, p_hidden=q)
    return model, (torch.randn(2, 3), torch.randint(0, classes, (2,)))  # 10 mask bits


def _cov(draws):
    return draws.T @ draws / draws.shape[0]


@pytest.mark.parametrize("kind", ["dropout", "difference"])
def test_sampled_noise_has_the_exact_dropout_covariance(kind):
    model, batch = _small(0.3)
    exact = oracles.exact_noise_covariance(model, mlp_forward, batch, "dropout")
    draws = ds.gradient_noise(model, mlp_forward, batch, kind, samples=4000, seed=0)
    assert draws.shape == (4000, sum(p.numel() for p in model.parameters()))
    rel = (_cov(draws) - exact).norm() / exact.norm()
    assert rel < 0.1, rel
    assert _cov(draws).trace().item() == pytest.approx(exact.trace().item(), rel=0.06)


@pytest.mark.montecarlo
def test_difference_noise_covariance_slow():
    model, batch = _small(0.3)
    exact = oracles.exact_noise_covariance(model, mlp_forward, batch, "dropout")
    draws = ds.gradient_noise(model, mlp_forward, batch, "difference", samples=100_000, seed=1)
    assert (_cov(draws) - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("name", ["mlp-head", "mlp-two-sites", "rnn-locked"])
@pytest.mark.parametrize("grouping", ["mask", "element"])
def test_analytic_noise_draws_have_the_oracle_covariance(name, grouping):
    pb = make_problem(name)
    exact = oracles.exact_noise_covariance(
        pb.model, pb.forward_fn, pb.batch, "analytic", grouping=grouping
    )
    draws = ds.gradient_noise(
        pb.model, pb.forward_fn, pb.batch, "analytic", samples=3000, grouping=grouping, seed=0
    )
    assert draws.mean(0).abs().max() < 5 * draws.std(0).max() / 3000**0.5
    assert _cov(draws).trace().item() == pytest.approx(exact.trace().item(), rel=0.06)
    assert (_cov(draws) - exact).norm() / exact.norm() < 0.1


@pytest.mark.parametrize("q", [0.02, 0.05], ids=lambda q: f"q={q}")
def test_analytic_noise_trace_is_close_to_dropout_at_small_q(q):
    """xi_approx linearizes the dropout noise: exact traces agree to first order in q."""
    ratios = []
    for seed in range(3):
        model, batch = _small(q, seed)
        dropout = oracles.exact_noise_covariance(model, mlp_forward, batch, "dropout")
        analytic = oracles.exact_noise_covariance(model, mlp_forward, batch, "analytic")
        ratios.append(analytic.trace().item() / dropout.trace().item())
    print(f"q={q}: trace(xi_approx) / trace(xi_drop) = {[round(r, 3) for r in ratios]}")
    assert all(r == pytest.approx(1.0, abs=0.1) for r in ratios)


@pytest.mark.parametrize("k", [2, 4])
def test_dropout_k_gradient_variance_is_one_over_k(k):
    model, batch = _small(0.4)
    exact = oracles.exact_noise_covariance(model, mlp_forward, batch, "dropout").trace().item()

    def trace_of(method_k, steps=1500):
        method = ds.DropoutK(method_k, seed=k)
        grads = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            method.step(model, mlp_forward, batch)
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        g = torch.stack(grads)
        return (g - g.mean(0)).pow(2).sum(1).mean().item()

    one, many = trace_of(1), trace_of(k)
    print(f"k={k}: trace ratio {many / one:.3f} (1/k = {1 / k:.3f})")
    assert one == pytest.approx(exact, rel=0.1)
    assert many / one == pytest.approx(1 / k, rel=0.15)


@pytest.mark.parametrize("noise", ["difference", "analytic"])
def test_dropout_k_with_noise_restores_dropout_covariance(noise):
    model, batch = _small(0.05)
    exact = oracles.exact_noise_covariance(model, mlp_forward, batch, "dropout").trace().item()
    method = ds.DropoutK(4, noise, seed=3)
    grads = []
    for _ in range(2000):
        model.zero_grad(set_to_none=True)
        method.step(model, mlp_forward, batch)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(grads)
    trace = (g - g.mean(0)).pow(2).sum(1).mean().item()
    assert trace == pytest.approx(exact, rel=0.12)
