"""R-Drop and fraternal dropout: two dropout passes and a penalty on how much they disagree.

Both are Monte-Carlo relatives of the paper's explicit regularizer (Sec. 3). Write the logits of a
target under a mask as ``z(delta) = z + J delta + O(delta^2)``, where ``delta`` holds one
multiplier deviation per mask group (the grouping rule: a group is the set of elements that share
one mask value), independent across groups, with mean 0 and variance ``v = q / (1 - q)``. Two
independent masks give ``Delta = z1 - z2 = J (delta1 - delta2) + ...``, so

    E[Delta Delta^T] = 2 v sum_g J_g J_g^T          (to second order in delta).

The paper's explicit regularizer of one target is ``lambda R = (v / 2) sum_g J_g^T H J_g``
(``lambda = q / (2 (1 - q))``, Sec. 3), averaged over targets.

* **R-Drop** (Liang et al., 2021): ``(KL(p1 || p2) + KL(p2 || p1)) / 2 = Delta^T H_out Delta / 2
  + O(Delta^3)`` with ``H_out = diag(p) - p p^T`` the Hessian of the cross-entropy in the logits,
  so ``E[penalty] = alpha * v sum_g J_g^T H_out J_g = 2 alpha * lambda R`` with the exact curvature
  (:func:`~dropsplit.measure.quantities.explicit_regularizer` with ``curvature="exact"``).
* **Fraternal dropout** (Zolna et al., 2018): ``kappa * mean_c Delta_c^2`` over the ``C`` logits,
  so ``E[penalty] = kappa * 2 v sum_g ||J_g||^2 / C = 4 kappa * lambda R`` with the identity
  curvature ``H_out = I / C`` (``curvature="identity"``).

The multiples hold for every site kind (elementwise, locked, weight) because only the grouped
Jacobians ``J_g`` enter; they are exact at second order, so their accuracy depends on how small the
logit jump of one dropped unit is, not on ``q`` alone (a dropped unit is a jump ``delta = -1``).
Each method's loss is the mean of its two dropout cross-entropies, whose expectation is already
dropout's (clean loss + ``lambda R``), so at the matching strength (:func:`matching_strength`) the
expected objective carries ``2 lambda R``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dropsplit.core.forward import ForwardFn, ForwardOutput, mean_loss, model_device
from dropsplit.methods import Method, Objective

PENALTY_CURVATURE = {"rdrop": "exact", "fraternal": "identity"}  # the lambda R each one tracks
PENALTY_MULTIPLE = {"rdrop": 2.0, "fraternal": 4.0}  # E[penalty] = multiple * strength * lambda R


def matching_strength(method: str, scale: float = 1.0) -> float:
    """The strength whose expected penalty is ``scale`` times the paper's ``lambda R``.

    ``"rdrop"``: ``alpha = scale / 2`` matches ``explicit_regularizer(curvature="exact")``;
    ``"fraternal"``: ``kappa = scale / 4`` matches the identity-curvature ablation
    (``curvature="identity"``). Second-order in the noise; see the module docstring.

    Args:
        method: ``"rdrop"`` or ``"fraternal"``.
        scale: Multiple of ``lambda R`` wanted (``Analytic``'s ``explicit_scale``).

    Raises:
        ValueError: For another method name or a negative scale.
    """
    if method not in PENALTY_MULTIPLE:
        raise ValueError(f"method must be one of {tuple(PENALTY_MULTIPLE)}, got {method!r}")
    if scale < 0:
        raise ValueError(f"scale must be non-negative, got {scale}")
    return scale / PENALTY_MULTIPLE[method]


class _TwoPasses(Method):
    """Two dropout passes with independent masks; loss = mean CE + strength * ``penalty(z1, z2)``.

    ``stats["penalty"]`` is the penalty without its strength factor (the API's convention).
    """

    def __init__(self, strength: float, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
            raise ValueError(f"{name} must be a non-negative number, got {strength!r}")
        self.strength = float(strength)

    def penalty(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The disagreement of two logit tensors ``[N, C]``, without the strength factor."""
        raise NotImplementedError

    def passes(self, model: nn.Module, forward_fn: ForwardFn, batch: Any) -> list[ForwardOutput]:
        """Two forwards of ``batch``, each with its own fresh masks (the method's draws)."""
        return self.sampled_passes(model, forward_fn, batch, self.spawn(2, model_device(model)))

    def objective(self, model, forward_fn, batch):
        """Mean of the two dropout losses plus strength x penalty; aux of the second pass."""
        self._require(model)
        first, second = self.passes(model, forward_fn, batch)
        loss = (mean_loss(first, self.loss) + mean_loss(second, self.loss)) / 2
        penalty = self.penalty(first.logits, second.logits)
        stats = {"loss": loss.detach(), "penalty": penalty.detach()}
        return Objective(loss + self.strength * penalty, loss, second.aux, stats)


class RDrop(_TwoPasses):
    """R-Drop: two dropout passes, ``alpha`` times their symmetric KL per target.

    ``penalty = alpha * mean_targets (KL(p1 || p2) + KL(p2 || p1)) / 2``, added to the mean of the
    two cross-entropies. The R-Drop paper writes the loss of an example as the *sum* of the two
    negative log-likelihoods plus ``alpha_paper`` times the same symmetric KL / 2; halving it gives
    this form, so ``alpha = alpha_paper / 2`` (their ``alpha = 1`` for language modelling is our
    0.5; their 5 for translation is our 2.5). Implementations that sum the KL over tokens but
    average the NLL change the scale again by the number of tokens. To second order
    ``E[penalty] = 2 alpha lambda R`` with the exact output curvature, so ``alpha = 0.5``
    (:func:`matching_strength`) adds the paper's explicit regularizer once more.

    Args:
        alpha: Strength, ``>= 0`` (``0``: the mean of two dropout losses, i.e. Dropout_2).
        **kwargs: ``loss`` (cross-entropy only), ``seed``, ``nonfinite`` of :class:`Method`.
    """

    def __init__(self, alpha: float = 0.5, **kwargs) -> None:
        super().__init__(alpha, "alpha", **kwargs)
        if self.loss.name != "cross_entropy":
            raise ValueError("RDrop compares softmax distributions: it needs loss='cross_entropy'")
        self.alpha = self.strength

    def __repr__(self) -> str:
        return f"RDrop(alpha={self.alpha})"

    def penalty(self, first, second):
        """``mean_n sum_c (p1 - p2)(log p1 - log p2) / 2``: the symmetric KL / 2 per target."""
        log1, log2 = first.log_softmax(-1), second.log_softmax(-1)
        symmetric = ((log1.exp() - log2.exp()) * (log1 - log2)).sum(-1)
        return symmetric.mean() / 2


class Fraternal(_TwoPasses):
    """Fraternal dropout: two dropout passes, ``kappa`` times the mean squared logit difference.

    ``penalty = kappa * mean over targets and classes of (z1 - z2)^2``, added to the mean of the
    two losses, as in Zolna et al. (their PTB setting: ``kappa = 0.15``). To second order
    ``E[penalty] = 4 kappa lambda R`` with the identity curvature ``H_out = I / C``, so
    ``kappa = 0.25`` (:func:`matching_strength`) adds the identity ablation's regularizer.

    Args:
        kappa: Strength, ``>= 0``.
        **kwargs: ``loss``, ``seed``, ``nonfinite`` of :class:`Method`.
    """

    def __init__(self, kappa: float = 0.15, **kwargs) -> None:
        super().__init__(kappa, "kappa", **kwargs)
        self.kappa = self.strength

    def __repr__(self) -> str:
        return f"Fraternal(kappa={self.kappa})"

    def penalty(self, first, second):
        """``mean (z1 - z2)^2`` over targets and classes."""
        return (first - second).pow(2).mean()
