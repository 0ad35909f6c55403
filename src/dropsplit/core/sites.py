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
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from dropsplit.core.buffers import pass_ended
from dropsplit.core.noise import (
    check_probability,
    mask_shape,
    noise_variance,
    sample_multiplier,
    sample_rademacher,
)
from dropsplit.core.unsited import UnsitedDropoutGuard

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


class _Tape:
    """The multipliers of the site calls of one checkpointed region, in call order.

    Also what the region's forward was driven by (the modules told ``differentiated_twice``
    and whether attention ran on the math kernel), so its recomputation takes the same
    branches and kernels.
    """

    def __init__(self) -> None:
        self.entries: list[torch.Tensor | None] = []
        self.cursor = 0
        self.replaying = False
        self.twice_modules: tuple[Any, ...] = ()
        self.recorded_decisions: list[bool] = []  # Site.acting's answers, in call order
        self.decisions: list[bool] = []

    def next(self) -> torch.Tensor | None:
        if self.cursor >= len(self.entries):
            raise RuntimeError(
                "the recomputed forward called more dropsplit sites than the original one"
            )
        self.cursor += 1
        return self.entries[self.cursor - 1]


_TAPE: ContextVar[_Tape | None] = ContextVar("dropsplit_replay_tape", default=None)
# the modules a live site_context told that the pass is differentiated twice ([] when not)
_TWICE_MODULES: ContextVar[tuple[Any, ...]] = ContextVar("dropsplit_twice_modules", default=())


class _Taping:
    """Makes ``tape`` the current one, recording or replaying.

    Re-entrant: a region may be recomputed once per backward (for the gate gradients, and
    again for the step). Replaying restores the original forward's ``differentiated_twice``
    flags and math attention kernel around the recomputation.
    """

    def __init__(self, tape: _Tape, replaying: bool) -> None:
        self.tape, self.replaying = tape, replaying
        self.entries: list[tuple[Any, contextlib.ExitStack]] = []

    def __enter__(self) -> None:
        tape = self.tape
        tape.replaying, tape.cursor = self.replaying, 0
        stack = contextlib.ExitStack()
        if not self.replaying:
            tape.twice_modules = _TWICE_MODULES.get()
            tape.decisions = tape.recorded_decisions
        else:
            tape.decisions = list(tape.recorded_decisions)
        if self.replaying and tape.twice_modules:
            previous = [m.differentiated_twice for m in tape.twice_modules]
            for m in tape.twice_modules:
                m.differentiated_twice = True
            stack.callback(_reset_twice, tape.twice_modules, previous)
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        self.entries.append((_TAPE.set(tape), stack))

    def __exit__(self, *exc: object) -> None:
        token, stack = self.entries.pop()
        stack.close()
        _TAPE.reset(token)


def _reset_twice(modules: tuple[Any, ...], previous: list[bool]) -> None:
    for m, prev in zip(modules, previous, strict=True):
        m.differentiated_twice = prev


