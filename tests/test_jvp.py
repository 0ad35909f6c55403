"""The forward-over-reverse estimator against the double-backward path (same draws, exact)."""

import copy

import pytest
import torch
from conftest import PROBLEMS, Problem, make_problem, mlp_forward
from test_hvp_difference import CASES
from torch import nn

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.core.losses import CrossEntropy
from dropsplit.estimators import EstimatorSpec
from dropsplit.models import awd


class TwoLayerMLP(nn.Module):
    """Two hidden layers with elementwise dropout 0.5 after each activation.

    With ``record`` set, every forward appends its hidden pre-activations to ``calls``.
    """

    def __init__(self, activation, d_in=4, width=8, classes=3, p=0.5):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d_in, width), nn.Linear(width, width)
        self.head = nn.Linear(width, classes)
        self.activation = activation
        self.drop1 = ds.Dropout(p, label="hidden.1")
        self.drop2 = ds.Dropout(p, label="hidden.2")
        self.record, self.calls = False, []

    def forward(self, x):
        a1 = self.l1(x)
        a2 = self.l2(self.drop1(self.activation(a1)))
        if self.record:
            self.calls.append(torch.cat([a1.detach().flatten(), a2.detach().flatten()]))
        return self.head(self.drop2(self.activation(a2)))


class ConvBN(nn.Module):
    """Conv, BatchNorm (train mode: batch statistics), ReLU, channel dropout, dropout, head."""

    def __init__(self, channels=4, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.channel_dropout = ds.Dropout(0.2, shared_dims=(2, 3), label="channel")
        self.hidden_dropout = ds.Dropout(0.5, label="hidden")
        self.head = nn.Linear(channels * 25, classes)

    def forward(self, x):
        h = self.channel_dropout(torch.relu(self.norm(self.conv(x))))
        return self.head(self.hidden_dropout(h.flatten(1)))


def _step(pb, case, gradient, seed=7, **kwargs):
    """One step of Analytic from zeroed gradients: its gradient, flattened, and its stats."""
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
    pb.model.zero_grad(set_to_none=True)  # a step adds to .grad, as backward does
    result = method.step(pb.model, pb.forward_fn, pb.batch)
    grad = torch.cat([p.grad.reshape(-1) for p in trainable_parameters(pb.model)])
    return grad, result.stats


ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh}


def make(name: str, seed: int = 0) -> Problem:
    """The shared problems, plus the MLPs, the conv net and the LSTM LM of this file."""
    torch.manual_seed(seed)
    if name.startswith("mlp2-"):
        model = TwoLayerMLP(ACTIVATIONS[name.removeprefix("mlp2-")])
        return Problem(name, model, mlp_forward, (torch.randn(6, 4), torch.randint(0, 3, (6,))))
    if name == "conv-bn":
        batch = (torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,)))
        return Problem(name, ConvBN(), mlp_forward, batch)
    if name == "lstm-lm":
        sites = dict(p_input=0.2, p_hidden=0.2, p_output=0.2, p_weight=0.2, p_embedding=0.2)
        model = awd.AWDLSTM(5, 3, 4, 2, **sites)
        batch = (torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3)), None)
        return Problem(name, model, awd.lm_forward, batch)
    return make_problem(name, seed)


NAMES = [*PROBLEMS, "mlp2-relu", "mlp2-gelu", "mlp2-tanh", "conv-bn", "lstm-lm"]


