"""dropsplit: the explicit and implicit regularization effects of dropout, separated.

Wei, Kakade & Ma, "The Implicit and Explicit Regularization Effects of Dropout", ICML 2020.
"""

from dropsplit import oracles
from dropsplit.baselines import Fraternal, RDrop, matching_strength
from dropsplit.core.losses import CrossEntropy, SquaredError
from dropsplit.core.noise import explicit_coefficient, noise_variance, sample_multiplier
from dropsplit.core.sites import (
    DropConnect,
    Dropout,
    Site,
    SiteContext,
    checkpoint_kwargs,
    named_sites,
    replay_masks,
    site_context,
    sites,
)
from dropsplit.core.unsited import UnsitedDropoutError
from dropsplit.estimators import JVP, DoubleBackward, FiniteDifference, HVPDifference
from dropsplit.integrations import ExampleDropout, convert
from dropsplit.measure import (
    GapEstimate,
    explicit_gap,
    explicit_regularizer,
    full_curvature,
    gradient_noise,
    minibatch_noise,
)
from dropsplit.methods import Analytic, DropoutK, Method, NoDropout, StepResult

__version__ = "0.1.0"

__all__ = [
    "Analytic",
    "CrossEntropy",
    "DoubleBackward",
    "DropConnect",
    "Dropout",
    "DropoutK",
    "ExampleDropout",
    "FiniteDifference",
    "Fraternal",
    "GapEstimate",
    "HVPDifference",
    "JVP",
    "Method",
    "NoDropout",
    "RDrop",
    "Site",
    "SiteContext",
    "SquaredError",
    "StepResult",
    "UnsitedDropoutError",
    "checkpoint_kwargs",
    "convert",
    "explicit_coefficient",
    "explicit_gap",
    "explicit_regularizer",
    "full_curvature",
    "gradient_noise",
    "matching_strength",
    "minibatch_noise",
    "named_sites",
    "noise_variance",
    "oracles",
    "replay_masks",
    "sample_multiplier",
    "site_context",
    "sites",
]
