"""``ds.convert``: turn the dropout of a model built elsewhere into dropsplit sites.

What it takes over, in place:

* ``nn.Dropout`` / ``Dropout1d`` / ``Dropout2d`` / ``Dropout3d`` modules: :class:`ds.Dropout`
  sites (channel dropout shares its mask over the trailing spatial dims);
* stochastic depth (timm's ``DropPath`` with ``drop_prob``, torchvision's ``StochasticDepth`` with
  ``p`` and ``mode="row"``, found by class name and attribute): :class:`ExampleDropout` sites,
  one mask value per example;
* the attention dropout of ``transformers`` models (through ``transformers.AttentionInterface``,
  :mod:`dropsplit.integrations.transformers`) and of timm-style attention modules (through a
  forward pre-hook on ``fused_attn``, :mod:`dropsplit.integrations.timm`).

Everything else that looks like dropout (a float attribute whose name contains ``drop``, the
inter-layer dropout of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, ``nn.MultiheadAttention``'s attention
dropout) stays plain dropout outside the methods, and a warning names each one. What convert
found is kept on the returned model, so a method that finds no sites can say why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dropsplit.core.sites import CONVERT_REPORT, Dropout, Site, sites
from dropsplit.integrations import timm

# the instance attribute that tells which sites convert made, and from what (see ORIGINS)
ORIGIN = "_dropsplit_origin"
# "module": an nn.Dropout replaced in place (its layout is the user's: convert's batch_dim
# applies); the others have a layout their library fixes (batch first), so batch_dim 0
ORIGINS = ("module", "attention", "stochastic-depth")

_CONVERSIONS: dict[type[nn.Module], tuple[int, ...]] = {
    nn.Dropout: (),
    nn.Dropout1d: (-1,),
    nn.Dropout2d: (-2, -1),
    nn.Dropout3d: (-3, -2, -1),
}


class ExampleDropout(Dropout):
    """A dropout site with one mask value per example: stochastic depth (drop path).

    The mask of a ``[B, ...]`` input is ``[B, 1, ..., 1]`` whatever its number of dims, so one
    site serves ``[B, L, D]`` tokens and ``[B, C, H, W]`` feature maps alike (what timm's
    ``DropPath`` and torchvision's ``StochasticDepth(mode="row")`` draw, with the same
    ``1 / (1 - p)`` scaling: the paper's noise law on the residual branch).

    Args:
        p: Drop probability ``q`` in ``[0, 1)``.
        label: Name shown in stats and logs.
        generator: Generator used outside of a method (default: global RNG).
    """

    def __init__(
        self, p: float = 0.1, *, label: str | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(p, (), batch_dim=0, label=label, generator=generator)

    def extra_repr(self) -> str:
        """Drop probability."""
        return f"p={self.p}, one mask value per example"

    def mask_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``[B, 1, ..., 1]`` for an input of ``shape = [B, ...]``."""
        if not len(shape):
            raise ValueError("ExampleDropout needs an input with a batch dimension, got a scalar")
        return (shape[0],) + (1,) * (len(shape) - 1)


@dataclass
class ConvertReport:
    """What :func:`convert` found on a model, kept on it for error messages.

    Attributes:
        taken: One line per site convert made or adopted (path, origin, ``p``).
        untaken: One line per dropout it could not take over (path, attribute, why).
        batch_dim: The ``batch_dim`` convert was called with last.
    """

    taken: list[str] = field(default_factory=list)
    untaken: list[str] = field(default_factory=list)
    batch_dim: int | None = None

    def __str__(self) -> str:
        if self.taken:
            found = f"it made {len(self.taken)} site(s): " + "; ".join(self.taken)
        else:
            found = (
                "it found no dropout to take over (no nn.Dropout / Dropout1d/2d/3d module, "
                "transformers or timm attention dropout, DropPath or StochasticDepth)"
            )
        if self.untaken:
            found += "; it could not take over: " + "; ".join(self.untaken)
        return found


def convert(model: nn.Module, batch_dim: int | None = None) -> nn.Module:
    """Take over the dropout of ``model`` as dropsplit sites (see the module docstring).

    The replacement happens in place; the (possibly new) root module is returned. Dropout that
    convert cannot take over is not a site (not gated, replayed or counted in ``R_approx``; a
    method's pass in which it acts raises), and a ``UserWarning`` names each such attribute.
    For a fully sited Transformer of your own use :class:`dropsplit.models.TransformerLM`, or
    set that dropout to 0 and add a site.

    Converting again is safe: sites made before are kept (no second site, hook or attention
    switch), and a new ``batch_dim`` is applied to every site convert made from a dropout
    module, before or now.

    Args:
        model: The model to convert.
        batch_dim: Batch dimension of the sites made from dropout modules (``None``: their first
            dimension; give 1 for sequence-first ``[T, B, ...]`` activations, so Dropout_k tiles
            the right way). Attention-probability and stochastic-depth sites are batch-first
            (dim 0) as their libraries lay them out.

    Returns:
        The converted model, with a :class:`ConvertReport` of what was found.

    Raises:
        TypeError: If ``batch_dim`` is not an int or ``None``.
        ValueError: If ``batch_dim`` is one of the shared dims of a channel-dropout module or
            site (nothing is changed then).
    """
    if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)):
        raise TypeError(f"batch_dim must be an int or None, got {batch_dim!r}")
    _check_batch_dim(model, batch_dim)  # before anything changes
    report = ConvertReport(batch_dim=batch_dim)
    refused: dict[str, str] = {}
    converted = _replace(model, "", batch_dim, refused)
    _apply_batch_dim(converted, batch_dim)

    kinds = {type(m).__module__.split(".")[0] for m in converted.modules()}
    if "transformers" in kinds:  # imported only when a model of theirs is met
        from dropsplit.integrations import transformers as hf

        report.untaken += hf.take_over_attention(converted)
    timm.take_over_attention(converted)  # duck-typed: imports no timm

    for name, site in _named_modules(converted):
        if isinstance(site, Site) and getattr(site, ORIGIN, None) is not None:
            report.taken.append(f"{name} ({getattr(site, ORIGIN)}, p={site.p})")
    report.untaken += [f"{path} {why}" for path, why in refused.items()]
    report.untaken += _untaken(converted, set(refused))
    fixed = [s for s in sites(converted) if getattr(s, ORIGIN, "module") != "module"]
    if batch_dim not in (None, 0) and fixed:
        warnings.warn(
            f"convert(batch_dim={batch_dim}): the {len(fixed)} attention / stochastic-depth "
            "site(s) of this model are batch-first (dim 0) as their library lays them out; "
            "sites that disagree need DropoutK(batch_dim=...) for batch duplication",
            UserWarning,
            stacklevel=2,
        )
    if report.untaken:
        warnings.warn(
            "convert could not take over the dropout of "
            + "; ".join(report.untaken)
            + ". It is not a site (not gated, replayed or counted, and a method's pass in "
            "which it acts raises ds.UnsitedDropoutError): set it to 0 and add a ds.Dropout "
            "site, or use dropsplit.models.TransformerLM for a fully sited Transformer (a "
            "float that only records a rate that a converted module uses can be ignored)",
            UserWarning,
            stacklevel=2,
        )
    setattr(converted, CONVERT_REPORT, report)
    return converted


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or "(root)", m) for name, m in model.named_modules()]


