"""Measurements of both effects of dropout on any model with sites (no gradient step is taken).

:mod:`~dropsplit.measure.quantities` holds the three quantities (the explicit gap, its predicted
regularizer, draws of the gradient noise); :mod:`~dropsplit.measure.effects` runs them per site
over several batches and summarizes, prints and plots the result.
"""

from dropsplit.measure.effects import format_effects, measure_effects, noise_scale, plot_effects
from dropsplit.measure.quantities import (
    GapEstimate,
    explicit_gap,
    explicit_regularizer,
    full_curvature,
    gradient_noise,
    minibatch_noise,
)

__all__ = [
    "GapEstimate",
    "explicit_gap",
    "explicit_regularizer",
    "format_effects",
    "full_curvature",
    "gradient_noise",
    "measure_effects",
    "minibatch_noise",
    "noise_scale",
    "plot_effects",
]
