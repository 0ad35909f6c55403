"""Gradient makers: gradients against finite differences, equivalences, errors."""

import copy
import math
import warnings

import pytest
import torch
from conftest import PROBLEMS, HeadMLP, make_problem, mlp_forward
from torch import nn

import dropsplit as ds
from dropsplit.models.toy import TinyRNNLM, lm_forward

METHODS = {
    "no-dropout": lambda: ds.NoDropout(seed=0),
    "dropout-1": lambda: ds.DropoutK(1, seed=0),
    "dropout-3": lambda: ds.DropoutK(3, seed=0),
    "dropout-3-batch": lambda: ds.DropoutK(3, implementation="batch", seed=0),
    "dropout-3-difference": lambda: ds.DropoutK(3, "difference", seed=0),
    "dropout-3-analytic": lambda: ds.DropoutK(3, "analytic", seed=0),
    "analytic-sampled": lambda: ds.Analytic("sampled", True, seed=0),
    "analytic-exact": lambda: ds.Analytic("exact", False, seed=0),
    "analytic-label": lambda: ds.Analytic("label", True, seed=0),
    "analytic-identity": lambda: ds.Analytic("identity", False, seed=0),
    "analytic-implicit-only": lambda: ds.Analytic(None, True, seed=0),
    "analytic-element": lambda: ds.Analytic("sampled", True, grouping="element", seed=0),
    "analytic-scaled": lambda: ds.Analytic(explicit_scale=2.0, implicit_scale=0.5, seed=0),
    "rdrop": lambda: ds.RDrop(0.7, seed=0),
    "fraternal": lambda: ds.Fraternal(0.3, seed=0),
}