def _replace(
    module: nn.Module, path: str, batch_dim: int | None, refused: dict[str, str]
) -> nn.Module:
    """``module`` with its dropout modules replaced by sites (recursively, in place)."""
    if isinstance(module, Site):
        return module  # converted before, or built with sites: never wrapped twice
    site: Dropout | None = None
    if type(module) in _CONVERSIONS:
        assert isinstance(module, nn.modules.dropout._DropoutNd)
        site = Dropout(module.p, _CONVERSIONS[type(module)], batch_dim=batch_dim)
        setattr(site, ORIGIN, "module")
    else:
        p, why = _stochastic_depth(module)
        if why is not None:
            refused[path or "(root)"] = why
        elif p is not None:
            site = ExampleDropout(p)
            setattr(site, ORIGIN, "stochastic-depth")
    if site is not None:
        return site.train(module.training)  # an eval model stays in eval
    for name, child in module.named_children():
        new = _replace(child, f"{path}.{name}" if path else name, batch_dim, refused)
        if new is not child:
            setattr(module, name, new)
    return module


def _stochastic_depth(module: nn.Module) -> tuple[float | None, str | None]:
    """``(p, None)`` for stochastic depth that a site can take, ``(None, why)`` if refused.

    Found by class name and attribute (no import of timm or torchvision): timm's ``DropPath``
    (``drop_prob``, ``scale_by_keep``) and the copies of it in many repositories, torchvision's
    ``StochasticDepth`` (``p``, ``mode``).
    """
    name = type(module).__name__
    if name == "DropPath" and isinstance(getattr(module, "drop_prob", None), (int, float)):
        p = float(module.drop_prob)  # type: ignore[arg-type]
        if not getattr(module, "scale_by_keep", True) and p > 0:
            return None, (
                f"(drop_prob={p}, scale_by_keep=False): a 0/1 mask without the 1/(1-p) scaling "
                "is not dropsplit's noise law (mean 1), so it is not converted; set "
                "scale_by_keep=True to convert it"
            )
    elif name == "StochasticDepth" and isinstance(getattr(module, "p", None), (int, float)):
        p = float(module.p)  # type: ignore[arg-type]
        if getattr(module, "mode", "row") != "row" and p > 0:
            return None, (
                f"(p={p}, mode={module.mode!r}): one mask for the whole batch is not a "
                "per-example site; use mode='row' to convert it"
            )
    else:
        return None, None
    if not 0.0 <= p < 1.0:
        return None, f"({name} p={p}): a site needs p in [0, 1)"
    return p, None


