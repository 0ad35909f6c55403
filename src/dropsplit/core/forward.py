"""The forward contract, ``forward_fn(model, batch) -> (logits, targets[, aux])``.

Also the clean and gated forwards that every estimator, method and measurement builds on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dropsplit.core.losses import Loss
from dropsplit.core.sites import Site, SiteContext, site_context

ForwardFn = Callable[[nn.Module, Any], tuple]


@dataclass
class ForwardOutput:
    """Validated output of one forward pass.

    Attributes:
        logits: ``[N, C]`` model outputs.
        targets: ``[N]`` labels (or ``[N, D]`` regression targets).
        aux: Anything the caller wants back (e.g. an RNN state), passed through untouched.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    aux: Any = None

    @property
    def n(self) -> int:
        """Number of targets ``N`` (the loss is a mean over them)."""
        return self.logits.shape[0]


def call_forward(forward_fn: ForwardFn, model: nn.Module, batch: Any, loss: Loss) -> ForwardOutput:
    """Run ``forward_fn`` and check what it returns.

    Args:
        forward_fn: ``(model, batch) -> (logits, targets)`` or ``(logits, targets, aux)``.
        model: The model.
        batch: The user's batch, passed through.
        loss: The loss family, which checks shapes and dtypes.

    Returns:
        The validated :class:`ForwardOutput`.

    Raises:
        TypeError: If ``forward_fn`` is not callable or returns something else.
        ValueError: If logits and targets do not match.
    """
    if not callable(forward_fn):
        raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}")
    out = forward_fn(model, batch)
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise TypeError(
            "forward_fn must return (logits, targets) or (logits, targets, aux), "
            f"got {type(out).__name__}"
        )
    result = ForwardOutput(*out)
    loss.check(result.logits, result.targets)
    if result.n == 0:
        raise ValueError("forward_fn returned zero targets")
    return result


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_gradient(
    scalar: torch.Tensor, params: list[nn.Parameter], retain_graph: bool = False
) -> torch.Tensor:
    """Gradient of ``scalar`` flattened over ``params`` (zeros for unused parameters)."""
    grads = torch.autograd.grad(scalar, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]
    )


def uncompiled(model: nn.Module, purpose: str) -> nn.Module:
    """The eager module behind a ``torch.compile``'d model, for a pass differentiated twice.

    Compiled graphs have no double backward (torch raises deep inside a batching rule); the
    compiled wrapper shares its parameters with the module it wraps, so a twice-differentiated
    pass runs that module eagerly and gives the eager gradients.

    Raises:
        ValueError: If a submodule of the model is compiled (its graph cannot be bypassed).
    """
    model = getattr(model, "_orig_mod", model) if _is_compiled(model) else model
    inner = [name for name, m in model.named_modules() if _is_compiled(m)]
    if inner:
        raise ValueError(
            f"{purpose} differentiates twice, which torch.compile'd graphs do not support, and "
            f"the model has compiled submodules ({', '.join(inner)}): compile the whole model "
            "(it then runs eagerly for this pass) or use gradient='hvp-difference' or "
            "'finite-difference' (one backward)"
        )
    return model


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Leave every active ``torch.autocast`` region for the block.

    For backward passes (PyTorch advises against running them under autocast: the backward of
    a float32 graph would round its matmuls to half precision) and for estimators whose
    differences half precision cannot resolve.
    """
    with contextlib.ExitStack() as stack:
        for device in AUTOCAST_DEVICES:
            if _autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _autocast_enabled(device: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device))
    except (TypeError, RuntimeError):  # torch < 2.4 takes no device; unknown device types
        return device == "cuda" and torch.is_autocast_enabled()


def mean_loss(out: ForwardOutput, loss: Loss) -> torch.Tensor:
    """Token-mean loss of a forward output."""
    return loss.summed(out.logits, out.targets) / out.n


def gated_forward(
    model: nn.Module,
    forward_fn: ForwardFn,
    batch: Any,
    loss: Loss,
    grouping: str,
    active: frozenset[Site] | None = None,
    twice: bool = True,
) -> tuple[ForwardOutput, SiteContext]:
    """A clean forward with a gate on every (active) site call (mode ``"gate"``).

    ``twice=False`` when the gate gradients will not be differentiated again.

    Raises:
        ValueError: If the forward used none of the sites.
    """
    context = SiteContext("gate", grouping=grouping, active=active, twice=twice)
    with site_context(model, context) as ctx:
        out = call_forward(forward_fn, model, batch, loss)
    if not ctx.record:
        raise ValueError("the forward pass used none of the model's dropout sites")
    return out, ctx
