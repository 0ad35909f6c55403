"""Attention dropout of ``transformers`` models as a dropsplit site.

``transformers`` never calls an attention-dropout module: each attention module passes a float
(``self.attn_dropout.p``, ``self.dropout.p``, ``self.attention_dropout``) as ``dropout=`` to the
attention function that ``config._attn_implementation`` names in ``ALL_ATTENTION_FUNCTIONS``
(eager, sdpa, flash...). Its supported extension point is to register an attention function
(``AttentionInterface.register``) and select it (``set_attn_implementation``). convert registers
:func:`attention_forward` as ``"dropsplit"`` (with sdpa's mask format) and selects it:

* when the site on the probabilities does not act and no one will differentiate twice, it calls
  transformers' own sdpa function with ``dropout=0`` (fused kernels, the model's float ignored);
* otherwise it computes ``site(softmax(q k^T * scaling + mask)) v`` explicitly, which is twice
  differentiable and lets the methods gate, replay and count the attention noise.

The site is the module's own converted dropout module where it has one (GPT-2's
``attn_dropout``, BERT's and DistilBERT's ``dropout``), so no site is listed that is never
called; a float (Llama-style ``attention_dropout``) becomes a new site ``<attr>_site`` and the
float is set to 0, so the model's own value acts nowhere.

This module imports ``transformers``; :func:`dropsplit.convert` imports it only when the model
has a module of theirs.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import torch
from torch import nn

from dropsplit.core.sites import Dropout

NAME = "dropsplit"  # the attention implementation convert registers and selects
SITE_ATTR = "_dropsplit_attention_site"  # on an attention module: the attribute of its site
ORIGIN = "_dropsplit_origin"  # as in dropsplit.integrations.convert (no import: no cycle)


@functools.cache
def register() -> None:
    """Register :func:`attention_forward` (and sdpa's masks) under :data:`NAME`, once."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    try:  # transformers >= 4.53 builds each implementation's masks through this interface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older versions build eager-style float masks for a custom name
        return
    AttentionMaskInterface.register(NAME, sdpa_mask)


_DROPOUT_ATTRIBUTES: dict[type[nn.Module], str | None] = {}  # per class: its source is read once


def dropout_attribute(cls: type[nn.Module]) -> str | None:
    """The attribute whose value an attention class passes as ``dropout=``, read from source.

    Returns:
        ``None`` if ``cls.forward`` calls no attention interface; ``""`` if it calls one
        without a ``dropout=`` read from ``self``.
    """
    if cls not in _DROPOUT_ATTRIBUTES:
        _DROPOUT_ATTRIBUTES[cls] = _read_dropout_attribute(cls)
    return _DROPOUT_ATTRIBUTES[cls]


def _read_dropout_attribute(cls: type[nn.Module]) -> str | None:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    if "ALL_ATTENTION_FUNCTIONS" not in source and "attention_interface(" not in source:
        return None
    for expression in re.findall(r"\bdropout\s*=\s*([^,\n]+)", source):
        names = [n for n in re.findall(r"\bself\.(\w+)", expression) if n != "training"]
        if names:
            return names[0]
    return ""


def take_over_attention(model: nn.Module) -> list[str]:
    """Put a site on the attention probabilities of every ``transformers`` attention module.

    Args:
        model: A (converted) model that holds ``transformers`` modules.

    Returns:
        One line per attention module whose dropout could not be found (for the warning).
    """
    register()
    from transformers import PreTrainedModel

    untaken, attentions = [], []
    for path, module in model.named_modules():
        if not type(module).__module__.startswith("transformers."):
            continue
        attr = dropout_attribute(type(module))
        if attr is None:
            continue  # not an attention module
        attentions.append(module)
        if hasattr(module, SITE_ATTR):
            continue  # converted before
        value = getattr(module, attr, None) if attr else None
        if isinstance(value, Dropout):  # its nn.Dropout, converted by the module pass
            site_attr = attr
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            site_attr = f"{attr}_site"
            module.add_module(site_attr, Dropout(float(value)).train(module.training))
            setattr(module, attr, 0.0)  # the model's own float acts nowhere
        else:
            if attr:
                untaken.append(f"{path or '(root)'} ({attr}: an attention dropout of unknown kind)")
            continue
        site = getattr(module, site_attr)
        site.batch_dim = 0  # probabilities [B, heads, q, k]
        setattr(site, ORIGIN, "attention")
        setattr(module, SITE_ATTR, site_attr)
        # set by site_context while a method will differentiate twice
        setattr(module, "differentiated_twice", False)  # noqa: B010 (an instance attribute)
    if attentions:
        for pretrained in model.modules():
            if (
                isinstance(pretrained, PreTrainedModel)
                and pretrained.config._attn_implementation != NAME
            ):
                pretrained.set_attn_implementation(NAME)  # sub-models follow
        for module in attentions:
            config = getattr(module, "config", None)
            if config is not None and config._attn_implementation != NAME:
                config._attn_implementation = NAME  # an attention module outside a PreTrainedModel
    return untaken


def site_of(module: nn.Module) -> Dropout | None:
    """The site on ``module``'s attention probabilities (``None``: not converted)."""
    attr = getattr(module, SITE_ATTR, None)
    return getattr(module, attr) if attr else None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, kv_heads, T, d]`` to ``[B, kv_heads * groups, T, d]`` (grouped-query attention)."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"dropsplit"`` attention: sdpa when the site is idle, explicit with the site else.

    Arguments as transformers' ``sdpa_attention_forward`` (``query[B, heads, q, d]``,
    ``key, value[B, kv_heads, k, d]``, a boolean or additive mask or ``None``); the model's
    ``dropout`` float is ignored where the module has a site.

    Returns:
        ``(output[B, q, heads, d], probabilities or None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    site = site_of(module)
    if site is None:  # not converted (e.g. selected by hand): sdpa as the model asked
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    explicit = (
        site.acting
        or getattr(module, "differentiated_twice", False)
        or kwargs.get("softcap") is not None  # sdpa refuses it
        or kwargs.get("output_attentions", False)  # sdpa returns no probabilities
    )
    if not explicit:  # fused kernels; the dropout is the site's, and it does not act
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    return _explicit_attention(
        module, site, query, key, value, attention_mask, scaling, is_causal, kwargs.get("softcap")
    )


def _explicit_attention(
    module: nn.Module,
    site: Dropout,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v with the site on the probabilities, sdpa's rules kept."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    q_length, kv_length = query.shape[2], key.shape[2]
    # sdpa_attention_forward's rule: is_causal only without a mask, for more than one query
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and q_length > 1 and attention_mask is None
    if causal and kv_length > q_length:  # an empty cache's prefill, cropped as sdpa does
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        kv_length = q_length
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        keep = attention_mask
    elif attention_mask is not None:
        scores = scores + attention_mask[..., :kv_length]
    elif causal:
        keep = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril()
    if keep is not None:  # the smallest float, not -inf: no NaN in a fully masked row
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    half = scores.dtype in (torch.float16, torch.bfloat16)
    probs = scores.softmax(-1, dtype=torch.float32 if half else None).to(value.dtype)
    if attention_mask is not None and keep is not None:  # as sdpa: a fully masked row weighs 0
        probs = probs * keep.any(-1, keepdim=True).to(probs.dtype)
    probs = site(probs)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs
