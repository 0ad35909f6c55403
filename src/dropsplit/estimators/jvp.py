r"""Exact directional derivatives by forward-mode over reverse-mode AD (ours).

The gradients of the analytic terms are derivatives along the exact directions of
:mod:`~dropsplit.estimators.hvp_difference`. With ``G^P`` the gate gradient of the curvature
probe ``P`` (:func:`~dropsplit.core.explicit.curvature_probe`) and the true-label loss ``L``
(both summed over the ``N`` targets),

.. math::
    \nabla_W \lambda R = \frac{\partial}{\partial t} \nabla_W P(W; 1 + t d) \Big|_{t=0},
    \qquad d = \frac{2 s \lambda}{N} G^P \ \text{(held fixed; Sec. 3.1)},

.. math::
    \xi_{approx} = \nabla_W S = \frac{\partial}{\partial t} \nabla_W L(W; 1 + t d')
    \Big|_{t=0}, \qquad d' = \frac{\sqrt{s' v}}{N} r \ \text{(Sec. 3.2)},

where ``P(W; g)`` is the probe with the sites' gates at ``g``. ``hvp-difference`` replaces the
``t``-derivative by a one-sided difference; here it is exact: the sites multiply by dual
numbers :math:`1 + \epsilon d` (``torch.autograd.forward_ad``), and ``torch.autograd.grad``
of the primal scalar runs the reverse pass on dual tensors (autograd keeps the forward
tangents with the tensors it saves), so each parameter gradient comes back as
:math:`\nabla_W P + \epsilon\, \partial_t \nabla_W P` (forward over reverse). The values are
exact too: the explicit term from ``G^P``, the implicit scalar :math:`S = D_{d'} L` as the
tangent of ``L``. Same draws, same order of the generator's use, same results as
:mod:`~dropsplit.estimators.double_backward`, to rounding: no step, no :math:`O(t)` error.

Why not differences: on a ReLU network the one-sided difference crosses kinks. A unit whose
pre-activation changes sign between gates ``1`` and ``1 + t d`` switches its part of
:math:`\nabla_W P` by :math:`O(1)`, and the difference divides that by ``t``; the share of
units that cross is :math:`O(t)`, so the error is :math:`O(1)` in expectation at every step
(rare but large at small steps) instead of :math:`O(t)`. Double backward and this estimator
both take ReLU'' = 0, the derivative that exists almost everywhere. Measured on a
two-hidden-layer ReLU MLP with dropout 0.5 (64 examples, widths 64, float64,
``tests/test_jvp.py``): ``hvp-difference`` at its default step is 12.5 times the gradient's
norm off, with 2 of 8192 hidden units crossing zero along the implicit direction; at step
1e-5 no unit crosses and it is 5e-6 off; this estimator is 3e-16 off. On the GELU and tanh
twins the difference is 6e-4 off (``bench/estimator_cost.py``).

Passes: the gated forward and one backward to the gates give ``d`` (only with the explicit
term, as for ``hvp-difference``; without it the gated forward builds no graph); then one dual
forward and dual reverse pass per term, one in all for ``curvature="label"`` with the
implicit term (the probe is ``L`` itself and the derivative is linear in the direction: one
pass along :math:`d + d'`). The implicit pass's primal gradient is :math:`\nabla_W L`, the
clean gradient, so with the implicit term the clean loss costs no backward of its own;
without it, the gated graph is backpropagated once more. Modules with a
``differentiated_twice`` attribute are told that the dual passes are differentiated twice, so
they run their twice-differentiable paths: the fused CPU kernels (oneDNN LSTM, flash
attention) have no forward-mode derivative.

Cost: one dual pass per direction, where double backward differentiates one scalar
(:math:`\langle d, G^P \rangle + \langle d', G^y \rangle` plus the loss) in one reverse pass
for both terms and needs no weight gradients in its first backward. So this path is exact but
not cheaper than double backward: 1.1 to 2.7 times its step on the CPU
(``docs/results/estimator_cost.md``). Batching the two tangents with ``torch.func.vmap`` saves
only the shared primal forward and was twice as slow on the LSTM (the loop's batching
overhead); reverse over forward fails inside PyTorch's forward-mode formulas of
``log_softmax`` and ``softmax`` (an in-place update of a saved output).

Memory: at most one graph is alive at a time: the gated graph is freed before the first dual
forward, and each dual graph right after its reverse pass; the tangent gradients add up in one
buffer that enters the surrogate as a zero-valued linear term
(:func:`~dropsplit.estimators.hvp_difference.inject`). A dual graph also holds the graph of
the forward tangents (autograd records them: they depend on ``W``), so the peak is near
double backward's (AWD-LSTM at the small size: 451 against 504 MiB, ``hvp-difference`` 170,
DropoutK(1) 93; resident-set rise as ``dropsplit bench`` measures it, one run).

Precision: no differences are taken, so bfloat16 and float16 run (with their own rounding,
like double backward in that precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from dropsplit.core.forward import (
    ForwardFn,
    call_forward,
    gated_forward,
    trainable_parameters,
    uncompiled,
)
from dropsplit.core.losses import Loss
from dropsplit.core.sites import SiteContext, site_context
from dropsplit.estimators.base import Estimate, Estimator, EstimatorSpec, check_curvature
from dropsplit.estimators.hvp_difference import (
    Gradients,
    explicit_directions,
    implicit_directions,
    inject,
)

__all__ = ["JVP", "directional_gradients", "dual_sites"]


@contextlib.contextmanager
def dual_sites(model: nn.Module, directions: Sequence[torch.Tensor]) -> Iterator[SiteContext]:
    r"""Drive the sites at gates :math:`1 + \epsilon d` (call inside ``fwAD.dual_level()``).

    The outer ``"gate"`` context runs no site: it only tells the modules that the pass will be
    differentiated twice (their twice-differentiable paths have forward-mode derivatives, and
    ``site_context`` gives ``"fixed"`` passes no such flag); the inner ``"fixed"`` context
    drives the sites.

    Args:
        model: The model.
        directions: One tangent ``d`` per site call of the gated forward, in call order.

    Yields:
        The ``"fixed"`` context (its record holds the dual multipliers).
    """
    multipliers = [fwAD.make_dual(torch.ones_like(d), d) for d in directions]
    with (
        site_context(model, SiteContext("gate")),
        site_context(model, SiteContext("fixed", multipliers=multipliers)) as ctx,
    ):
        yield ctx


def directional_gradients(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    loss: Loss,
    params: list[nn.Parameter],
    directions: Sequence[torch.Tensor],
    function: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[Gradients, Gradients, torch.Tensor]:
    r"""``grad_W f`` and its derivative along ``d`` at gates 1, ``f`` a function of the logits.

    One dual forward at gates :math:`1 + \epsilon d`, then the reverse pass of the primal
    scalar on dual tensors; its graph is freed before returning.

    Args:
        model: The model.
        forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
        batch: Passed to ``forward_fn``.
        loss: The loss family (checks the forward's output).
        params: The parameters to differentiate.
        directions: One tangent per site call, in call order.
        function: ``logits -> scalar`` (the probe, or the summed true-label loss).

    Returns:
        ``(grad_W f, d/dt grad_W f, d/dt f)`` at gates 1 (``None`` for a parameter that does
        not reach ``f``, or whose gradient does not move along ``d``).

    Raises:
        NotImplementedError: When an op of the model has no forward-mode derivative in PyTorch
            (e.g. the fused CUDA LSTM cell), naming it.
    """
    with fwAD.dual_level():
        try:
            with dual_sites(model, directions):
                out = call_forward(forward_fn, model, batch, loss)
            value = function(out.logits)
            grads = torch.autograd.grad(value, params, allow_unused=True)
        except NotImplementedError as error:
            if "forward AD" not in str(error):
                raise
            reason = str(error).splitlines()[0]
            raise NotImplementedError(
                "gradient='jvp' needs the forward-mode derivative of every op of the model's "
                f"forward and backward, and PyTorch has none for one of them ({reason}); use "
                "gradient='double-backward'"
            ) from error
        primals: Gradients = []
        tangents: Gradients = []
        for g in grads:
            primal, tangent = (None, None) if g is None else fwAD.unpack_dual(g)
            primals.append(primal)
            tangents.append(tangent)
        slope = fwAD.unpack_dual(value).tangent
    slope = value.new_zeros(()) if slope is None else slope.detach()
    return primals, tangents, slope


def _add(total: Gradients, grads: Gradients, scale: float = 1.0) -> Gradients:
    """``total + scale * grads``, ``None`` counting as zero."""
    out: Gradients = []
    for t, g in zip(total, grads, strict=True):
        if g is not None:
            g = g if scale == 1.0 else scale * g
        out.append(g if t is None else t if g is None else t + g)
    return out


@dataclass(frozen=True)
class JVP(Estimator):
    """``gradient="jvp"``: exact directional derivatives, forward over reverse; no options."""

    name: ClassVar[str] = "jvp"
    CURVATURES: ClassVar[tuple[str, ...]] = ("sampled", "label", "identity")
    SEPARABLE: ClassVar[bool] = True

    def estimate(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        batch: Any,
        spec: EstimatorSpec,
        generator: torch.Generator,
    ) -> Estimate:
        """Build the surrogate of Analytic's objective from exact directional derivatives.

        The labels (or ``u``) and signs are drawn from ``generator`` in the order of the
        double-backward path, so both paths see the same draws and give the same gradient.

        Args:
            model: The model (its sites are gated, then driven by dual multipliers).
            forward_fn: ``(model, batch) -> (logits, targets[, aux])``.
            batch: Passed to ``forward_fn``.
            spec: The terms and their scales.
            generator: Source of the labels and signs.

        Returns:
            The estimate; backpropagate ``surrogate`` (or, with ``spec.with_loss`` ``False``,
            ``regularizers``).

        Raises:
            ValueError: On an unsupported curvature or a forward that uses no site.
        """
        check_curvature(self.name, self.CURVATURES, spec.curvature)
        model = uncompiled(model, "gradient='jvp'")  # compiled graphs have no forward-mode AD
        loss = spec.loss
        # the implicit pass alone needs only the gates' shapes from this forward, not its graph
        graph = spec.curvature is not None or not spec.implicit
        with (
            torch.profiler.record_function("dropsplit.jvp.gated_forward"),
            torch.set_grad_enabled(graph and torch.is_grad_enabled()),
        ):
            out, ctx = gated_forward(model, forward_fn, batch, loss, spec.grouping, twice=False)
        n, gates, qs = out.n, ctx.gates, [site.p for site, _ in ctx.record]
        params = trainable_parameters(model)
        summed = loss.summed(out.logits, out.targets)
        clean_loss = (summed / n).detach()
        true_loss = partial(loss.summed, targets=out.targets)
        # (label, directions, the function of the logits whose gradient moves along them)
        moves: list[tuple[str, list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = []
        terms, explicit = None, None
        if spec.curvature is not None:
            probe, _, terms, directions = explicit_directions(
                out, gates, qs, spec, generator, "jvp"
            )
            terms = [term.detach() for term in terms]
            explicit = torch.stack(terms).sum()
            moves.append(("explicit", directions, probe))
        if spec.implicit:
            directions = implicit_directions(gates, qs, n, spec.implicit_scale, generator)
            if spec.curvature == "label":
                # the probe is L itself and the derivative is linear in the direction: one pass
                # along d + d' gives both gradients
                ((_, along, _),) = moves
                both = [a + b for a, b in zip(along, directions, strict=True)]
                moves = [("label_implicit", both, true_loss)]
            else:
                moves.append(("implicit", directions, true_loss))
        total: Gradients = [None] * len(params)
        if spec.with_loss and not spec.implicit:
            # no implicit pass to give the clean gradient: take it from the gated graph
            with torch.profiler.record_function("dropsplit.jvp.clean_backward"):
                grads = torch.autograd.grad(summed / n, params, allow_unused=True)
            total = _add(total, list(grads))
        aux, record = out.aux, ctx.record
        # free the gated graph before the dual passes (the "label" probe holds on to ``out``)
        out.logits = out.logits.detach()
        del out, ctx, summed, gates
        implicit = None
        for label, directions, function in moves:
            with torch.profiler.record_function(f"dropsplit.jvp.{label}_pass"):
                primals, tangents, slope = directional_gradients(
                    model, forward_fn, batch, loss, params, directions, function
                )
            total = _add(total, tangents)
            if label == "implicit":
                implicit = slope  # S = D_{d'} L, exactly
            elif label == "label_implicit":
                assert explicit is not None
                implicit = slope - 2 * explicit  # D_{d + d'} L = S + D_d L, and D_d L = 2 lambda R
            if label != "explicit" and spec.with_loss:
                total = _add(total, primals, 1.0 / n)  # grad_W L at gates 1: the clean gradient
            del primals, tangents
        value = clean_loss.new_zeros(())
        for part in (explicit, implicit):
            value = value if part is None else value + part
        injected = value + inject(total, params)
        return Estimate(
            surrogate=clean_loss + injected if spec.with_loss else injected,
            regularizers=None if spec.with_loss else injected,
            loss=clean_loss,
            explicit=explicit,
            explicit_terms=terms,
            implicit=implicit,
            record=record,
            aux=aux,
        )
