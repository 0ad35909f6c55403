"""Gradient makers: the paper's training methods (Alg. 1-4) behind one ``step`` interface.

``method.step(model, forward_fn, batch)`` adds the gradient of the method's objective to
``p.grad`` of every trainable parameter, as ``loss.backward()`` does (the caller zeroes, so
micro-batches and other losses accumulate), and returns a :class:`StepResult`. The caller may
own the backward: ``step(..., backward=fn)`` calls ``fn(scalar)`` on the one scalar it
backpropagates (``lambda t: scaler.scale(t).backward()``, ``accelerator.backward``,
``self.manual_backward``). The optimizer, clipping and schedule stay with the caller.
``method.objective(...)`` returns the objective without the backward pass (its ``scalar`` is
what ``step`` backpropagates); with the generator state restored (``load_state_dict``) it is
a deterministic function of the weights, which is how the tests check every gradient.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dropsplit.core.buffers import buffer_scope
from dropsplit.core.explicit import CURVATURES
from dropsplit.core.forward import (
    ForwardFn,
    ForwardOutput,
    autocast_disabled,
    call_forward,
    mean_loss,
    model_device,
    trainable_parameters,
)
from dropsplit.core.losses import Loss, get_loss
from dropsplit.core.sites import (
    GROUPINGS,
    SiteContext,
    require_sites,
    site_batch_dim,
    site_context,
    site_names,
)
from dropsplit.estimators import Estimate, Estimator, EstimatorSpec
from dropsplit.estimators.legacy import estimator_from, pop_keywords

NONFINITE = ("error", "warn")
NOISES = ("difference", "analytic")  # what DropoutK can add back (Alg. 3, Alg. 4)
REPLICATIONS = ("loop", "batch")  # how DropoutK draws its k masks


@dataclass
class StepResult:
    """What one ``step`` returns.

    Attributes:
        loss: The data loss of the step (dropout loss for Dropout_k, clean loss for Analytic).
        aux: The ``aux`` returned by ``forward_fn`` (for Dropout_k: the last replica's).
        stats: Scalars to log: ``loss``, ``objective`` and each regularizer's value
            (``explicit``, ``explicit/<site>``, ``implicit``, ``noise``).
        finite: ``False`` when the objective was not finite and no gradient was written.
    """

    loss: float
    aux: Any = None
    stats: dict[str, float] = field(default_factory=dict)
    finite: bool = True


@dataclass
class Objective:
    """A method's objective before the backward pass.

    Attributes:
        value: The objective (its gradient is the step's gradient unless ``surrogate``).
        loss: The data loss.
        aux: The ``aux`` of ``forward_fn``.
        stats: Scalars to log.
        surrogate: For an estimator: the scalar to backpropagate instead of ``value``.
    """

    value: torch.Tensor
    loss: torch.Tensor
    aux: Any
    stats: dict[str, torch.Tensor]
    surrogate: torch.Tensor | None = None

    @property
    def scalar(self) -> torch.Tensor:
        """The scalar to backpropagate: its gradient is the method's gradient."""
        return self.value if self.surrogate is None else self.surrogate


def _choice(value: Any, options: tuple, argument: str) -> Any:
    if value not in options:
        raise ValueError(f"{argument} must be one of {options}, got {value!r}")
    return value


def tile_batch(batch: Any, k: int, dim: int) -> Any:
    """Repeat every tensor of a (nested) batch ``k`` times along ``dim``."""
    if isinstance(batch, torch.Tensor):
        return torch.cat([batch] * k, dim=dim)
    if isinstance(batch, (tuple, list)):
        return type(batch)(tile_batch(b, k, dim) for b in batch)
    if isinstance(batch, dict):
        return {key: tile_batch(v, k, dim) for key, v in batch.items()}
    return batch


def untile_aux(aux: Any, k: int, dim: int) -> Any:
    """Keep the last replica's slice of every tensor of a (nested) aux along ``dim``."""
    if isinstance(aux, torch.Tensor):
        return aux.chunk(k, dim=dim)[-1]
    if isinstance(aux, (tuple, list)):
        return type(aux)(untile_aux(a, k, dim) for a in aux)
    if isinstance(aux, dict):
        return {key: untile_aux(v, k, dim) for key, v in aux.items()}
    return aux


def _estimate_stats(names: dict, est: Estimate) -> dict[str, torch.Tensor]:
    """The stats of an estimate: ``explicit``, ``explicit/<site>`` and ``implicit``.

    ``explicit/<site>`` sums the terms of a site's calls (a site may be called often).
    """
    stats: dict[str, torch.Tensor] = {}
    if est.explicit_terms is not None:
        for (site, _), term in zip(est.record, est.explicit_terms, strict=True):
            key = f"explicit/{names[site]}"
            stats[key] = stats.get(key, 0.0) + term
    if est.explicit is not None:
        stats["explicit"] = est.explicit
    if est.implicit is not None:
        stats["implicit"] = est.implicit
    return stats


class Method:
    """Base class of the gradient makers.

    Args:
        loss: ``"cross_entropy"`` (token-mean, the default) or ``"squared_error"``.
        seed: Seed of the method's generator (masks, labels, signs); drawn from the global
            RNG when ``None``.
        nonfinite: ``"error"`` raises ``FloatingPointError`` on a non-finite objective;
            ``"warn"`` warns, adds no gradient and returns ``finite=False``.
        overwrite: Deprecated: ``True`` sets ``p.grad`` to the step's gradient (the behaviour
            before gradients accumulated); zero the gradients before each step instead
            (``optimizer.zero_grad()``).
    """

    needs_sites = True

    def __init__(
        self,
        *,
        loss: str | Loss = "cross_entropy",
        seed: int | None = None,
        nonfinite: str = "error",
        overwrite: bool = False,
    ) -> None:
        self.loss = get_loss(loss)
        self.nonfinite = _choice(nonfinite, NONFINITE, "nonfinite")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
        if overwrite:
            warnings.warn(
                "overwrite=True is deprecated: step() adds to p.grad as backward() does; call "
                "optimizer.zero_grad() before each step instead",
                DeprecationWarning,
                stacklevel=2,
            )
        self.overwrite = overwrite
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state, so a step can be replayed and a run resumed."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])

    def spawn(self, n: int, device: torch.device) -> list[torch.Generator]:
        """``n`` fresh generators on ``device``, seeded from the method's generator."""
        seeds = torch.randint(0, 2**62, (n,), generator=self.generator).tolist()
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def objective(self, model: nn.Module, forward_fn: ForwardFn, batch: Any) -> Objective:
        """The method's objective on one batch (draws from the method's generator)."""
        raise NotImplementedError

    def step(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        batch: Any,
        *,
        backward: Callable[[torch.Tensor], Any] | None = None,
    ) -> StepResult:
        """Add the gradient of the objective to ``p.grad`` (as ``backward()`` does).

        Args:
            model: The model (its sites are driven by the method).
            forward_fn: ``(model, batch) -> (logits[N, C], targets[N][, aux])``.
            batch: Passed to ``forward_fn``.
            backward: Called on the one scalar the step backpropagates, in place of
                ``scalar.backward()``: an AMP scaler's ``lambda t: scaler.scale(t).backward()``,
                ``accelerator.backward``, Lightning's ``self.manual_backward``, or a division
                by the number of micro-batches. Its gradient is the method's gradient (for an
                estimator, the gradients it took early enter it as a zero-valued linear term).

        Returns:
            Loss, aux and stats of the step.

        Raises:
            FloatingPointError: On a non-finite objective when ``nonfinite="error"``.
            ValueError: If no parameter of ``model`` requires a gradient (nothing to train).
        """
        if not any(p.requires_grad for p in model.parameters()):
            # else autograd fails deep inside the method, or double backward writes no gradient
            raise ValueError(
                f"{type(self).__name__}.step: no parameter of the model requires a gradient "
                "(every requires_grad is False, or the model has no parameters): nothing to "
                "train; unfreeze the parameters to train (p.requires_grad_(True))"
            )
        with torch.profiler.record_function(f"dropsplit.{type(self).__name__}.step"):
            return self._step(model, forward_fn, batch, backward)

    def _step(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        batch: Any,
        backward: Callable[[torch.Tensor], Any] | None,
    ) -> StepResult:
        # buffers (BatchNorm statistics) move once, in the step's first (real training) pass
        with (
            torch.profiler.record_function(f"dropsplit.{type(self).__name__}.objective"),
            buffer_scope(model, keep_first_pass=True),
        ):
            obj = self.objective(model, forward_fn, batch)
        if self.overwrite:
            for p in trainable_parameters(model):
                p.grad = None
        stats = {key: float(v) for key, v in obj.stats.items()}
        stats["objective"] = float(obj.value.detach())
        if not math.isfinite(stats["objective"]):
            message = (
                f"{type(self).__name__}: non-finite objective (loss {stats['loss']:.4g}, "
                f"objective {stats['objective']}); no gradient was added"
            )
            if self.nonfinite == "error":
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            stats["nonfinite"] = 1.0
            return StepResult(stats["loss"], obj.aux, stats, finite=False)
        with (
            torch.profiler.record_function(f"dropsplit.{type(self).__name__}.backward"),
            autocast_disabled(),  # a backward runs in its forward's dtypes, never autocast
        ):
            if backward is None:
                obj.scalar.backward()
            else:
                backward(obj.scalar)
        return StepResult(stats["loss"], obj.aux, stats)

    def _require(self, model: nn.Module) -> None:
        """Refuse a model without sites, or in eval mode (its dropout is meant to be off).

        A method that drops follows ``model.training`` as ``nn.Dropout`` and ``transformers``'
        own dropout do, by refusing: in eval mode BatchNorm and every framework dropout are
        in inference behaviour, so a dropout step there would silently mix the two.
        """
        if not self.needs_sites:
            return
        require_sites(model, type(self).__name__)
        if not model.training:
            raise ValueError(
                f"{type(self).__name__} trains with dropout, but the model is in eval mode "
                "(model.training is False): call model.train() first (ds.NoDropout gives a "
                "clean step in either mode)"
            )

    def sampled_passes(
        self, model: nn.Module, forward_fn: ForwardFn, batch: Any, generators: list
    ) -> list[ForwardOutput]:
        """One forward of ``batch`` per generator, each with that generator's fresh masks."""
        outs = []
        for g in generators:
            with site_context(model, SiteContext("sample", [g])):
                outs.append(call_forward(forward_fn, model, batch, self.loss))
        return outs


class NoDropout(Method):
    """Plain training: every site is off and the objective is the clean loss."""

    needs_sites = False

    def objective(self, model, forward_fn, batch):
        """Clean token-mean loss."""
        return clean_objective(model, forward_fn, batch, self.loss)


def clean_objective(model: nn.Module, forward_fn: ForwardFn, batch: Any, loss: Loss) -> Objective:
    """The clean token-mean loss, every site off (no dropout, no gates)."""
    with site_context(model, SiteContext("off")):
        out = call_forward(forward_fn, model, batch, loss)
    value = mean_loss(out, loss)
    return Objective(value, value, out.aux, {"loss": value.detach()})


class DropoutK(Method):
    """Dropout_k (Alg. 1): the mean of ``k`` dropout losses with independent masks.

    The objective's expectation is that of dropout; the gradient-noise covariance is divided
    by ``k``. ``noise`` adds back ``sqrt(1 - 1/k)`` times a noise with dropout's covariance:
    ``"difference"`` (Alg. 3: ``(loss(a) - loss(b)) / sqrt(2)`` with two more masks) or
    ``"analytic"`` (Alg. 4: xi_approx with variance ``(1 - 1/k) q / (1 - q)``).

    Args:
        k: Number of masks per step, ``k >= 1`` (``k = 1`` is standard dropout).
        noise: ``None``, ``"difference"`` or ``"analytic"``.
        implementation: ``"loop"`` (``k`` forwards from the same batch; aux of the last) or
            ``"batch"`` (one forward on the batch tiled ``k`` times). Identical masks give
            identical gradients.
        batch_dim: Dimension along which the default ``tile`` repeats batch tensors and the
            default ``untile`` slices aux tensors. ``None`` (default): the batch dimension the
            model's dropout sites use (:func:`~dropsplit.core.sites.site_batch_dim`), e.g. 1
            for the sequence-first LSTM and QRNN, 0 for the batch-first Transformer.
        tile: ``tile(batch, k)`` for batch duplication (default: :func:`tile_batch`).
        untile: ``untile(aux, k)`` mapping the tiled aux back (default: last replica).
        grouping: Mask grouping of the analytic noise.
        gradient: How the analytic noise is differentiated: a separable estimator object
            (``ds.DoubleBackward()``, ``ds.HVPDifference(step=...)``, ``ds.JVP()``) or its name
            in :data:`dropsplit.estimators.ESTIMATORS` (``"double-backward"``: exact;
            ``"hvp-difference"``: the same draws, one-sided differences along them, no double
            backward; ``"jvp"``). Unused without ``noise="analytic"``.
        **kwargs: ``loss``, ``seed``, ``nonfinite`` of :class:`Method`; the deprecated
            ``hvp_step=`` (now ``gradient=ds.HVPDifference(step=...)``) still works, with a
            warning.
    """

    def __init__(
        self,
        k: int = 1,
        noise: str | None = None,
        *,
        implementation: str = "loop",
        batch_dim: int | None = None,
        tile=None,
        untile=None,
        grouping: str = "mask",
        gradient: str | Estimator = "double-backward",
        **kwargs,
    ) -> None:
        legacy = pop_keywords(kwargs)
        super().__init__(**kwargs)
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.noise = _choice(noise, (None, *NOISES), "noise")
        self.implementation = _choice(implementation, REPLICATIONS, "implementation")
        self.grouping = _choice(grouping, GROUPINGS, "grouping")
        self.estimator = estimator_from(
            gradient, legacy, "DropoutK", separable=self.noise == "analytic"
        )
        self.gradient = self.estimator.name
        self.batch_dim = batch_dim
        self.tile = tile
        self.untile = untile

    def __repr__(self) -> str:
        return f"DropoutK(k={self.k}, noise={self.noise!r}, implementation={self.implementation!r})"

    def dropout_loss(
        self, model: nn.Module, forward_fn: ForwardFn, batch: Any, generators: list
    ) -> tuple[torch.Tensor, Any]:
        """Mean dropout loss over ``len(generators)`` replicas, one mask set per generator."""
        k = len(generators)
        if self.implementation == "loop" or k == 1:
            outs = self.sampled_passes(model, forward_fn, batch, generators)
            losses = [mean_loss(out, self.loss) for out in outs]
            return torch.stack(losses).mean(), outs[-1].aux
        dim = site_batch_dim(model) if self.batch_dim is None else self.batch_dim
        tiled = self.tile(batch, k) if self.tile else tile_batch(batch, k, dim)
        with site_context(model, SiteContext("sample", generators)):
            out = call_forward(forward_fn, model, tiled, self.loss)
        aux = self.untile(out.aux, k) if self.untile else untile_aux(out.aux, k, dim)
        return mean_loss(out, self.loss), aux

    def objective(self, model, forward_fn, batch):
        """Mean of ``k`` dropout losses plus the optional ``sqrt(1 - 1/k)``-scaled noise."""
        self._require(model)
        device = model_device(model)
        value, aux = self.dropout_loss(model, forward_fn, batch, self.spawn(self.k, device))
        stats = {"loss": value.detach()}
        scale = self.noise_variance_scale
        if self.noise == "difference" and scale > 0:
            ga, gb = self.spawn(2, device)
            loss_a, _ = self.dropout_loss(model, forward_fn, batch, [ga])
            loss_b, _ = self.dropout_loss(model, forward_fn, batch, [gb])
            noise = math.sqrt(scale) * (loss_a - loss_b) / math.sqrt(2.0)
            stats["noise"] = noise.detach()
            value = value + noise
        elif self.noise == "analytic" and scale > 0:
            (gen,) = self.spawn(1, device)
            spec = EstimatorSpec(
                self.loss,
                None,
                True,
                grouping=self.grouping,
                implicit_scale=scale,
                with_loss=False,
            )
            est = self.estimator.estimate(model, forward_fn, batch, spec, gen)
            assert est.regularizers is not None and est.implicit is not None  # separable
            stats["implicit"] = est.implicit
            value = value + est.regularizers
        return Objective(value, stats["loss"], aux, stats)

    @property
    def noise_variance_scale(self) -> float:
        """``1 - 1/k``: the share of dropout's noise variance that Dropout_k lacks (Alg. 3-4)."""
        return 1.0 - 1.0 / self.k


class Analytic(Method):
    """The analytic replacement of dropout (Alg. 2): clean loss + lambda R_approx + xi_approx.

    Args:
        curvature: Curvature of the explicit term, the same word as in
            :func:`~dropsplit.measure.quantities.explicit_regularizer`: ``"sampled"`` (labels
            drawn from the softmax, unbiased for ``H_out``), ``"exact"`` (full ``H_out``, small
            ``C``), ``"label"`` (true label: R-tilde), ``"identity"`` (``H_out = I / C``) or
            ``None`` (no explicit term). The older keyword ``explicit=`` is accepted and
            deprecated.
        implicit: Add the analytic gradient noise xi_approx.
        explicit_scale: Multiplies each site's ``lambda = q / (2(1-q))``.
        implicit_scale: Multiplies each site's noise variance ``v = q / (1-q)``.
        grouping: ``"mask"`` (exact for the mask the site really uses) or ``"element"`` (the
            original code's per-element squares).
        gradient: The estimator of the analytic terms' gradient, an object holding its own
            options or its name in :data:`dropsplit.estimators.ESTIMATORS` (the class with
            its defaults): ``ds.DoubleBackward()`` / ``"double-backward"`` (exact gradients),
            ``ds.HVPDifference(step=1e-3)`` / ``"hvp-difference"`` (the exact path's values
            and draws, gradients by one-sided differences along the exact directions: error
            ``O(step)``, no double backward), ``ds.JVP()`` / ``"jvp"`` (exact, forward over
            reverse) or ``ds.FiniteDifference(epsilon=0.05, examples=None)`` /
            ``"finite-difference"`` (two antithetic forwards, one backward, no double
            backward); the estimators take every explicit kind but ``"exact"``.
        explicit_every: Lazy regularization (as GANs do for gradient penalties): the explicit
            term only every ``m``-th step, scaled by ``m``, so its expected gradient per step is
            unchanged; the other steps skip its passes.
        implicit_every: The implicit term only every ``m'``-th step, its noise variance scaled by
            ``m'`` (standard deviation by ``sqrt(m')``), so the noise variance added per unit of
            training is unchanged.
        start_step: A schedule: clean steps (no regularization, the cost of a
            :class:`NoDropout` step) before this step, the analytic terms from it on (lazy
            intervals counted from it). Early in training the model underfits and regularizing
            buys nothing (on the character-level suite no dropout learns fastest for its first
            600 steps); the regularizers matter only once it starts to overfit.
        **kwargs: ``loss``, ``seed``, ``nonfinite`` of :class:`Method`; the deprecated
            ``hvp_step=``, ``fd_epsilon=`` and ``fd_examples=`` (now
            ``gradient=ds.HVPDifference(step=...)`` and
            ``gradient=ds.FiniteDifference(epsilon=..., examples=...)``) still work, with a
            warning.
    """

    def __init__(
        self,
        curvature: str | None = "sampled",
        implicit: bool = True,
        *,
        explicit_scale: float = 1.0,
        implicit_scale: float = 1.0,
        grouping: str = "mask",
        gradient: str | Estimator = "double-backward",
        explicit_every: int = 1,
        implicit_every: int = 1,
        start_step: int = 0,
        **kwargs,
    ) -> None:
        keyword = "curvature"
        if "explicit" in kwargs:
            warnings.warn(
                "Analytic(explicit=...) is deprecated: the keyword is curvature=",
                DeprecationWarning,
                stacklevel=2,
            )
            keyword, curvature = "explicit", kwargs.pop("explicit")
        legacy = pop_keywords(kwargs)
        super().__init__(**kwargs)
        self.curvature = _choice(curvature, (*CURVATURES, None), keyword)
        if not isinstance(implicit, bool):
            raise TypeError(f"implicit must be a bool, got {type(implicit).__name__}")
        self.implicit = implicit
        for name, value in (("explicit_scale", explicit_scale), ("implicit_scale", implicit_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        self.explicit_scale = float(explicit_scale)
        self.implicit_scale = float(implicit_scale)
        self.grouping = _choice(grouping, GROUPINGS, "grouping")
        self.estimator = estimator_from(gradient, legacy, "Analytic", self.curvature)
        self.gradient = self.estimator.name  # the estimator's name; the object is .estimator
        for name, value in (("explicit_every", explicit_every), ("implicit_every", implicit_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.explicit_every, self.implicit_every = explicit_every, implicit_every
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.start_step = start_step
        # objectives taken on each model, for the lazy schedules: a method stepping two models
        # keeps a count per model (one shared count ran each schedule on one model only)
        self._counts: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self._first_count = 0  # where a model not stepped yet starts (load_state_dict sets it)

    @property
    def steps(self) -> int:
        """Objectives taken on the model this method steps (lazy schedules count them).

        Counted per model; with none stepped yet, the count the next model starts from.

        Raises:
            ValueError: If the method has stepped several models (each has its own count).
        """
        counts = list(self._counts.values())
        if len(counts) > 1:
            raise ValueError(
                f"{type(self).__name__} stepped {len(counts)} models: its state holds one step "
                "count (of its lazy schedule), and each model has its own; give each model its "
                "own method to save or read its count"
            )
        return counts[0] if counts else self._first_count

    @steps.setter
    def steps(self, value: int) -> None:
        self._counts.clear()
        self._first_count = int(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state and the step count of lazy regularization.

        Raises:
            ValueError: If the method has stepped several models (see :attr:`steps`).
        """
        return {**super().state_dict(), "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (a state without a step count restarts it at 0).

        The count is where the next model stepped starts.
        """
        super().load_state_dict(state)
        self.steps = int(state.get("steps", torch.tensor(0)))

    def __repr__(self) -> str:
        return (
            f"Analytic(curvature={self.curvature!r}, implicit={self.implicit}, "
            f"grouping={self.grouping!r}, gradient={self.estimator!r})"
        )

    def objective(self, model, forward_fn, batch):
        """Clean loss plus the scaled explicit terms plus the implicit scalar ``S``.

        The value is the estimator's (for ``"finite-difference"``: loss + O(eps^2) + the
        one-draw estimate of lambda R + S) and ``surrogate`` carries its gradient.
        """
        self._require(model)
        (gen,) = self.spawn(1, model_device(model))
        count = self._counts.get(model, self._first_count)
        since = count - self.start_step
        explicit_now = self.curvature is not None and since % self.explicit_every == 0
        implicit_now = self.implicit and since % self.implicit_every == 0
        self._counts[model] = count + 1
        if since < 0 or not (explicit_now or implicit_now):  # before the start, or a lazy step
            return clean_objective(model, forward_fn, batch, self.loss)
        spec = EstimatorSpec(
            self.loss,
            self.curvature if explicit_now else None,
            implicit_now,
            grouping=self.grouping,
            explicit_scale=self.explicit_scale * self.explicit_every,
            implicit_scale=self.implicit_scale * self.implicit_every,
        )
        est = self.estimator.estimate(model, forward_fn, batch, spec, gen)
        stats = {"loss": est.loss, **_estimate_stats(site_names(model), est)}
        return Objective(est.value, est.loss, est.aux, stats, surrogate=est.surrogate)
