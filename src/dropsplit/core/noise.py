r"""The dropout noise law and the theory coefficients derived from it (paper Section 2).

Inverted dropout multiplies a tensor ``h`` by ``m / (1 - q)`` with ``m ~ Bernoulli(1 - q)``.
Writing the result as ``(1 + eta) * h`` gives the noise law

.. math::
    \eta = -1 \text{ w.p. } q, \qquad \eta = \tfrac{q}{1-q} \text{ w.p. } 1-q,
    \qquad \mathbb{E}[\eta] = 0, \quad \operatorname{Var}[\eta] = \tfrac{q}{1-q}.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_probability(p: float, argument: str = "p") -> float:
    """Validate a drop probability.

    Args:
        p: Drop probability.
        argument: Argument name used in the error message.

    Returns:
        ``p`` as a float.

    Raises:
        TypeError: If ``p`` is not a real number.
        ValueError: If ``p`` is outside ``[0, 1)``.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{argument} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{argument} must be in [0, 1), got {p}")
    return float(p)


def noise_variance(q: float) -> float:
    r"""Variance of the dropout noise, :math:`v = \operatorname{Var}[\eta] = q/(1-q)`.

    This is the variance scale of the implicit (gradient-noise) term xi_approx (paper Sec. 3.2).

    Args:
        q: Drop probability in ``[0, 1)``.

    Returns:
        ``q / (1 - q)``.
    """
    q = check_probability(q, "q")
    return q / (1.0 - q)


def explicit_coefficient(q: float) -> float:
    r"""Coefficient of the explicit regularizer, :math:`\lambda = q / (2(1-q))` (paper Sec. 3.1).

    The second-order Taylor expansion of the expected dropout loss has
    :math:`\tfrac12 \operatorname{Var}[\eta]` in front of the curvature term.

    Args:
        q: Drop probability in ``[0, 1)``.

    Returns:
        ``q / (2 (1 - q))``.
    """
    return noise_variance(q) / 2.0


def mask_shape(shape: Sequence[int], shared_dims: Sequence[int]) -> tuple[int, ...]:
    """Shape of a dropout mask that is shared along ``shared_dims``.

    Args:
        shape: Shape of the tensor the mask multiplies.
        shared_dims: Dimensions (negative allowed) along which one mask value is shared.

    Returns:
        ``shape`` with every shared dimension set to 1.

    Raises:
        ValueError: If a shared dimension does not exist for ``shape``.
    """
    out = list(shape)
    for d in shared_dims:
        if not -len(out) <= d < len(out):
            raise ValueError(f"shared dim {d} is out of range for a tensor of shape {tuple(shape)}")
        out[d] = 1
    return tuple(out)


HALF_PRECISION = (torch.float16, torch.bfloat16)


def _uniform(
    shape: Sequence[int],
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.device]:
    """Uniform draws on the generator's device (float32 for half precision), and the target device.

    A bfloat16 uniform has 8 bits of mantissa: ``u >= 0.1`` then keeps 0.898 instead of 0.9
    of the elements (a biased mask), so half-precision draws are made in float32 (the
    comparison is exact there) and only the result is cast. Float32 and float64 draw in
    their own dtype, as they always have, so their masks do not change.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_device = generator.device if generator is not None else device
    draw_dtype = torch.float32 if dtype in HALF_PRECISION else dtype
    u = torch.rand(tuple(shape), generator=generator, device=draw_device, dtype=draw_dtype)
    return u, device


def sample_multiplier(
    shape: Sequence[int],
    q: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the dropout multiplier ``1 + eta`` of the paper's noise law.

    Args:
        shape: Shape of the multiplier.
        q: Drop probability in ``[0, 1)``.
        generator: Source of randomness (the global RNG when ``None``).
        dtype: Floating dtype of the result (the dtype of the tensor it multiplies).
        device: Device of the result.

    Returns:
        A tensor with entries ``0`` (probability ``q``) and ``1 / (1 - q)``.
    """
    u, device = _uniform(shape, generator, dtype, device)
    keep = (u >= q).to(dtype)
    return (keep / (1.0 - q)).to(device)


def sample_rademacher(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw i.i.d. signs ``r`` uniform on ``{-1, +1}``.

    Used in place of ``eta / sqrt(v)`` in xi_approx: it has the same mean and covariance
    (paper Sec. 3.2), so the implicit noise keeps dropout's covariance.

    Args:
        shape: Shape of the result.
        generator: Source of randomness (the global RNG when ``None``).
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        A tensor of ``-1.0`` and ``+1.0``.
    """
    u, device = _uniform(shape, generator, dtype, device)
    return torch.where(u < 0.5, -1.0, 1.0).to(dtype=dtype, device=device)