def _check_batch_dim(model: nn.Module, batch_dim: int | None) -> None:
    """Refuse a ``batch_dim`` that a channel-dropout module or converted site shares."""
    if batch_dim is None:
        return
    for name, m in _named_modules(model):
        if type(m) in _CONVERSIONS:
            shared = _CONVERSIONS[type(m)]
        elif isinstance(m, Dropout) and getattr(m, ORIGIN, None) == "module":
            shared = m.shared_dims
        else:
            continue
        if batch_dim in shared:
            raise ValueError(
                f"batch_dim {batch_dim} is one of the dims {shared} that the channel dropout "
                f"{name} shares its mask over"
            )


def _apply_batch_dim(model: nn.Module, batch_dim: int | None) -> None:
    """Give every site convert made from a dropout module ``batch_dim`` (a re-convert's too)."""
    for site in model.modules():
        if isinstance(site, Dropout) and getattr(site, ORIGIN, None) == "module":
            site.batch_dim = batch_dim


def _untaken(model: nn.Module, skip: set[str]) -> list[str]:
    """One line per dropout-like attribute left on ``model``.

    A float > 0 named ``*drop*``, or any float > 0 of a module whose class name has ``drop``
    (``nn.AlphaDropout``'s ``p``, timm's ``PatchDropout``'s ``prob``), and the dropout of
    ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` and ``nn.MultiheadAttention``.
    """
    out = []
    for path, m in _named_modules(model):
        if isinstance(m, Site) or path in skip:
            continue
        if isinstance(m, nn.RNNBase) and m.dropout > 0:
            out.append(
                f"{path} (dropout={m.dropout}): {type(m).__name__}'s inter-layer dropout runs "
                "inside its kernel (use dropsplit.models.LSTM, or single layers with sites "
                "between them)"
            )
            continue
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            out.append(
                f"{path} (dropout={m.dropout}): nn.MultiheadAttention passes it to a "
                "functional call"
            )
            continue
        dropout_class = "drop" in type(m).__name__.lower()  # e.g. AlphaDropout's p
        for attr, value in vars(m).items():
            if isinstance(value, float) and value > 0 and (dropout_class or "drop" in attr.lower()):
                out.append(f"{path} ({attr}={value})")
    return out
