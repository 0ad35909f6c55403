"""The finite-difference estimator against double backward, the exact regularizer, and itself."""

import math

import pytest
import torch
from conftest import PROBLEMS, make_problem

import dropsplit as ds
from dropsplit.core.explicit import site_gradients
from dropsplit.core.forward import flat_gradient, gated_forward, trainable_parameters
from dropsplit.core.losses import get_loss
from dropsplit.estimators import EstimatorSpec
from dropsplit.oracles import exact_explicit_regularizer

LOSS = get_loss("cross_entropy")


def _draw(
    pb, curvature, implicit, epsilon, grouping="mask", seed=0, scales=(1.0, 1.0), examples=None
):
    spec = EstimatorSpec(
        LOSS,
        curvature,
        implicit,
        grouping=grouping,
        explicit_scale=scales[0],
        implicit_scale=scales[1],
    )
    fd = ds.FiniteDifference(epsilon, examples)
    return fd.estimate(pb.model, pb.forward_fn, pb.batch, spec, torch.Generator().manual_seed(seed))


def _examples_of(name):
    """Example index of each target: rows of the MLP batches, columns of the sequence batch."""
    if name == "rnn-locked":
        return lambda out: torch.arange(out.n) % 3
    return lambda out: torch.arange(out.n)


def _hutchinson_reference(pb, fd, curvature, implicit, grouping, scales, examples=None):
    """The estimator's limit eps -> 0 by double backward: the same signs and labels, exact slopes.

    ``L/N + es sum_b A_b^2 / 2N + sqrt(is) A^y / N`` with ``A_b = sum_m d_m G^{P_b}_m`` (``P_b``
    the probe summed over example ``b``'s targets, one example without ``examples``) and
    ``A^y = sum_m d_m G^y_m`` from gate gradients, ``d = sqrt(v) s`` the estimator's directions.
    """
    out, ctx = gated_forward(pb.model, pb.forward_fn, pb.batch, LOSS, grouping)
    summed = LOSS.summed(out.logits, out.targets)
    value = summed / out.n
    parts = {"loss": value, "explicit": value.new_zeros(()), "implicit": value.new_zeros(())}
    if curvature is not None:
        probe = fd.probe(out.logits)
        ids = torch.zeros(out.n, dtype=torch.long) if examples is None else examples(out)
        total = value.new_zeros(())
        for b in ids.unique():
            grads = site_gradients(probe[ids == b].sum(), ctx.gates, create_graph=True)
            a = sum((d * g).sum() for d, g in zip(fd.directions, grads, strict=True))
            total = total + a**2
        parts["explicit"] = scales[0] * total / (2 * out.n)
    if implicit:
        grads = site_gradients(summed, ctx.gates, create_graph=True)
        a_y = sum((d * g).sum() for d, g in zip(fd.directions, grads, strict=True))
        parts["implicit"] = math.sqrt(scales[1]) * a_y / out.n
    return parts


CASES = {
    "sampled+implicit": ("sampled", True, "mask", (1.0, 1.0)),
    "sampled": ("sampled", False, "mask", (1.0, 1.0)),
    "label+implicit": ("label", True, "mask", (1.0, 1.0)),
    "identity": ("identity", False, "mask", (1.0, 1.0)),
    "implicit-only": (None, True, "mask", (1.0, 1.0)),
    "element": ("sampled", True, "element", (1.0, 1.0)),
    "scaled": ("sampled", True, "mask", (2.0, 0.5)),
}


