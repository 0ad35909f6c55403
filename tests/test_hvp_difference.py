"""The exact-direction difference estimator against the double-backward path (same draws)."""

import pytest
import torch
from conftest import PROBLEMS, make_problem

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.core.sites import SiteContext, site_context

CASES = {
    "sampled+implicit": ("sampled", True, "mask", (1.0, 1.0)),
    "sampled": ("sampled", False, "mask", (1.0, 1.0)),
    "label+implicit": ("label", True, "mask", (1.0, 1.0)),
    "identity": ("identity", False, "mask", (1.0, 1.0)),
    "implicit-only": (None, True, "mask", (1.0, 1.0)),
    "element": ("sampled", True, "element", (1.0, 1.0)),
    "scaled": ("sampled", True, "mask", (2.0, 0.5)),
}


def _step(pb, case, gradient, seed=7, **kwargs):
    """One step of Analytic; its gradient, flattened, and its stats."""
    curvature, implicit, grouping, (es, is_) = CASES[case]
    method = ds.Analytic(
        curvature,
        implicit,
        grouping=grouping,
        explicit_scale=es,
        implicit_scale=is_,
        gradient=gradient,
        seed=seed,
        **kwargs,
    )
    pb.model.zero_grad(set_to_none=True)
    result = method.step(pb.model, pb.forward_fn, pb.batch)
    grad = torch.cat([p.grad.reshape(-1) for p in trainable_parameters(pb.model)])
    return grad, result.stats


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_double_backward_up_to_the_step(name, case):
    pb = make_problem(name)
    exact, exact_stats = _step(pb, case, "double-backward")
    estimate, stats = _step(pb, case, ds.HVPDifference(step=1e-6))
    # same draws: the loss and the explicit values are the exact path's, the implicit value and
    # the gradient agree up to O(step)
    for key in exact_stats:
        tol = 1e-5 if key in ("implicit", "objective") else 1e-12
        torch.testing.assert_close(stats[key], exact_stats[key], rtol=tol, atol=tol, msg=key)
    torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-5 * float(exact.norm()))


@pytest.mark.parametrize("name", PROBLEMS)
def test_error_is_first_order_in_the_step(name):
    pb = make_problem(name)
    exact, _ = _step(pb, "sampled+implicit", "double-backward")
    errors = [
        float((_step(pb, "sampled+implicit", ds.HVPDifference(step=s))[0] - exact).norm())
        for s in (1e-2, 1e-3)
    ]
    assert 7.0 < errors[0] / errors[1] < 13.0, errors


def test_float32_default_step_is_close_to_double_backward():
    """In float32 the default step keeps the error near 1e-4 of the gradient (BENCHMARKS.md)."""
    torch.set_default_dtype(torch.float32)
    pb = make_problem("rnn-locked")
    exact, _ = _step(pb, "sampled+implicit", "double-backward")
    estimate, _ = _step(pb, "sampled+implicit", "hvp-difference")
    assert float((estimate - exact).norm() / exact.norm()) < 2e-3


def test_awd_lstm_fused_kernel_matches_the_loop_double_backward():
    """On the AWD LSTM the estimator's clean forward keeps nn.LSTM's kernel; same gradients."""
    from dropsplit.models.awd import AWDLSTM, lm_forward

    torch.manual_seed(0)
    model = AWDLSTM(12, 5, 7, 2, p_input=0.3, p_hidden=0.3, p_output=0.3, p_weight=0.3)
    batch = (torch.randint(0, 12, (6, 3)), torch.randint(0, 12, (6, 3)), None)
    pb = type("P", (), {"model": model, "forward_fn": lm_forward, "batch": batch})
    exact, _ = _step(pb, "sampled+implicit", "double-backward")
    estimate, _ = _step(pb, "sampled+implicit", ds.HVPDifference(step=1e-6))
    torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-5 * float(exact.norm()))


def test_clean_forward_does_not_mark_gates_live():
    """The single-backward gate context leaves modules on their fastest kernels."""
    seen = []
    pb = make_problem("mlp-two-sites")
    model = pb.model
    model.differentiated_twice = False  # the attribute a module declares to be told
    hook = model.register_forward_hook(lambda m, *_: seen.append(m.differentiated_twice))
    with site_context(model, SiteContext("gate", twice=False)):
        pb.forward_fn(model, pb.batch)
    with site_context(model, SiteContext("gate")):
        pb.forward_fn(model, pb.batch)
    hook.remove()
    assert seen == [False, True]


def test_exact_curvature_is_refused():
    with pytest.raises(ValueError, match="hvp-difference"):
        ds.Analytic(curvature="exact", gradient=ds.HVPDifference())


@pytest.mark.parametrize(
    "step, error, match",
    [
        (0.0, ValueError, r"step must be in \(0, 0.1\]"),
        (0.5, ValueError, r"step must be in \(0, 0.1\]"),
        (float("nan"), ValueError, r"step must be in \(0, 0.1\]"),
        ("small", TypeError, "step must be a number, got str"),
        (True, TypeError, "step must be a number, got bool"),
    ],
    ids=["zero-step", "large-step", "nan-step", "string-step", "bool-step"],
)
def test_bad_hvp_difference_step(step, error, match):
    with pytest.raises(error, match=match):
        ds.HVPDifference(step=step)


def test_dropout_k_noise_has_no_finite_difference_form():
    with pytest.raises(ValueError, match="cannot give the analytic noise alone"):
        ds.DropoutK(2, "analytic", gradient="finite-difference")
    with pytest.raises(ValueError, match="gradient must be one of"):
        ds.DropoutK(2, "analytic", gradient="finite")


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("k", [2, 4])
def test_dropout_k_analytic_noise_equals_double_backward_up_to_the_step(name, k):
    pb = make_problem(name)
    params = trainable_parameters(pb.model)
    grads = {}
    for gradient in ("double-backward", "hvp-difference"):
        estimator = ds.HVPDifference(step=1e-6) if gradient == "hvp-difference" else gradient
        method = ds.DropoutK(k, "analytic", gradient=estimator, seed=11)
        pb.model.zero_grad(set_to_none=True)
        stats = method.step(pb.model, pb.forward_fn, pb.batch).stats
        grads[gradient] = (torch.cat([p.grad.reshape(-1) for p in params]), stats)
    (exact, exact_stats), (estimate, stats) = grads["double-backward"], grads["hvp-difference"]
    torch.testing.assert_close(stats["loss"], exact_stats["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["implicit"], exact_stats["implicit"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-5 * float(exact.norm()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("gradient", ["hvp-difference", "finite-difference"])
def test_half_precision_is_refused_not_silently_wrong(gradient, dtype):
    pb = make_problem("mlp-two-sites")
    pb.model.to(dtype)
    x, y = pb.batch
    with pytest.raises(ValueError, match="cannot resolve"):
        ds.Analytic("sampled", True, gradient=gradient).step(
            pb.model, pb.forward_fn, (x.to(dtype), y)
        )
