"""Exact gradients of the analytic terms by double backward (Alg. 2 as the paper writes it).

One gated forward; the gate gradients of the true-label loss and of the curvature probe come
from one backward batched over the two (or two backwards) with ``create_graph=True``; the
explicit term squares them and the implicit scalar signs them (:mod:`dropsplit.core.explicit`,
:mod:`dropsplit.core.implicit`), and the step backpropagates through that graph again: exact,
and the costliest path.

Its floor: per linear layer ``y = x W`` the dropout step does three matrix products (one
forward, two backward). With both terms the exact step does nine: the forward, one
``dx = dy W^T`` per gate gradient (two), and in the second backward the forward's two plus two
per gate-gradient graph (the derivatives of ``dy W^T`` with respect to ``dy`` and ``W``). A product
whose two operands both depend on the sites (attention's ``q k^T``, a DropConnect weight
``(W * m) h``) needs both operand gradients in each gate-gradient backward and costs fifteen
against three. Where matrix products dominate, the exact step with R_approx and xi_approx
therefore costs at least about three dropout steps whatever the implementation, more with
attention or DropConnect; one term alone costs about two (``bench/exact_step_flops.py`` counts
them per model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dropsplit.core.explicit import (
    CURVATURES,
    curvature_probe,
    explicit_terms,
    joint_site_gradients,
    site_gradients,
)
from dropsplit.core.forward import ForwardFn, gated_forward, uncompiled
from dropsplit.core.implicit import implicit_scalar_sum
from dropsplit.estimators.base import Estimate, Estimator, EstimatorSpec, check_curvature

__all__ = ["DoubleBackward"]


@dataclass(frozen=True)
class DoubleBackward(Estimator):
    """``gradient="double-backward"``: the exact gradients (Alg. 2).

    Attributes:
        batched: When both the true-label and the probe gate gradients are needed (the
            implicit term with ``"sampled"`` or ``"identity"`` curvature), take them in one
            backward batched over the two cotangents (``is_grads_batched``), or (``False``) in
            two backwards. The same numbers to rounding; two backwards are usually faster where
            large matrix products dominate, whose double backward under ``vmap`` is slower
            (``BENCHMARKS.md`` measures both). The default stays ``True``: switching it would
            move trained runs by rounding, which takes a new numerics version
            (:data:`dropsplit.training.trainer.NUMERICS`).
    """

    name: ClassVar[str] = "double-backward"
    CURVATURES: ClassVar[tuple[str, ...]] = CURVATURES
    SEPARABLE: ClassVar[bool] = True
    batched: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batched, bool):
            raise TypeError(
                f"DoubleBackward: batched must be a bool, got {type(self.batched).__name__}"
            )

    def estimate(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        batch: Any,
        spec: EstimatorSpec,
        generator: torch.Generator,
    ) -> Estimate:
        """Clean loss plus the scaled explicit terms plus ``S``, differentiable twice.

        Args:
            model: The model (its sites are gated).
            forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
            batch: Passed to ``forward_fn``.
            spec: The terms and their scales.
            generator: Source of the labels, probes and signs.

        Returns:
            The estimate; its surrogate is the exact objective.
        """
        check_curvature(self.name, CURVATURES, spec.curvature)
        model = uncompiled(model, "gradient='double-backward'")
        loss = spec.loss
        with torch.profiler.record_function("dropsplit.double_backward.gated_forward"):
            out, ctx = gated_forward(model, forward_fn, batch, loss, spec.grouping)
        summed = loss.summed(out.logits, out.targets)
        surrogate = summed / out.n
        label_grads = probe_grads = None
        needs_label = spec.implicit or spec.curvature == "label"
        with torch.profiler.record_function("dropsplit.double_backward.gate_gradients"):
            if needs_label and spec.curvature in ("sampled", "identity"):
                probe = curvature_probe(spec.curvature, out, loss, generator)
                if self.batched:
                    label_grads, probe_grads = joint_site_gradients(
                        [summed, probe], out.logits, ctx.gates, create_graph=True
                    )
                else:
                    label_grads = site_gradients(summed, ctx.gates, create_graph=True)
                    probe_grads = site_gradients(probe, ctx.gates, create_graph=True)
            elif needs_label:
                label_grads = site_gradients(summed, ctx.gates, create_graph=True)
        regularizers = explicit = implicit = terms = None
        if spec.curvature is not None:
            terms = explicit_terms(
                out, ctx.record, loss, spec.curvature, generator, True, label_grads, probe_grads
            )
            terms = [spec.explicit_scale * term for term in terms]
            explicit = torch.stack(terms).sum()
            surrogate = surrogate + explicit
            regularizers = explicit
        if spec.implicit:
            assert label_grads is not None
            implicit = implicit_scalar_sum(
                ctx.record, label_grads, out.n, generator, spec.implicit_scale
            )
            surrogate = surrogate + implicit
            regularizers = implicit if regularizers is None else regularizers + implicit
        return Estimate(
            surrogate=surrogate,
            regularizers=regularizers,
            loss=(summed / out.n).detach(),
            explicit=None if explicit is None else explicit.detach(),
            explicit_terms=None if terms is None else [t.detach() for t in terms],
            implicit=None if implicit is None else implicit.detach(),
            record=ctx.record,
            aux=out.aux,
        )
