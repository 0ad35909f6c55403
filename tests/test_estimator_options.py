"""Estimator options live with the estimator: objects and names, the deprecated keywords and
config keys, ``[method.estimator]``, and a new estimator as one table entry."""

import dataclasses
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import make_problem

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.estimators import ESTIMATORS, Estimator, get_estimator
from dropsplit.training.build import build_method
from dropsplit.training.config import check_resumable, load_config, to_toml

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "synthetic-tiny.toml"


def _examples(out):
    return torch.arange(out.n) % 3


def _gradient(method, name="rnn-locked"):
    """The flattened gradient of one step of ``method`` on a fresh problem."""
    pb = make_problem(name)
    pb.model.zero_grad(set_to_none=True)
    method.step(pb.model, pb.forward_fn, pb.batch)
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(pb.model)])


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_object_and_name_give_the_same_gradient(name):
    by_name = _gradient(ds.Analytic("sampled", True, gradient=name, seed=5))
    by_object = _gradient(ds.Analytic("sampled", True, gradient=ESTIMATORS[name](), seed=5))
    assert torch.equal(by_name, by_object)


@pytest.mark.parametrize(
    "gradient, estimator",
    [("double-backward", ds.DoubleBackward()), ("hvp-difference", ds.HVPDifference())],
    ids=["double-backward", "hvp-difference"],
)
def test_dropout_k_object_and_name_give_the_same_gradient(gradient, estimator):
    by_name = _gradient(ds.DropoutK(2, "analytic", gradient=gradient, seed=5))
    by_object = _gradient(ds.DropoutK(2, "analytic", gradient=estimator, seed=5))
    assert torch.equal(by_name, by_object)


@pytest.mark.parametrize("name", ["mlp-two-sites", "rnn-locked", "qrnn-lm", "transformer-lm"])
@pytest.mark.parametrize("curvature", ["sampled", "identity"])
def test_double_backward_batched_or_not_gives_the_same_gradient(name, curvature):
    """Two backwards and one batched backward are the same exact gradient (same draws)."""
    two = _gradient(
        ds.Analytic(curvature, True, gradient=ds.DoubleBackward(batched=False), seed=3), name
    )
    one = _gradient(
        ds.Analytic(curvature, True, gradient=ds.DoubleBackward(batched=True), seed=3), name
    )
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-7)
    assert two.abs().max() > 0


def test_double_backward_batched_must_be_a_bool():
    with pytest.raises(TypeError, match="batched must be a bool, got str"):
        ds.DoubleBackward(batched="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "keyword, value, gradient, estimator",
    [
        ("hvp_step", 1e-4, "hvp-difference", ds.HVPDifference(step=1e-4)),
        ("fd_epsilon", 0.1, "finite-difference", ds.FiniteDifference(epsilon=0.1)),
        ("fd_examples", _examples, "finite-difference", ds.FiniteDifference(examples=_examples)),
    ],
    ids=["hvp_step", "fd_epsilon", "fd_examples"],
)
def test_deprecated_keyword_warns_and_gives_the_same_gradient(keyword, value, gradient, estimator):
    replacement = f"use gradient=ds.{type(estimator).__name__}"
    with pytest.warns(DeprecationWarning, match=replacement):
        old = ds.Analytic("sampled", True, gradient=gradient, seed=5, **{keyword: value})
    assert old.estimator == estimator and old.gradient == gradient
    new = ds.Analytic("sampled", True, gradient=estimator, seed=5)
    assert torch.equal(_gradient(old), _gradient(new))


def test_dropout_k_deprecated_hvp_step():
    with pytest.warns(DeprecationWarning, match=r"DropoutK\(hvp_step=...\) is deprecated"):
        method = ds.DropoutK(2, "analytic", gradient="hvp-difference", hvp_step=1e-4)
    assert method.estimator == ds.HVPDifference(step=1e-4)