def _objective_at(method, state, pb, params, base, direction, eps):
    with torch.no_grad():
        offset = 0
        for p, b in zip(params, base, strict=True):
            p.copy_(b + eps * direction[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    method.load_state_dict(state)
    return float(method.objective(pb.model, pb.forward_fn, pb.batch).value)


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("method_name", list(METHODS))
def test_step_gradient_is_the_derivative_of_the_objective(name, method_name):
    pb = make_problem(name)
    method = METHODS[method_name]()
    state = copy.deepcopy(method.state_dict())
    pb.model.zero_grad(set_to_none=True)
    result = method.step(pb.model, pb.forward_fn, pb.batch)
    params = [p for p in pb.model.parameters()]
    grad = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    base = [p.detach().clone() for p in params]
    direction = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(1))
    eps = 1e-5
    plus = _objective_at(method, state, pb, params, base, direction, eps)
    minus = _objective_at(method, state, pb, params, base, direction, -eps)
    at_zero = _objective_at(method, state, pb, params, base, direction, 0.0)
    assert at_zero == pytest.approx(result.stats["objective"], rel=1e-12)
    fd = (plus - minus) / (2 * eps)
    assert fd == pytest.approx(float(grad @ direction), rel=1e-5, abs=1e-8)


def test_dropout_k_loop_equals_batch_duplication_with_identical_masks():
    torch.manual_seed(0)
    model = TinyRNNLM(vocab=6, embedding=4, hidden=5)
    batch = (torch.randint(0, 6, (7, 3)), torch.randint(0, 6, (7, 3)), torch.zeros(1, 3, 5))
    grads, results = {}, {}
    for impl in ("loop", "batch"):
        method = ds.DropoutK(4, implementation=impl, batch_dim=1, seed=11)
        model.zero_grad(set_to_none=True)
        results[impl] = method.step(model, lm_forward, batch)
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    assert results["loop"].loss == pytest.approx(results["batch"].loss, rel=1e-12)
    for a, b in zip(grads["loop"], grads["batch"], strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert torch.allclose(results["loop"].aux, results["batch"].aux)
    assert results["batch"].aux.shape == (1, 3, 5)


def test_dropout_k_mean_matches_dropout_mean():
    """Dropout_k keeps the objective: its mean loss over many steps matches Dropout_1."""
    model, batch = HeadMLP(3, 5, 3, p_hidden=0.3), (torch.randn(6, 3), torch.randint(0, 3, (6,)))
    from dropsplit import oracles

    exact = oracles.exact_dropout_loss(model, mlp_forward, (batch[0][:2], batch[1][:2]))
    for k in (1, 4):
        method = ds.DropoutK(k, seed=k)
        losses = torch.tensor(
            [
                float(method.objective(model, mlp_forward, (batch[0][:2], batch[1][:2])).value)
                for _ in range(3000)
            ]
        )
        assert abs(losses.mean().item() - exact) < 4.5 * losses.std().item() / math.sqrt(3000)


def test_step_overwrites_existing_gradients():
    pb = make_problem("mlp-head")
    for p in pb.model.parameters():
        p.grad = torch.full_like(p, 123.0)
    pb.model.zero_grad(set_to_none=True)
    ds.NoDropout().step(pb.model, pb.forward_fn, pb.batch)
    ref = copy.deepcopy(pb.model)
    for p in ref.parameters():
        p.grad = None
    ref.zero_grad(set_to_none=True)
    ds.NoDropout().step(ref, pb.forward_fn, pb.batch)
    for a, b in zip(pb.model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_stats_name_every_regularizer_and_site():
    pb = make_problem("rnn-locked")
    pb.model.zero_grad(set_to_none=True)
    result = ds.Analytic(seed=0).step(pb.model, pb.forward_fn, pb.batch)
    assert {
        "loss",
        "objective",
        "explicit",
        "implicit",
        "explicit/input",
        "explicit/weight_hh",
        "explicit/output",
    } <= set(result.stats)
    total = sum(v for k, v in result.stats.items() if k.startswith("explicit/"))
    assert total == pytest.approx(result.stats["explicit"])
    assert isinstance(result.aux, torch.Tensor)


def test_same_seed_replays_the_same_step():
    pb = make_problem("rnn-locked")
    pb.model.zero_grad(set_to_none=True)
    a = ds.DropoutK(2, "difference", seed=5).step(pb.model, pb.forward_fn, pb.batch)
    ga = [p.grad.clone() for p in pb.model.parameters()]
    pb.model.zero_grad(set_to_none=True)
    b = ds.DropoutK(2, "difference", seed=5).step(pb.model, pb.forward_fn, pb.batch)
    assert a.stats == b.stats
    assert all(torch.equal(x, p.grad) for x, p in zip(ga, pb.model.parameters(), strict=True))


def test_nonfinite_objective_is_reported_not_stepped_on():
    pb = make_problem("mlp-head")
    with torch.no_grad():
        pb.model.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        pb.model.zero_grad(set_to_none=True)
        ds.DropoutK(1).step(pb.model, pb.forward_fn, pb.batch)
    for p in pb.model.parameters():
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pb.model.zero_grad(set_to_none=True)
        result = ds.Analytic(nonfinite="warn").step(pb.model, pb.forward_fn, pb.batch)
    assert not result.finite and result.stats["nonfinite"] == 1.0
    assert any("non-finite" in str(w.message) for w in caught)
    assert all(p.grad is None for p in pb.model.parameters())


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ds.DropoutK(0), ValueError, "k must be >= 1"),
        (lambda: ds.DropoutK(2.5), TypeError, "k must be an int"),
        (lambda: ds.DropoutK(2, noise="gaussian"), ValueError, "noise must be one of"),
        (lambda: ds.DropoutK(2, implementation="fast"), ValueError, "implementation"),
        (lambda: ds.Analytic(curvature="hessian"), ValueError, "curvature must be one of"),
        (lambda: ds.Analytic(grouping="time"), ValueError, "grouping must be one of"),
        (lambda: ds.Analytic(implicit="yes"), TypeError, "implicit must be a bool"),
        (lambda: ds.Analytic(explicit_scale=-1), ValueError, "explicit_scale"),
        (lambda: ds.Analytic(gradient="magic"), ValueError, "gradient must be one of"),
        (lambda: ds.NoDropout(loss="hinge"), ValueError, "loss must be one of"),
        (lambda: ds.NoDropout(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
        (lambda: ds.NoDropout(seed="x"), TypeError, "seed must be an int"),
    ],
    ids=[
        "k=0",
        "k-float",
        "noise",
        "implementation",
        "curvature",
        "grouping",
        "implicit",
        "scale",
        "gradient",
        "loss",
        "nonfinite",
        "seed",
    ],
)
def test_bad_method_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "method",
    [ds.DropoutK(2), ds.Analytic(), ds.DropoutK(1)],
    ids=["dropout-2", "analytic", "dropout-1"],
)
def test_methods_that_need_sites_say_so(method):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="needs dropout sites"):
        model.zero_grad(set_to_none=True)
        method.step(model, mlp_forward, (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    with pytest.raises(ValueError, match="needs dropout sites"):
        ds.explicit_gap(model, mlp_forward, (torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_no_dropout_runs_on_a_model_without_sites():
    model = nn.Linear(3, 2)
    model.zero_grad(set_to_none=True)
    ds.NoDropout().step(model, mlp_forward, (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    assert model.weight.grad is not None


@pytest.mark.parametrize(
    "batch, error, match",
    [
        ((torch.randn(4, 3), torch.randint(0, 2, (5,))), ValueError, "targets must have shape"),
        ((torch.randn(4, 3), torch.rand(4)), TypeError, "integer class indices"),
        ((torch.randn(4, 3), torch.tensor([0, 1, 2, 1])), ValueError, r"class indices in \[0, 2\)"),
    ],
    ids=["length", "float-targets", "target-out-of-range"],
)
def test_mismatched_logits_and_targets(batch, error, match):
    pb = make_problem("mlp-head")
    pb.model.head = nn.Linear(6, 2)
    with pytest.raises(error, match=match):
        pb.model.zero_grad(set_to_none=True)
        ds.DropoutK(1).step(pb.model, mlp_forward, (torch.randn(4, 4), batch[1]))


def test_logits_must_be_two_dimensional():
    model = TinyRNNLM()
    with pytest.raises(ValueError, match=r"logits must have shape \[N, C\]"):
        ds.DropoutK(1).step(
            model, lambda m, b: (m(b)[0], b.reshape(-1)), torch.randint(0, 8, (3, 2))
        )


def test_forward_fn_must_return_a_tuple():
    pb = make_problem("mlp-head")
    with pytest.raises(TypeError, match="forward_fn must return"):
        pb.model.zero_grad(set_to_none=True)
        ds.NoDropout().step(pb.model, lambda m, b: m(b[0]), pb.batch)


def test_unknown_site_name_in_a_measurement():
    pb = make_problem("mlp-head")
    with pytest.raises(ValueError, match="unknown site"):
        ds.explicit_gap(pb.model, pb.forward_fn, pb.batch, sites=["nope"])
    with pytest.raises(ValueError, match="curvature must be one of"):
        ds.explicit_regularizer(pb.model, pb.forward_fn, pb.batch, "hessian")
    with pytest.raises(ValueError, match="kind must be one of"):
        ds.gradient_noise(pb.model, pb.forward_fn, pb.batch, "gaussian")


def test_deprecated_explicit_keyword_is_curvature():
    """``Analytic(explicit=...)`` still works, warns, and names the keyword the user gave."""
    with pytest.warns(DeprecationWarning, match="curvature="):
        old = ds.Analytic(explicit="label", implicit=False)
    assert old.curvature == ds.Analytic(curvature="label", implicit=False).curvature == "label"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="explicit must be"):
        ds.Analytic(explicit="hessian")


@pytest.mark.parametrize(
    "shared_dims, batch_dim, expected",
    [((0,), None, 1), ((), None, 0), ((0,), 2, 2), ((-1,), None, 0)],
    ids=["locked-inferred", "elementwise", "given", "channel"],
)
def test_batch_duplication_reads_the_batch_dimension_from_the_sites(
    shared_dims, batch_dim, expected
):
    model = torch.nn.Sequential(ds.Dropout(0.3, shared_dims, batch_dim=batch_dim))
    assert ds.core.sites.site_batch_dim(model) == expected


def test_disagreeing_sites_ask_for_a_batch_dim():
    model = torch.nn.Sequential(ds.Dropout(0.3, (0,)), ds.Dropout(0.3))
    with pytest.raises(ValueError, match="batch_dim"):
        ds.core.sites.site_batch_dim(model)


def test_batch_duplication_without_batch_dim_matches_the_loop():
    """The LSTM LM's sites say its batch dimension is 1: no batch_dim argument is needed."""
    from dropsplit.models.awd import AWDLSTM, lm_forward

    torch.manual_seed(0)
    model = AWDLSTM(11, 6, 8, 2)
    x, y = torch.randint(0, 11, (5, 3)), torch.randint(0, 11, (5, 3))
    grads = []
    for impl in ("loop", "batch"):
        model.zero_grad()
        model.zero_grad(set_to_none=True)
        ds.DropoutK(3, implementation=impl, seed=4).step(model, lm_forward, (x, y, None))
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_non_floating_logits_are_a_type_error():
    model = nn.Linear(3, 2)
    sited = nn.Sequential(model, ds.Dropout(0.5))

    def integer_logits(m, batch):
        return m(batch[0]).long(), batch[1]

    with pytest.raises(TypeError, match="logits must be floating point"):
        sited.zero_grad(set_to_none=True)
        ds.DropoutK(1).step(sited, integer_logits, (torch.randn(4, 3), torch.randint(0, 2, (4,))))


@pytest.mark.parametrize("name", ["no-dropout", "dropout-1", "analytic-sampled"])
def test_half_precision_on_the_cpu_runs_the_exact_paths(name):
    """float16 on the CPU: every op of the exact paths has a kernel (torch 2.13), so they run;
    the difference estimators refuse it instead (test_hvp_difference)."""
    pb = make_problem("mlp-two-sites")
    pb.model.half()
    x, y = pb.batch
    pb.model.zero_grad(set_to_none=True)
    result = METHODS[name]().step(pb.model, pb.forward_fn, (x.half(), y))
    assert math.isfinite(result.loss)
