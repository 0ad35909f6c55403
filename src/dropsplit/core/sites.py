"""Dropout sites: the places where dropout noise acts, and how a method drives them.

A site multiplies a tensor by ``1 + eta`` (see :mod:`dropsplit.core.noise`). Outside of a method a
site behaves like ``nn.Dropout``: it samples a mask in training mode and is the identity in
eval mode. A method (or a measurement) takes over all sites of a model for one forward pass with
:func:`site_context`, choosing one of the modes:

* ``"off"``: identity (the clean forward).
* ``"sample"``: fresh masks from explicit generators, one generator per replica, so that a
  Dropout_k step draws the same masks whether it loops over replicas or duplicates the batch.
* ``"gate"``: multiply by a leaf tensor of ones (a *gate*) with one entry per mask group.
  The gradient of a loss with respect to a gate is ``sum_{e in m} G_e h_e`` for each group ``m``:
  exactly the quantity the mask grouping rule (README, "Conventions") squares or signs.
* ``"fixed"``: multiply by given multipliers, in call order (replays, enumeration, oracles).
* ``"perturb"``: multiply by ``1 + epsilon * sqrt(v) * s`` with Rademacher signs ``s``, one
  per mask group and ``v = q / (1 - q)`` the site's noise variance: a small antithetic probe of
  the sites for the finite-difference estimator (:mod:`dropsplit.estimators.finite_difference`).

While a ``"gate"`` context is live (and ``twice``, the default), every module of the model with a
``differentiated_twice`` attribute finds it set: the method will differentiate the gate gradients
again, and the module may pick a kernel that is cheaper to differentiate twice. Models learn it
from their own attribute, never from a method's state.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from dropsplit.core.noise import (
    check_probability,
    mask_shape,
    noise_variance,
    sample_multiplier,
    sample_rademacher,
)

MODES = ("off", "sample", "gate", "fixed", "perturb")
GROUPINGS = ("mask", "element")


@dataclass
class SiteContext:
    """How the sites of a model act during one forward pass.

    Attributes:
        mode: One of ``"off"``, ``"sample"``, ``"gate"``, ``"fixed"``.
        generators: For ``"sample"``: one generator per replica; for ``"perturb"``: the
            generator of the signs.
        grouping: For ``"gate"`` and ``"perturb"``: ``"mask"`` (one entry per mask value) or
            ``"element"`` (one per element of the tensor, the original code's per-element form).
        multipliers: For ``"fixed"``: one multiplier per site call, in call order.
        epsilon: For ``"perturb"``: the step, relative to the noise's standard deviation.
        active: Sites that act; the others are the identity (``None``: all).
        twice: For ``"gate"``: whether the gate gradients will be differentiated again
            (``False``: one backward only, so modules keep their fastest kernels).
        record: Filled during the forward with ``(site, tensor)`` per site call: the gate in
            ``"gate"`` mode, the multiplier in ``"sample"`` and ``"fixed"`` modes.
    """

    mode: str = "off"
    generators: Sequence[torch.Generator] | None = None
    grouping: str = "mask"
    multipliers: Sequence[torch.Tensor] | None = None
    epsilon: float = 0.0
    active: frozenset[Site] | None = None
    twice: bool = True
    record: list[tuple[Site, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"site mode must be one of {MODES}, got {self.mode!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if self.mode in ("sample", "perturb") and not self.generators:
            raise ValueError(f"mode {self.mode!r} needs at least one generator")
        if self.mode == "fixed" and self.multipliers is None:
            raise ValueError("mode 'fixed' needs multipliers")

    @property
    def replicas(self) -> int:
        """Number of batch replicas the sampled masks are drawn for."""
        return len(self.generators) if self.generators else 1

    @property
    def gates(self) -> list[torch.Tensor]:
        """The recorded gates or multipliers, in call order."""
        return [t for _, t in self.record]


class Site(nn.Module):
    """Base class of a dropout site.

    Args:
        p: Drop probability ``q`` in ``[0, 1)``.
        shared_dims: Dimensions along which one mask value is shared.
        label: Name shown in stats and logs (default: the module path in the model).
        generator: Generator used outside of a :func:`site_context` (default: global RNG).
    """

    is_weight_site = False

    def __init__(
        self,
        p: float,
        shared_dims: Sequence[int] = (),
        *,
        label: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.p = check_probability(p)
        if isinstance(shared_dims, int):
            shared_dims = (shared_dims,)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shared_dims):
            raise TypeError(f"shared_dims must be a tuple of ints, got {shared_dims!r}")
        self.shared_dims = tuple(shared_dims)
        self.label = label
        self.generator = generator
        self._context: SiteContext | None = None

    def extra_repr(self) -> str:
        """Drop probability and shared dims."""
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def mask_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the mask for a tensor of ``shape``."""
        return mask_shape(shape, self.shared_dims)

    @property
    def acting(self) -> bool:
        """Whether the site acts on its input now (else :meth:`apply_noise` returns it as is).

        A module may take a faster path around a site that does not act (e.g. fused attention
        when the attention-probability site is off).
        """
        if self.p == 0.0:
            return False  # an inactive site adds no gate, mask or cost in any mode
        ctx = self._context
        if ctx is None:
            return self.training
        return ctx.mode != "off" and (ctx.active is None or self in ctx.active)

    def apply_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this site's noise to ``x`` according to the current context.

        Args:
            x: The tensor ``h`` the site acts on.

        Returns:
            ``(1 + eta) * h`` in the current mode (``h`` itself when the site does not act).
        """
        if not self.acting:
            return x
        ctx = self._context
        if ctx is None:
            mult = sample_multiplier(
                self.mask_shape(x.shape), self.p, self.generator, x.dtype, x.device
            )
            return x * mult
        shape = self.mask_shape(x.shape) if ctx.grouping == "mask" else tuple(x.shape)
        if ctx.mode == "gate":
            mult = torch.ones(shape, dtype=x.dtype, device=x.device, requires_grad=True)
        elif ctx.mode == "perturb":
            assert ctx.generators  # checked by SiteContext
            signs = sample_rademacher(shape, ctx.generators[0], x.dtype, x.device)
            mult = 1.0 + ctx.epsilon * noise_variance(self.p) ** 0.5 * signs
        elif ctx.mode == "fixed":
            assert ctx.multipliers is not None  # checked by SiteContext
            index = len(ctx.record)
            if index >= len(ctx.multipliers):
                raise RuntimeError("the forward called more sites than multipliers were given")
            mult = ctx.multipliers[index]
        else:
            assert ctx.generators  # checked by SiteContext
            mult = self._sample_replicas(x, ctx.generators)
        ctx.record.append((self, mult))
        return x * mult  # a weight site's [replicas, *shape] multiplier stacks the weights

    def _sample_replicas(self, x: torch.Tensor, generators: Sequence[torch.Generator]):
        raise NotImplementedError


class Dropout(Site):
    """Activation dropout site, a drop-in for ``nn.Dropout``.

    In training mode outside a method the output has the distribution of ``nn.Dropout(p)``
    (with the mask shared along ``shared_dims``); in eval mode it is the identity.

    Args:
        p: Drop probability ``q`` in ``[0, 1)``.
        shared_dims: ``()`` elementwise, ``(0,)`` locked over time for ``(T, B, H)``,
            ``(2, 3)`` channel dropout for ``(N, C, H, W)``.
        batch_dim: The batch dimension of the input; Dropout_k by batch duplication draws an
            independent mask for each replica along it. ``None`` (default): the first
            dimension that is not shared, so ``Dropout(p, shared_dims=(0,))`` is locked dropout
            for ``(T, B, H)`` as written.
        label: Name shown in stats and logs.
        generator: Generator used outside of a method (default: global RNG).
    """

    def __init__(
        self,
        p: float = 0.5,
        shared_dims: Sequence[int] = (),
        *,
        batch_dim: int | None = None,
        label: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(p, shared_dims, label=label, generator=generator)
        if batch_dim is not None and batch_dim in self.shared_dims:
            raise ValueError(f"batch_dim {batch_dim} cannot be one of shared_dims")
        self.batch_dim = batch_dim

    def batch_dim_of(self, ndim: int) -> int:
        """The batch dimension for an input of ``ndim`` dimensions (given, or the first unshared).

        Raises:
            ValueError: If every dimension is shared or the given one is shared.
        """
        shared = {d % ndim for d in self.shared_dims}
        if self.batch_dim is not None:
            if self.batch_dim % ndim in shared:
                raise ValueError(f"batch_dim {self.batch_dim} cannot be one of shared_dims")
            return self.batch_dim % ndim
        free = [d for d in range(ndim) if d not in shared]
        if not free:
            raise ValueError(
                f"shared_dims {self.shared_dims} cover all {ndim} dims: no batch dimension left"
            )
        return free[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply dropout to ``x``."""
        return self.apply_noise(x)

    def _sample_replicas(self, x, generators):
        r, dim = len(generators), self.batch_dim_of(x.dim())
        size = x.shape[dim]
        if size % r:
            raise ValueError(
                f"batch dimension {dim} of size {size} is not a multiple of the "
                f"{r} replicas of batch duplication"
            )
        shape = list(self.mask_shape(x.shape))
        if shape[dim] != 1:
            shape[dim] = size // r
        parts = [sample_multiplier(shape, self.p, g, x.dtype, x.device) for g in generators]
        return torch.cat(parts, dim=dim) if r > 1 else parts[0]


class DropConnect(Site):
    """Weight site (DropConnect): noise on parameter ``name`` of ``module``, shared by the batch.

    The wrapped module is called with the noisy weight through ``torch.func.functional_call``,
    so the parameter stays a plain registered parameter (no ``WeightDrop`` re-registration
    hack). Embedding-row dropout is ``DropConnect(embedding, "weight", p, shared_dims=(1,))``.

    Args:
        module: The module that owns the parameter.
        name: Name of the parameter of ``module``.
        p: Drop probability ``q`` in ``[0, 1)``.
        shared_dims: Dimensions of the parameter along which one mask value is shared.
        batched_weights: Whether ``module`` accepts a weight with a leading replica dimension
            (needed by Dropout_k with batch duplication: one weight mask per replica).
        label: Name shown in stats and logs.
        generator: Generator used outside of a method (default: global RNG).
    """

    is_weight_site = True

    def __init__(
        self,
        module: nn.Module,
        name: str,
        p: float,
        shared_dims: Sequence[int] = (),
        *,
        batched_weights: bool = False,
        label: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(p, shared_dims, label=label, generator=generator)
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        param = dict(module.named_parameters(recurse=False)).get(name)
        if param is None:
            raise ValueError(f"{type(module).__name__} has no parameter named {name!r}")
        self.mask_shape(param.shape)  # validates shared_dims
        self.module = module
        self.name = name
        self.batched_weights = batched_weights

    def extra_repr(self) -> str:
        """Parameter name, drop probability and shared dims."""
        return f"name={self.name!r}, " + super().extra_repr()

    def noisy_weight(self) -> torch.Tensor:
        """The parameter with this site's noise applied in the current mode."""
        return self.apply_noise(getattr(self.module, self.name))

    def forward(self, *args, **kwargs):
        """Call the wrapped module with the noisy parameter."""
        weight = getattr(self.module, self.name)
        noisy = self.apply_noise(weight)
        if noisy is weight:
            return self.module(*args, **kwargs)
        return functional_call(self.module, {self.name: noisy}, args, kwargs)

    def _sample_replicas(self, x, generators):
        shape = self.mask_shape(x.shape)
        if len(generators) == 1:
            return sample_multiplier(shape, self.p, generators[0], x.dtype, x.device)
        if not self.batched_weights:
            raise ValueError(
                f"DropConnect on {type(self.module).__name__}.{self.name} cannot draw one weight "
                "mask per replica for batch duplication; pass batched_weights=True if the module "
                "accepts a [replicas, *weight.shape] weight, or use DropoutK(implementation='loop')"
            )
        return torch.stack(
            [sample_multiplier(shape, self.p, g, x.dtype, x.device) for g in generators]
        )


def named_sites(model: nn.Module) -> list[tuple[str, Site]]:
    """The sites of ``model`` with their names, in module registration order.

    A site's name is its ``label`` when given, otherwise its module path.

    Args:
        model: Any module.

    Returns:
        ``[(name, site), ...]``.

    Raises:
        ValueError: If two sites share a name.
    """
    out = []
    for path, module in model.named_modules():
        if isinstance(module, Site):
            out.append((module.label or path or type(module).__name__, module))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    return out


def sites(model: nn.Module) -> list[Site]:
    """The sites of ``model`` in a stable order (module registration order)."""
    return [s for _, s in named_sites(model)]


def site_names(model: nn.Module) -> dict[Site, str]:
    """Map each site of ``model`` to its name."""
    return {s: n for n, s in named_sites(model)}


def select_sites(model: nn.Module, names: Iterable[str] | None) -> frozenset[Site] | None:
    """The sites named in ``names`` (``None``: all).

    Raises:
        ValueError: For a name that is not a site of the model.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    by_name = dict(named_sites(model))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; the model's sites are {sorted(by_name)}")
    return frozenset(by_name[n] for n in names)


def site_batch_dim(model: nn.Module) -> int:
    """The batch dimension of the model's dropout sites, for batch duplication of its inputs.

    Each :class:`Dropout` site's given ``batch_dim``, or its first dimension that is not
    shared; 0 when the model has no activation site.

    Raises:
        ValueError: If the sites disagree.
    """
    dims = set()
    for s in sites(model):
        if isinstance(s, Dropout):  # one more dim than shared ones leaves the first free one
            dims.add(s.batch_dim_of(len(s.shared_dims) + 1) if s.batch_dim is None else s.batch_dim)
    if len(dims) > 1:
        raise ValueError(
            f"the model's dropout sites use batch dimensions {sorted(dims)}: give "
            "DropoutK(batch_dim=...) (or tile=/untile=) for batch duplication"
        )
    return dims.pop() if dims else 0


def require_sites(model: nn.Module, method: str) -> list[Site]:
    """Return the sites of ``model`` or raise a clear error naming ``method``.

    Raises:
        ValueError: If the model has no sites.
    """
    found = sites(model)
    if not found:
        raise ValueError(
            f"{method} needs dropout sites, but the model has none: build it with "
            "ds.Dropout / ds.DropConnect or call ds.convert(model) first"
        )
    return found


@contextlib.contextmanager
def site_context(model: nn.Module, context: SiteContext) -> Iterator[SiteContext]:
    """Drive every site of ``model`` by ``context`` for the duration of the block.

    Modules of ``model`` that have a ``differentiated_twice`` attribute are told, through it,
    whether the forward will be differentiated twice (a ``"gate"`` context with ``twice``), so
    they can pick a kernel that is cheaper to differentiate twice; nested contexts keep an
    outer ``True``.

    Args:
        model: The model whose sites take part.
        context: The mode and its inputs; its ``record`` is filled by the forward.

    Yields:
        ``context``.
    """
    found = sites(model)
    previous = [s._context for s in found]
    for s in found:
        s._context = context
    # duck-typed: any module that declares the attribute is told
    aware: list[Any] = [m for m in model.modules() if hasattr(m, "differentiated_twice")]
    previous_twice = [m.differentiated_twice for m in aware]
    twice = context.mode == "gate" and context.twice
    for m, prev in zip(aware, previous_twice, strict=True):
        m.differentiated_twice = prev or twice
    try:
        yield context
    finally:
        for m, prev in zip(aware, previous_twice, strict=True):
            m.differentiated_twice = prev
        for s, prev_context in zip(found, previous, strict=True):
            s._context = prev_context


_CONVERSIONS = {
    nn.Dropout: (),
    nn.Dropout1d: (-1,),
    nn.Dropout2d: (-2, -1),
    nn.Dropout3d: (-3, -2, -1),
}


def convert(model: nn.Module, batch_dim: int | None = None) -> nn.Module:
    """Replace ``nn.Dropout`` / ``Dropout1d`` / ``Dropout2d`` / ``Dropout3d`` by ``ds.Dropout``.

    Channel dropout becomes a site whose mask is shared over the trailing spatial dims.
    The replacement happens in place; the (possibly new) root module is returned.

    Dropout that is not a module cannot be taken over: a float ``dropout`` that a module passes
    to a functional call (``nn.MultiheadAttention``'s attention dropout, so the attention inside
    ``nn.TransformerEncoderLayer``; ``nn.LSTM`` / ``nn.GRU``'s between-layer dropout). It stays
    plain dropout, outside the methods (not gated, replayed or counted in ``R_approx``), and a
    warning names each such module. For a fully sited Transformer use
    :class:`dropsplit.models.TransformerLM`, or set that dropout to 0 and add a site.

    Args:
        model: The model to convert.
        batch_dim: Batch dimension of the new sites (``None``: their first dimension; give 1
            for sequence-first ``[T, B, ...]`` activations, so Dropout_k tiles the right way).

    Returns:
        The converted model.
    """
    converted = _replace_dropout(model, batch_dim)
    floats = {name: getattr(m, "dropout", None) for name, m in converted.named_modules()}
    untaken = [
        f"{name or '(root)'} (dropout={p})"
        for name, p in floats.items()
        if isinstance(p, float) and p > 0
    ]
    if untaken:
        warnings.warn(
            "convert could not take over the dropout of "
            + "; ".join(untaken)
            + ": it is a float passed to a functional call, so it stays plain dropout outside "
            "dropsplit's methods (set it to 0 and add a site, or use "
            "dropsplit.models.TransformerLM for a fully sited Transformer)",
            UserWarning,
            stacklevel=2,
        )
    return converted


def _replace_dropout(model: nn.Module, batch_dim: int | None) -> nn.Module:
    if isinstance(model, nn.modules.dropout._DropoutNd) and type(model) in _CONVERSIONS:
        site = Dropout(model.p, _CONVERSIONS[type(model)], batch_dim=batch_dim)
        return site.train(model.training)  # an eval model stays in eval
    for name, child in model.named_children():
        new = _replace_dropout(child, batch_dim)
        if new is not child:
            setattr(model, name, new)
    return model
