"""Lazy regularization: the explicit term every m steps scaled by m, the implicit every m' steps
with its variance scaled by m' (issue 18's first lever); and the schedule's start_step."""

import pytest
import torch
from conftest import PROBLEMS, make_problem

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("m", [2, 3])
def test_lazy_explicit_keeps_the_expected_gradient(name, m):
    """Deterministic (label curvature, no noise): the gradients of m lazy steps at the same
    weights sum to m times the every-step gradient."""
    pb = make_problem(name)
    pb.model.zero_grad(set_to_none=True)
    ds.Analytic("label", False, seed=0).step(pb.model, pb.forward_fn, pb.batch)
    every_step = flat_grad(pb.model)
    lazy = ds.Analytic("label", False, explicit_every=m, seed=0)
    total = torch.zeros_like(every_step)
    for _ in range(m):
        pb.model.zero_grad(set_to_none=True)
        lazy.step(pb.model, pb.forward_fn, pb.batch)
        total += flat_grad(pb.model)
    torch.testing.assert_close(total, m * every_step, rtol=1e-10, atol=1e-12)


def test_lazy_implicit_scales_the_noise_by_sqrt_m_and_skips_the_rest():
    """Same draws: on its step the lazy implicit scalar is sqrt(m) times the every-step one, so
    the variance over m steps is that of m every-step draws; the other steps add no noise."""
    pb = make_problem("rnn-locked")
    pb.model.zero_grad(set_to_none=True)
    every = ds.Analytic(None, True, seed=3).step(pb.model, pb.forward_fn, pb.batch).stats
    lazy = ds.Analytic(None, True, implicit_every=4, seed=3)
    pb.model.zero_grad(set_to_none=True)
    first = lazy.step(pb.model, pb.forward_fn, pb.batch).stats
    assert first["implicit"] == pytest.approx(2.0 * every["implicit"], rel=1e-12)
    for _ in range(3):
        pb.model.zero_grad(set_to_none=True)
        assert "implicit" not in lazy.step(pb.model, pb.forward_fn, pb.batch).stats


def test_lazy_step_count_is_in_the_state_dict():
    pb = make_problem("mlp-two-sites")
    method = ds.Analytic("label", True, explicit_every=3, implicit_every=2, seed=1)
    pb.model.zero_grad(set_to_none=True)
    method.step(pb.model, pb.forward_fn, pb.batch)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    pb.model.zero_grad(set_to_none=True)
    second = method.step(pb.model, pb.forward_fn, pb.batch).stats
    method.load_state_dict(state)
    pb.model.zero_grad(set_to_none=True)
    assert method.step(pb.model, pb.forward_fn, pb.batch).stats == second


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_bad_lazy_intervals(value):
    with pytest.raises(ValueError, match="explicit_every must be an int >= 1"):
        ds.Analytic(explicit_every=value)


@pytest.mark.parametrize("gradient", ["double-backward", "hvp-difference", "finite-difference"])
def test_every_gradient_path_takes_lazy_steps(gradient):
    """On the steps with neither term the estimator gives the clean loss's gradient."""
    pb = make_problem("rnn-locked")
    lazy = ds.Analytic("label", True, explicit_every=2, implicit_every=2, gradient=gradient, seed=0)
    pb.model.zero_grad(set_to_none=True)
    lazy.step(pb.model, pb.forward_fn, pb.batch)
    pb.model.zero_grad(set_to_none=True)
    skipped = lazy.step(pb.model, pb.forward_fn, pb.batch)
    assert "explicit" not in skipped.stats and "implicit" not in skipped.stats
    lazy_grad = flat_grad(pb.model)
    pb.model.zero_grad(set_to_none=True)
    ds.NoDropout().step(pb.model, pb.forward_fn, pb.batch)
    torch.testing.assert_close(lazy_grad, flat_grad(pb.model), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", PROBLEMS)
def test_steps_before_the_start_are_clean_and_the_terms_start_on_time(name):
    """start_step=2 with explicit_every=2: clean, clean, then the analytic step (the same
    gradient as an every-step method: label curvature, no noise), clean, analytic."""
    pb = make_problem(name)
    pb.model.zero_grad(set_to_none=True)
    ds.NoDropout().step(pb.model, pb.forward_fn, pb.batch)
    clean = flat_grad(pb.model)
    pb.model.zero_grad(set_to_none=True)
    ds.Analytic("label", False, seed=0).step(pb.model, pb.forward_fn, pb.batch)
    analytic = flat_grad(pb.model)
    scheduled = ds.Analytic("label", False, explicit_every=2, start_step=2, seed=0)
    for expected in (clean, clean, 2 * analytic - clean, clean, 2 * analytic - clean):
        pb.model.zero_grad(set_to_none=True)
        scheduled.step(pb.model, pb.forward_fn, pb.batch)
        torch.testing.assert_close(flat_grad(pb.model), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("value", [-1, 2.0, True])
def test_bad_start_step(value):
    with pytest.raises(ValueError, match="start_step must be an int >= 0"):
        ds.Analytic(start_step=value)