def replay_masks() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: recomputed sites reuse their multipliers.

    Gradient checkpointing runs a region's forward again during backward. Every site call of
    the original forward is recorded (mask, gate or ``None`` when the site did not act) and the
    recomputation gets the same multipliers back in call order, so every method (and plain
    dropout training) has the same gradient with and without checkpointing; gates stay the
    leaves the estimators differentiate. Use it with ``use_reentrant=False``::

        torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False,
                                          context_fn=ds.replay_masks)

    Returns:
        The context of the original forward and the context of its recomputation.
    """
    tape = _Tape()
    return _Taping(tape, replaying=False), _Taping(tape, replaying=True)


def checkpoint_kwargs() -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint`` that replay the sites' masks.

    For ``transformers``: ``model.gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=ds.checkpoint_kwargs())``.
    """
    return {"use_reentrant": False, "context_fn": replay_masks}


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
        self._driven = False  # whether the last call was driven by a method (for checkpointing)

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
        when the attention-probability site is off). Under :func:`replay_masks` each answer is
        recorded and a recomputation gets the same answers back, so it takes the same path.
        """
        tape = _TAPE.get()
        if tape is None or self.p == 0.0:
            return self._acting()
        if tape.replaying:
            return tape.decisions.pop(0)
        tape.decisions.append(self._acting())
        return tape.decisions[-1]

    def _acting(self) -> bool:
        if self.p == 0.0:
            return False  # an inactive site adds no gate, mask or cost in any mode
        ctx = self._context
        if ctx is None:
            return self.training
        return ctx.mode != "off" and (ctx.active is None or self in ctx.active)

    def apply_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this site's noise to ``x`` according to the current context.

        Under :func:`replay_masks` a recomputed forward (gradient checkpointing) gets the
        multiplier of the original call back instead of a new draw.

        Args:
            x: The tensor ``h`` the site acts on.

        Returns:
            ``(1 + eta) * h`` in the current mode (``h`` itself when the site does not act).

        Raises:
            RuntimeError: When the forward is recomputed in backward without
                :func:`replay_masks` after a method drove the site (a new mask would be drawn).
        """
        tape = _TAPE.get()
        if tape is not None and tape.replaying:
            mult = tape.next()
        else:
            self._refuse_recomputation()
            mult = self._multiplier(x) if self._acting() else None
            if tape is not None:
                tape.entries.append(mult)
        return x if mult is None else x * mult  # a weight site's [r, *shape] stacks the weights

    def _refuse_recomputation(self) -> None:
        recomputing = torch._C._current_graph_task_id() != -1  # a forward inside a backward
        if recomputing and (self._driven or self.generator is not None):
            raise RuntimeError(
                "a dropsplit site is called again while gradients are computed: gradient "
                "checkpointing recomputes the forward, and this site would draw a new mask "
                "(the gradient would be wrong). Pass context_fn=ds.replay_masks with "
                "use_reentrant=False to torch.utils.checkpoint (transformers: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "ds.checkpoint_kwargs()))"
            )
        self._driven = self._context is not None

    def _multiplier(self, x: torch.Tensor) -> torch.Tensor:
        """The multiplier ``1 + eta`` of an acting site in the current mode (recorded)."""
        ctx = self._context
        if ctx is None:
            return sample_multiplier(
                self.mask_shape(x.shape), self.p, self.generator, x.dtype, x.device
            )
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
        return mult

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


# set by ``dropsplit.convert`` on the model it returns: what it found and took over (core reads it
# by name only, so this layer needs nothing from the integrations above it)
CONVERT_REPORT = "_dropsplit_convert_report"


def require_sites(model: nn.Module, method: str) -> list[Site]:
    """Return the sites of ``model`` or raise a clear error naming ``method``.

    When ``dropsplit.convert`` ran on the model (or a part of it), the error says what it found.

    Raises:
        ValueError: If the model has no sites.
    """
    found = sites(model)
    if not found:
        reports = [str(r) for m in model.modules() if (r := getattr(m, CONVERT_REPORT, None))]
        if reports:
            hint = "ds.convert(model) ran on it but " + "; ".join(reports)
        else:
            hint = "build it with ds.Dropout / ds.DropConnect or call ds.convert(model) first"
        raise ValueError(f"{method} needs dropout sites, but the model has none: {hint}")
    return found


@contextlib.contextmanager
def site_context(model: nn.Module, context: SiteContext) -> Iterator[SiteContext]:
    """Drive every site of ``model`` by ``context`` for the duration of the block.

    Modules of ``model`` that have a ``differentiated_twice`` attribute are told, through it,
    whether the forward will be differentiated twice (a ``"gate"`` context with ``twice``), so
    they can pick a kernel that is cheaper to differentiate twice; nested contexts keep an
    outer ``True``. Such a pass also runs ``scaled_dot_product_attention`` on its math kernel
    (the fused CPU kernels have no double backward).

    No dropout outside the sites: a dropout of the model that is not a site raises
    :class:`~dropsplit.core.unsited.UnsitedDropoutError` naming the module
    (:class:`~dropsplit.core.unsited.UnsitedDropoutGuard`). The end of the pass is reported to
    the enclosing :func:`~dropsplit.core.buffers.buffer_scope`, if any.

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
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(UnsitedDropoutGuard(model, f"a {context.mode!r} pass"))
            if twice:  # fused attention kernels have no double backward (on the CPU)
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                token = _TWICE_MODULES.set(tuple(m for m in aware if m.differentiated_twice))
                stack.callback(_TWICE_MODULES.reset, token)
            yield context
            pass_ended()
        finally:
            for m, prev in zip(aware, previous_twice, strict=True):
                m.differentiated_twice = prev
            for s, prev_context in zip(found, previous, strict=True):
                s._context = prev_context
