"""No dropout outside the sites: a guard for the passes a method or a measurement drives.

A method's clean, gated, replayed or sampled pass is correct only if every dropout of the model
is a site: a dropout the method does not drive keeps acting inside a "clean" pass (the clean
loss is then a dropout loss), is not gated (``R_approx`` and ``xi_approx`` miss it) and is not
replayed (the two passes of a difference see different masks). :class:`UnsitedDropoutGuard`
makes every such dropout an error that names the module and the fix, as it happens:

* functional dropout of every kind (``F.dropout``, ``dropout1d/2d/3d``, ``alpha_dropout``,
  ``feature_alpha_dropout`` and their ``torch.*`` forms) with ``p > 0`` in training,
  and ``scaled_dot_product_attention`` with ``dropout_p > 0``, caught by a
  :class:`~torch.overrides.TorchFunctionMode` while the pass runs;
* modules whose dropout is inside a fused kernel, found before the pass: ``nn.RNN`` /
  ``nn.LSTM`` / ``nn.GRU`` with inter-layer dropout, and stochastic depth that was not
  converted (timm ``DropPath``, torchvision ``StochasticDepth``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class UnsitedDropoutError(RuntimeError):
    """A dropout that is not a dropsplit site acted inside a pass a method drives."""


_FIX = (
    "call ds.convert(model) to make it a site, or set its probability to 0 and add a "
    "ds.Dropout site where it acts"
)

# function -> (index of p in args, its keyword, index of training in args, its keyword)
_DROPOUTS: dict[Any, tuple[int, str, int, str]] = {
    F.dropout: (1, "p", 2, "training"),
    F.dropout1d: (1, "p", 2, "training"),
    F.dropout2d: (1, "p", 2, "training"),
    F.dropout3d: (1, "p", 2, "training"),
    F.alpha_dropout: (1, "p", 2, "training"),
    F.feature_alpha_dropout: (1, "p", 2, "training"),
    torch.dropout: (1, "p", 2, "train"),
    torch.feature_dropout: (1, "p", 2, "train"),
    torch.alpha_dropout: (1, "p", 2, "train"),
    torch.feature_alpha_dropout: (1, "p", 2, "train"),
}
_SDPA_DROPOUT_INDEX = 4  # scaled_dot_product_attention(query, key, value, attn_mask, dropout_p)
STOCHASTIC_DEPTH = {"DropPath": "drop_prob", "StochasticDepth": "p"}


def _argument(args: tuple, kwargs: dict, index: int, keyword: str, default: Any) -> Any:
    if keyword in kwargs:
        return kwargs[keyword]
    return args[index] if len(args) > index else default


def dropout_probability(func: Any, args: tuple, kwargs: dict) -> float:
    """The drop probability a torch function call applies (0 for anything but dropout).

    Args:
        func: The function called (as a :class:`TorchFunctionMode` sees it).
        args: Its positional arguments.
        kwargs: Its keyword arguments.

    Returns:
        ``p`` for a dropout in training mode, ``dropout_p`` for attention; else 0.
    """
    if func is F.scaled_dot_product_attention:
        return float(_argument(args, kwargs, _SDPA_DROPOUT_INDEX, "dropout_p", 0.0))
    spec = _DROPOUTS.get(func)
    if spec is None:
        return 0.0
    p_index, p_name, train_index, train_name = spec
    training = _argument(args, kwargs, train_index, train_name, True)
    return float(_argument(args, kwargs, p_index, p_name, 0.5)) if training else 0.0


def calling_module(model: nn.Module) -> str:
    """The path in ``model`` of the innermost module whose ``forward`` is on the Python stack."""
    names = {id(m): name for name, m in model.named_modules()}
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self", frame.f_locals.get("module"))
        if isinstance(owner, nn.Module) and id(owner) in names:
            name = names[id(owner)] or "(root)"
            return f"{name} ({type(owner).__name__})"
        frame = frame.f_back
    return "a function outside the model's modules"


def fused_dropouts(model: nn.Module) -> list[str]:
    """Modules of ``model`` in training mode whose dropout acts inside a fused kernel.

    Recurrent modules with inter-layer dropout and unconverted stochastic depth, each as
    ``"path (Class, p=...)"``.
    """
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        p = 0.0
        if isinstance(module, nn.RNNBase) and module.num_layers > 1:
            p = module.dropout
        elif type(module).__name__ in STOCHASTIC_DEPTH:
            p = getattr(module, STOCHASTIC_DEPTH[type(module).__name__], 0.0) or 0.0
        if p > 0:
            found.append(f"{name or '(root)'} ({type(module).__name__}, p={p})")
    return found


class UnsitedDropoutGuard(TorchFunctionMode):
    """Raise :class:`UnsitedDropoutError` on any dropout outside the sites of ``model``.

    Entering the guard first checks the modules (:func:`fused_dropouts`); while it is entered,
    every torch function call is checked (:func:`dropout_probability`).

    Args:
        model: The model whose pass is guarded (used to name the offending module).
        purpose: What the pass is for, shown in the error (e.g. ``"a 'gate' pass"``).
    """

    def __init__(self, model: nn.Module, purpose: str) -> None:
        super().__init__()
        self.model = model
        self.purpose = purpose

    def __enter__(self) -> UnsitedDropoutGuard:
        fused = fused_dropouts(self.model)
        if fused:
            raise UnsitedDropoutError(
                f"dropout that is not a dropsplit site would act in {self.purpose}: "
                + "; ".join(fused)
                + f". Its noise would be outside the method; {_FIX}"
            )
        super().__enter__()
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Check the call, then run it."""
        kwargs = kwargs or {}
        p = dropout_probability(func, args, kwargs)
        if p > 0:
            name = getattr(func, "__name__", str(func))
            raise UnsitedDropoutError(
                f"{name}(p={p:g}) called by {calling_module(self.model)} in {self.purpose}: "
                f"dropout that is not a dropsplit site would act outside the method; {_FIX}"
            )
        return func(*args, **kwargs)
