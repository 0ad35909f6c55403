"""The caller owns the backward: step() adds to p.grad, calls the caller's backward, and
micro-batches accumulate to the whole batch's gradient."""

import pytest
import torch
from conftest import HeadMLP, mlp_forward

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters

METHODS = {
    "no-dropout": lambda: ds.NoDropout(seed=1),
    "dropout-2-difference": lambda: ds.DropoutK(2, noise="difference", seed=1),
    "dropout-2-analytic": lambda: ds.DropoutK(2, noise="analytic", seed=1),
    "analytic-double-backward": lambda: ds.Analytic(seed=1),
    "analytic-hvp-difference": lambda: ds.Analytic(gradient="hvp-difference", seed=1),
    "analytic-finite-difference": lambda: ds.Analytic(gradient="finite-difference", seed=1),
    "r-drop": lambda: ds.RDrop(0.5, seed=1),
}


def problem():
    torch.manual_seed(0)
    return HeadMLP(p_input=0.1), (torch.randn(8, 4), torch.randint(0, 3, (8,)))


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


@pytest.mark.parametrize("name", list(METHODS))
def test_step_adds_to_the_gradient_and_calls_the_callers_backward(name):
    model, batch = problem()
    METHODS[name]().step(model, mlp_forward, batch)
    once = flat_grad(model).clone()
    scaled = []

    def backward(scalar):
        scaled.append(scalar)
        (3.0 * scalar).backward()  # what an AMP scaler does

    METHODS[name]().step(model, mlp_forward, batch, backward=backward)  # same draws again
    assert len(scaled) == 1
    torch.testing.assert_close(flat_grad(model), 4.0 * once)


def test_overwrite_is_deprecated_and_still_overwrites():
    model, batch = problem()
    ds.NoDropout().step(model, mlp_forward, batch)
    expected = flat_grad(model).clone()
    with pytest.deprecated_call():
        method = ds.NoDropout(overwrite=True)
    method.step(model, mlp_forward, batch)
    torch.testing.assert_close(flat_grad(model), expected)


def test_a_nonfinite_step_leaves_the_accumulated_gradient_alone():
    model, batch = problem()
    ds.NoDropout().step(model, mlp_forward, batch)
    before = flat_grad(model).clone()
    x, y = batch
    with pytest.warns(RuntimeWarning, match="no gradient was added"):
        result = ds.NoDropout(nonfinite="warn").step(model, mlp_forward, (x * float("nan"), y))
    assert not result.finite
    torch.testing.assert_close(flat_grad(model), before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ds.NoDropout(),
        lambda: ds.Analytic("exact", implicit=False),
    ],
    ids=["no-dropout", "analytic-exact-curvature"],
)
def test_micro_batches_accumulate_to_the_whole_batch(make):
    """Deterministic objectives are token means: m equal micro-batches, each scaled by 1/m."""
    model, (x, y) = problem()
    make().step(model, mlp_forward, (x, y))
    whole = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    method = make()
    for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
        method.step(model, mlp_forward, (xs, ys), backward=lambda t: (t / 4).backward())
    torch.testing.assert_close(flat_grad(model), whole, rtol=1e-6, atol=1e-9)


def test_an_auxiliary_loss_is_kept():
    model, batch = problem()
    aux = sum(p.square().sum() for p in model.parameters())
    aux.backward()
    expected = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    ds.DropoutK(1, seed=4).step(model, mlp_forward, batch)
    expected += flat_grad(model)
    model.zero_grad(set_to_none=True)
    sum(p.square().sum() for p in model.parameters()).backward()
    ds.DropoutK(1, seed=4).step(model, mlp_forward, batch)
    torch.testing.assert_close(flat_grad(model), expected)