@pytest.mark.parametrize("per_example", [False, True], ids=["one-slope", "per-example"])
@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("case", list(CASES))
def test_estimator_tends_to_the_hutchinson_double_backward(name, case, per_example):
    curvature, implicit, grouping, scales = CASES[case]
    pb = make_problem(name)
    params = trainable_parameters(pb.model)
    examples = _examples_of(name) if per_example else None
    fd = _draw(pb, curvature, implicit, 1e-4, grouping, scales=scales, examples=examples)
    ref = _hutchinson_reference(pb, fd, curvature, implicit, grouping, scales, examples)
    torch.testing.assert_close(fd.loss, ref["loss"].detach(), rtol=1e-7, atol=1e-10)
    for key in ("explicit", "implicit"):
        value = getattr(fd, key)
        assert (value is None) == (ref[key].grad_fn is None)  # None exactly when not asked for
        value = ref[key].new_zeros(()) if value is None else value
        torch.testing.assert_close(value, ref[key].detach(), rtol=1e-6, atol=1e-10)
    # the gradient of the explicit term is A grad A / N: twice the term's own gradient halved
    ref_grad = flat_gradient(ref["loss"] + ref["explicit"] + ref["implicit"], params)
    fd_grad = flat_gradient(fd.surrogate, params)
    torch.testing.assert_close(fd_grad, ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", PROBLEMS)
def test_error_shrinks_as_epsilon_squared(name):
    pb = make_problem(name)
    params = trainable_parameters(pb.model)
    errors = []
    for epsilon in (0.2, 0.1):
        fd = _draw(pb, "sampled", True, epsilon)
        ref = _hutchinson_reference(pb, fd, "sampled", True, "mask", (1.0, 1.0))
        ref_grad = flat_gradient(sum(ref.values()), params)
        errors.append(float((flat_gradient(fd.surrogate, params) - ref_grad).norm()))
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


@pytest.mark.parametrize("per_example", [False, True], ids=["one-slope", "per-example"])
@pytest.mark.parametrize("name", ["mlp-two-sites", "rnn-locked"])
def test_explicit_estimate_is_unbiased_for_lambda_r(name, per_example):
    """E over signs and labels of sum_b A_b^2 / 2N is the exact lambda R (fast Monte-Carlo tier).

    Per example this holds for sites whose groups each belong to one example: the weight site
    of ``rnn-locked`` is left out of the comparison there.
    """
    pb = make_problem(name)
    examples = _examples_of(name) if per_example else None
    sites = None
    if per_example and name == "rnn-locked":
        sites = [n for n, s in ds.named_sites(pb.model) if not s.is_weight_site]
        for _, site in ds.named_sites(pb.model):
            if site.is_weight_site:
                site.p = 0.0  # an inactive site: no perturbation, no term
    exact = sum(exact_explicit_regularizer(pb.model, pb.forward_fn, pb.batch, sites=sites).values())
    with torch.no_grad():
        draws = torch.stack(
            [
                _draw(pb, "sampled", False, 1e-3, seed=s, examples=examples).explicit
                for s in range(3000)
            ]
        )
    stderr = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - exact) < 4 * stderr, (float(draws.mean()), exact, stderr)


def test_expected_gradient_is_that_of_the_exact_objective():
    """Mean FD gradient (explicit + implicit) = gradient of L + lambda R_exact (fast tier)."""
    pb = make_problem("mlp-two-sites")
    params = trainable_parameters(pb.model)
    exact = ds.Analytic("exact", False, seed=0)
    pb.model.zero_grad(set_to_none=True)
    exact.step(pb.model, pb.forward_fn, pb.batch)
    ref = torch.cat([p.grad.reshape(-1) for p in params])
    grads = torch.stack(
        [
            flat_gradient(_draw(pb, "sampled", True, 1e-3, seed=s).surrogate, params)
            for s in range(3000)
        ]
    )
    stderr = grads.std(0) / math.sqrt(len(grads))
    z = (grads.mean(0) - ref).abs() / (stderr + 1e-12)
    assert float(z.max()) < 5.0, float(z.max())


def test_method_step_writes_the_surrogate_gradient_and_replays():
    pb = make_problem("rnn-locked")
    params = trainable_parameters(pb.model)
    method = ds.Analytic("sampled", True, gradient=ds.FiniteDifference(epsilon=0.05), seed=3)
    state = method.state_dict()
    pb.model.zero_grad(set_to_none=True)
    result = method.step(pb.model, pb.forward_fn, pb.batch)
    first = torch.cat([p.grad.reshape(-1) for p in params])
    assert set(result.stats) >= {"loss", "explicit", "implicit", "objective"}
    method.load_state_dict(state)
    (gen,) = method.spawn(1, torch.device("cpu"))
    spec = EstimatorSpec(LOSS, "sampled", True, grouping="mask")
    fd = ds.FiniteDifference(epsilon=0.05).estimate(pb.model, pb.forward_fn, pb.batch, spec, gen)
    torch.testing.assert_close(first, flat_gradient(fd.surrogate, params))
    method.load_state_dict(state)
    pb.model.zero_grad(set_to_none=True)
    method.step(pb.model, pb.forward_fn, pb.batch)
    torch.testing.assert_close(first, torch.cat([p.grad.reshape(-1) for p in params]))


def test_exact_curvature_is_refused():
    with pytest.raises(ValueError, match="finite-difference"):
        ds.Analytic(curvature="exact", gradient=ds.FiniteDifference())


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"epsilon": 0.0}, ValueError, r"epsilon must be in \(0, 1\]"),
        ({"epsilon": 2.0}, ValueError, r"epsilon must be in \(0, 1\]"),
        ({"epsilon": "small"}, TypeError, "epsilon must be a number, got str"),
        ({"epsilon": False}, TypeError, "epsilon must be a number, got bool"),
        ({"examples": 3}, TypeError, "examples must be None or a callable"),
    ],
    ids=["zero-step", "large-step", "string-step", "bool-step", "examples-not-callable"],
)
def test_bad_finite_difference_options(options, error, match):
    with pytest.raises(error, match=match):
        ds.FiniteDifference(**options)


def test_example_map_of_the_wrong_shape_is_refused():
    pb = make_problem(PROBLEMS[0])
    with pytest.raises(ValueError, match="one example index per target"):
        _draw(pb, "sampled", True, 1e-3, examples=lambda out: torch.arange(out.n + 1))
