"""Attention dropout of timm-style attention modules as a dropsplit site.

timm's ``Attention`` (and the many attention classes written like it, in timm and elsewhere)
has a boolean ``fused_attn`` and an ``attn_drop`` dropout module: when ``fused_attn`` is on it
calls ``F.scaled_dot_product_attention(dropout_p=self.attn_drop.p if self.training else 0.)``
and never calls ``attn_drop``; when it is off it computes ``attn_drop(softmax(q k^T)) v``
explicitly. After the module pass has made ``attn_drop`` a site, a forward pre-hook sets
``fused_attn`` before each call: fused only when the site cannot act (the fused call would drop
with the model's own ``p`` in training mode, outside the site) and no one will differentiate
twice (the fused kernels have no double backward). A module built with ``fused_attn=False`` (e.g.
``TIMM_FUSED_ATTN=0``) stays unfused.

Found by those attributes (duck typing), so nothing here imports timm; the hook is a registered
forward pre-hook, not a patched method.
"""

from __future__ import annotations

from torch import nn

from dropsplit.core.sites import Dropout

FUSED = "_dropsplit_fused"  # on a hooked module: the fused_attn it was built with
ORIGIN = "_dropsplit_origin"  # as in dropsplit.integrations.convert (no import: no cycle)


def is_fused_attention(module: nn.Module) -> bool:
    """Whether ``module`` switches kernels by ``fused_attn`` around an ``attn_drop`` site."""
    return isinstance(getattr(module, "fused_attn", None), bool) and isinstance(
        getattr(module, "attn_drop", None), Dropout
    )


def take_over_attention(model: nn.Module) -> None:
    """Hook every timm-style attention module of ``model`` whose ``attn_drop`` is a site."""
    for module in model.modules():
        if not is_fused_attention(module) or hasattr(module, FUSED):
            continue  # not such a module, or hooked before
        setattr(module, FUSED, module.fused_attn)
        for attr, value in list(vars(module).items()):
            if "attn_drop" in attr and isinstance(value, float):  # a copy of the rate for the
                setattr(module, attr, 0.0)  # fused call (timm's ViT-22B block): the site owns it
        site = module.attn_drop
        assert isinstance(site, Dropout)
        site.batch_dim = 0  # probabilities [B, heads, N, N]
        setattr(site, ORIGIN, "attention")
        # set by site_context while a method will differentiate twice
        setattr(module, "differentiated_twice", False)  # noqa: B010 (an instance attribute)
        module.register_forward_pre_hook(choose_kernel)


def choose_kernel(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: fused attention only when the ``attn_drop`` site cannot act."""
    site = module.attn_drop
    assert isinstance(site, Dropout)
    idle = (
        not site.acting
        and not getattr(module, "differentiated_twice", False)
        and not (module.training and site.p > 0)  # the fused call would drop with site.p
    )
    setattr(module, "fused_attn", bool(getattr(module, FUSED, True)) and idle)  # noqa: B010