def test_deprecated_keyword_of_another_estimator_is_checked_and_ignored():
    with pytest.warns(DeprecationWarning, match="ignored: 'jvp' has no step"):
        method = ds.Analytic(gradient="jvp", hvp_step=1e-4)
    assert method.estimator == ds.JVP()
    with pytest.raises(ValueError, match=r"step must be in \(0, 0.1\]"):
        ds.Analytic(gradient="double-backward", hvp_step=0.5)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: ds.Analytic(gradient=ds.HVPDifference(), hvp_step=1e-4),
            ValueError,
            "and an estimator object: set step on it",
        ),
        (lambda: ds.Analytic(step=1e-4), TypeError, "unexpected keyword argument 'step'"),
        (lambda: ds.Analytic(gradient=ds.HVPDifference), TypeError, "pass an instance"),
        (lambda: ds.Analytic(gradient=3), TypeError, "or an estimator object"),
        (lambda: ds.Analytic(gradient="hvp"), ValueError, "gradient must be one of"),
        (
            lambda: ds.DropoutK(2, "analytic", gradient=ds.FiniteDifference()),
            ValueError,
            "cannot give the analytic noise alone",
        ),
    ],
    ids=["keyword-and-object", "unknown-keyword", "class", "int", "unknown-name", "not-separable"],
)
def test_bad_gradient_arguments(make, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(error, match=match):
            make()


def test_repr_shows_the_estimator():
    method = ds.Analytic(gradient=ds.HVPDifference(step=1e-4))
    assert "gradient=HVPDifference(step=0.0001)" in repr(method)


@dataclasses.dataclass(frozen=True)
class HalfWeight(Estimator):
    """A new estimator: the exact path with its regularizers weighted by ``weight``."""

    name: ClassVar[str] = "half-weight"
    CURVATURES: ClassVar[tuple[str, ...]] = ("sampled",)
    SEPARABLE: ClassVar[bool] = True
    weight: float = 0.5

    def estimate(self, model, forward_fn, batch, spec, generator):
        spec = dataclasses.replace(
            spec,
            explicit_scale=self.weight * spec.explicit_scale,
            implicit_scale=self.weight**2 * spec.implicit_scale,
        )
        return ds.DoubleBackward().estimate(model, forward_fn, batch, spec, generator)


def test_a_new_estimator_is_one_table_entry(monkeypatch):
    monkeypatch.setitem(ESTIMATORS, "half-weight", HalfWeight)
    by_name = _gradient(ds.Analytic("sampled", True, gradient="half-weight", seed=5))
    by_object = _gradient(ds.Analytic("sampled", True, gradient=HalfWeight(), seed=5))
    scaled = ds.Analytic("sampled", True, explicit_scale=0.5, implicit_scale=0.25, seed=5)
    assert torch.equal(by_name, by_object)
    assert torch.equal(by_name, _gradient(scaled))
    assert HalfWeight.from_config({"weight": 0.25}) == HalfWeight(0.25)
    with pytest.raises(ValueError, match="takes only curvature|supports curvature"):
        get_estimator("half-weight", "label")


# --- the trainer's [method.estimator] --------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ['method.gradient="hvp-difference"', "method.estimator.epsilon=0.1"],
            r"gradient='hvp-difference' takes step in \[method.estimator\], got epsilon",
        ),
        (
            ['method.gradient="finite-difference"', "method.estimator.step=0.1"],
            "takes epsilon, per_example in \\[method.estimator\\], got step",
        ),
        (
            ["method.estimator.step=0.1"],
            r"gradient='double-backward' takes batched in \[method.estimator\], got step",
        ),
        (
            ['method.gradient="hvp-difference"', "method.estimator.step=0.5"],
            r"step must be in \(0, 0.1\]",
        ),
        (
            ['method.gradient="finite-difference"', 'method.estimator.per_example="yes"'],
            "per_example must be a bool",
        ),
        (["method.estimator=3"], "method.estimator must be a dict"),
    ],
    ids=[
        "hvp-unknown",
        "fd-unknown",
        "double-backward-unknown",
        "bad-step",
        "bad-bool",
        "no-table",
    ],
)
def test_bad_estimator_table_is_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(TINY, overrides)


LEGACY = """
[method]
name = "analytic"
gradient = "{gradient}"
fd_epsilon = 0.1
fd_per_example = false
hvp_step = 0.002
"""


@pytest.mark.parametrize(
    "gradient, table",
    [
        ("hvp-difference", "step = 0.002"),
        ("finite-difference", "epsilon = 0.1\nper_example = false"),
        ("double-backward", ""),
    ],
    ids=["hvp-difference", "finite-difference", "double-backward"],
)
def test_old_config_loads_to_the_new_form_and_resumes(tmp_path, gradient, table):
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text(LEGACY.format(gradient=gradient))
    new.write_text(f'[method]\nname = "analytic"\ngradient = "{gradient}"\n')
    if table:
        new.write_text(new.read_text() + f"\n[method.estimator]\n{table}\n")
    with pytest.warns(DeprecationWarning, match="config key method.hvp_step is deprecated"):
        loaded = load_config(old)
    assert loaded == load_config(new)
    check_resumable(old, load_config(new))  # an old run resumed with the new form
    written = tmp_path / "written.toml"
    written.write_text(to_toml(loaded))
    assert load_config(written) == loaded


def test_old_config_key_and_its_new_option_together_is_an_error(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text(
        LEGACY.format(gradient="hvp-difference") + "\n[method.estimator]\nstep = 1e-3\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match="both method.hvp_step and method.estimator.step"):
            load_config(path)


@pytest.mark.parametrize("per_example", [True, False], ids=["per-example", "one-slope"])
def test_the_trainer_offers_its_batch_layout(per_example):
    config = load_config(
        TINY,
        [
            'method.name="analytic"',
            'method.gradient="finite-difference"',
            f"method.estimator.per_example={str(per_example).lower()}",
        ],
    )
    method = build_method(config.method, seed=0, columns=4)
    assert isinstance(method, ds.Analytic)
    assert (method.estimator.examples is not None) == per_example
    assert method.estimator.epsilon == 0.05


def test_default_config_is_per_example_finite_difference():
    config = load_config(TINY, ['method.name="analytic"', 'method.gradient="finite-difference"'])
    assert config.method.estimator == {"epsilon": 0.05, "per_example": True}