def _close(actual, expected, msg=""):
    """Equal to rounding (float64): no step, no O(step) term."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = float(expected.norm()) if expected.dim() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * scale, msg=msg)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_double_backward(name, case):
    pb = make(name)
    exact, exact_stats = _step(pb, case, "double-backward")
    estimate, stats = _step(pb, case, "jvp")
    assert stats.keys() == exact_stats.keys()
    for key in exact_stats:  # the implicit scalar too: it is the tangent of L, not a difference
        _close(stats[key], exact_stats[key], msg=key)
    _close(estimate, exact)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_k_analytic_noise_equals_double_backward(name):
    pb = make(name)
    params = trainable_parameters(pb.model)
    grads = {}
    for gradient in ("double-backward", "jvp"):
        method = ds.DropoutK(3, "analytic", gradient=gradient, seed=11)
        pb.model.zero_grad(set_to_none=True)
        stats = method.step(pb.model, pb.forward_fn, pb.batch).stats
        grads[gradient] = (torch.cat([p.grad.reshape(-1) for p in params]), stats)
    (exact, exact_stats), (estimate, stats) = grads["double-backward"], grads["jvp"]
    _close(stats["loss"], exact_stats["loss"])
    _close(stats["implicit"], exact_stats["implicit"])
    _close(estimate, exact)


@pytest.mark.parametrize("with_loss", [True, False], ids=["with-loss", "regularizers-only"])
def test_separable_like_hvp_difference(with_loss):
    """With the loss, only the surrogate; without, the regularizers carry the whole gradient."""
    pb = make("mlp2-tanh")
    params = trainable_parameters(pb.model)
    spec = EstimatorSpec(CrossEntropy(), "sampled", True, with_loss=with_loss)
    exact = ds.DoubleBackward().estimate(
        pb.model, pb.forward_fn, pb.batch, spec, torch.Generator().manual_seed(3)
    )
    est = ds.JVP().estimate(
        pb.model, pb.forward_fn, pb.batch, spec, torch.Generator().manual_seed(3)
    )
    assert (est.regularizers is None) == with_loss
    want = exact.surrogate if with_loss else exact.regularizers
    got = est.surrogate if with_loss else est.regularizers
    assert got is not None and want is not None
    flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(s, params)]) for s in (got, want)]
    _close(flat[0], flat[1])
    _close(got.detach(), want.detach())  # the same value too


def test_hvp_difference_crosses_relu_kinks_where_jvp_is_exact():
    """The one-sided difference moves hidden units across ReLU's kink; the derivative does not.

    A unit whose pre-activation changes sign between gates 1 and 1 + t d switches its part of
    the parameter gradient by O(1), and the difference divides that by t. Double backward and
    jvp take ReLU'' = 0 (exact almost everywhere). A finding, not a tolerance: 64 examples,
    widths 64, dropout 0.5, float64; measured 12.5 times the gradient's norm off with two units
    crossing at the default step, 5e-6 off with none crossing at step 1e-5.
    """
    torch.manual_seed(0)
    model = TwoLayerMLP(torch.relu, d_in=32, width=64, classes=10)
    pb = Problem(
        "relu-wide", model, mlp_forward, (torch.randn(64, 32), torch.randint(0, 10, (64,)))
    )
    exact, _ = _step(pb, "sampled+implicit", "double-backward")
    estimate, _ = _step(pb, "sampled+implicit", "jvp")
    _close(estimate, exact)

    def hvp_error_and_crossings(step):
        model.record, model.calls = True, []
        grad, _ = _step(pb, "sampled+implicit", ds.HVPDifference(step=step))
        model.record = False
        clean, *moved = model.calls  # the gated forward, then one forward per direction
        crossed = sum(int(((clean > 0) != (m > 0)).sum()) for m in moved)
        return float((grad - exact).norm() / exact.norm()), crossed

    error, crossed = hvp_error_and_crossings(1e-3)  # the default step
    assert crossed >= 1 and error > 1.0, (error, crossed)
    error, crossed = hvp_error_and_crossings(1e-5)  # no unit crosses: O(step) again
    assert crossed == 0 and error < 1e-4, (error, crossed)


def test_smooth_twins_agree_with_the_difference():
    """GELU and tanh have no kinks: hvp-difference is O(step) off there, as the issue saw."""
    for name in ("mlp2-gelu", "mlp2-tanh"):
        pb = make(name)
        exact, _ = _step(pb, "sampled+implicit", "double-backward")
        estimate, _ = _step(pb, "sampled+implicit", "hvp-difference")
        assert float((estimate - exact).norm() / exact.norm()) < 5e-3


def test_transformer_with_fused_attention_runs_its_twice_differentiable_path():
    """No attention site acting: the clean forward may use the fused kernel, the dual passes
    (which it cannot differentiate in forward mode) take the explicit path."""
    from conftest import tiny_transformer

    torch.manual_seed(0)
    model = tiny_transformer(p_attention=0.0)
    batch = (torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4, 3)), None)
    pb = Problem("transformer-fused", model, awd.lm_forward, batch)
    exact, _ = _step(pb, "sampled+implicit", "double-backward")
    estimate, _ = _step(pb, "sampled+implicit", "jvp")
    _close(estimate, exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_and_agrees_with_double_backward(dtype):
    """Nothing is differenced, so half precision only rounds (measured 7e-3 bf16, 7e-4 fp16)."""
    pb = make("mlp2-tanh")
    x, y = pb.batch
    half = Problem("half", copy.deepcopy(pb.model).to(dtype), mlp_forward, (x.to(dtype), y))
    exact, _ = _step(half, "sampled+implicit", "double-backward")
    estimate, _ = _step(half, "sampled+implicit", "jvp")
    assert estimate.dtype == dtype
    error = float((estimate - exact).double().norm() / exact.double().norm())
    assert error < 3e-2, error


def test_unsupported_curvature_is_refused():
    with pytest.raises(ValueError, match="jvp"):
        ds.Analytic("exact", gradient="jvp")


@pytest.mark.parametrize(
    "case, forwards",
    [("sampled+implicit", 3), ("sampled", 2), ("label+implicit", 2), ("implicit-only", 2)],
)
def test_one_dual_pass_per_direction(case, forwards):
    """The gated forward, then one dual pass per direction; the label probe shares its pass
    with the implicit term (one direction d + d')."""
    pb = make("mlp2-tanh")
    pb.model.record = True
    _step(pb, case, "jvp")
    assert len(pb.model.calls) == forwards


def test_an_op_without_forward_mode_derivative_is_named():
    """nn.LSTM's oneDNN kernel (float32 on the CPU) has no forward-mode derivative."""

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.site = ds.Dropout(0.3, label="input")
            self.rnn = nn.LSTM(3, 4)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            return self.head(self.rnn(self.site(x))[0]).flatten(0, 1)

    torch.manual_seed(0)
    model = Recurrent().float()
    batch = (torch.randn(4, 2, 3, dtype=torch.float32), torch.randint(0, 5, (8,)))
    with pytest.raises(NotImplementedError, match="gradient='jvp' needs the forward-mode"):
        ds.Analytic(None, True, gradient="jvp").step(model, mlp_forward, batch)
