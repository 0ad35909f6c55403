"""What a config builds: the model, the method and the optimizer (shared by training and runs)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dropsplit.baselines import Fraternal, RDrop
from dropsplit.estimators import ESTIMATORS
from dropsplit.methods import Analytic, DropoutK, Method, NoDropout
from dropsplit.models import LanguageModel
from dropsplit.models.awd import AWDLSTM, QRNNLM, column_examples
from dropsplit.models.transformer import TransformerLM
from dropsplit.training.config import Config, MethodConfig, OptimConfig


def build_method(cfg: MethodConfig, seed: int, columns: int) -> Method:
    """The gradient maker a config names (non-finite objectives are reported, not raised).

    ``columns`` is the number of sequences per training batch: its layout
    (:func:`~dropsplit.models.awd.column_examples`, the example of each target) is offered to
    the estimator, which takes it if it can use it (``FiniteDifference``'s ``per_example``).
    """
    estimator = ESTIMATORS[cfg.gradient].from_config(cfg.estimator, column_examples(columns))
    if cfg.name == "none":
        return NoDropout(seed=seed, nonfinite="warn")
    if cfg.name == "rdrop":
        return RDrop(cfg.alpha, seed=seed, nonfinite="warn")
    if cfg.name == "fraternal":
        return Fraternal(cfg.kappa, seed=seed, nonfinite="warn")
    if cfg.name == "dropout":
        return DropoutK(
            cfg.k,
            None if cfg.noise == "none" else cfg.noise,
            implementation=cfg.implementation,
            grouping=cfg.grouping,
            gradient=estimator,
            seed=seed,
            nonfinite="warn",
        )
    return Analytic(
        None if cfg.curvature == "none" else cfg.curvature,
        cfg.implicit,
        explicit_scale=cfg.explicit_scale,
        implicit_scale=cfg.implicit_scale,
        grouping=cfg.grouping,
        gradient=estimator,
        explicit_every=cfg.explicit_every,
        implicit_every=cfg.implicit_every,
        start_step=cfg.start_step,
        seed=seed,
        nonfinite="warn",
    )


def build_model(config: Config, vocab_size: int) -> LanguageModel:
    """The language model of a config (``model.name``: lstm, qrnn or transformer)."""
    m = config.model
    if m.name == "transformer":
        return TransformerLM(
            vocab_size,
            m.embedding_size,
            m.layers,
            m.heads,
            m.context,
            mlp_width=m.hidden_size,
            p_input=m.p_input,
            p_attention=m.p_attention,
            p_attn_out=m.p_attn_out,
            p_mlp_hidden=m.p_mlp_hidden,
            p_mlp_out=m.p_mlp_out,
            p_output=m.p_output,
            tie_weights=m.tie_weights,
        )
    sizes = (vocab_size, m.embedding_size, m.hidden_size, m.layers)
    probabilities = {
        "p_input": m.p_input,
        "p_hidden": m.p_hidden,
        "p_output": m.p_output,
        "p_weight": m.p_weight,
        "p_embedding": m.p_embedding,
    }
    if m.name == "qrnn":
        return QRNNLM(*sizes, **probabilities, tie_weights=m.tie_weights, forget_mult=m.forget_mult)
    return AWDLSTM(
        *sizes, **probabilities, tie_weights=m.tie_weights, implementation=m.implementation
    )


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (also the first phase of NT-ASGD), Adam or AdamW."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
