import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dropsplit.core.noise import (
    check_probability,
    explicit_coefficient,
    mask_shape,
    noise_variance,
    sample_multiplier,
    sample_rademacher,
)


@pytest.mark.parametrize("q", [0.05, 0.1, 0.4, 0.7], ids=lambda q: f"q={q}")
def test_eta_moments(q):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    eta = sample_multiplier((n,), q, g, torch.float64) - 1
    v = q / (1 - q)
    assert abs(eta.mean().item()) < 5 * math.sqrt(v / n)
    # Var(eta^2) = E[eta^4] - v^2; 5 standard errors
    fourth = q + (1 - q) * (q / (1 - q)) ** 4
    assert abs(eta.pow(2).mean().item() - v) < 5 * math.sqrt((fourth - v**2) / n)
    assert abs((eta == -1).double().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)


@given(q=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_multiplier_takes_the_two_values_of_the_law(q, seed):
    m = sample_multiplier((64,), q, torch.Generator().manual_seed(seed), torch.float64)
    assert torch.all((m == 0) | torch.isclose(m, torch.tensor(1 / (1 - q), dtype=torch.float64)))


@given(q=st.floats(0.0, 0.99))
def test_coefficients(q):
    assert noise_variance(q) == pytest.approx(q / (1 - q))
    assert explicit_coefficient(q) == pytest.approx(q / (2 * (1 - q)))


def test_coefficient_values_at_paper_q():
    assert explicit_coefficient(0.4) == pytest.approx(1 / 3)
    assert noise_variance(0.4) == pytest.approx(2 / 3)


def test_mask_dtype_and_device_follow_the_tensor():
    m = sample_multiplier((3, 2), 0.5, None, torch.float16, "cpu")
    assert m.dtype == torch.float16 and m.device.type == "cpu"


def test_rademacher_is_plus_minus_one_with_mean_zero():
    r = sample_rademacher((100_000,), torch.Generator().manual_seed(1), torch.float64)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 5 / math.sqrt(100_000)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_probability_is_a_value_error(p):
    with pytest.raises(ValueError, match="p must be in"):
        check_probability(p)


def test_probability_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="p must be a float"):
        check_probability("0.5")


def test_mask_shape():
    assert mask_shape((5, 3, 4), (0,)) == (1, 3, 4)
    assert mask_shape((2, 3, 4, 4), (-2, -1)) == (2, 3, 1, 1)
    with pytest.raises(ValueError, match="out of range"):
        mask_shape((2, 3), (2,))
