"""Forward functions for ``transformers`` models: dict batches to ``(logits[N, C], targets[N])``.

The methods compute the token-mean cross-entropy over the targets a forward function returns;
with these functions it is the loss the model itself returns as ``outputs.loss`` (the causal-LM
loss shifts logits and labels by one position, and both ignore labels equal to ``-100``).
Neither function imports ``transformers``: they only call the model.

The ``count_*_targets`` functions count the targets of a batch without a forward pass, so
:class:`~dropsplit.integrations.hf_trainer.DropsplitTrainer` can weight micro-batches by their
number of targets, as the ``Trainer`` weights its own loss under gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100  # transformers' label for "no target here" (padding, prompt tokens)
_TARGET_KEYS = ("labels", "shift_labels", "num_items_in_batch")  # never passed to the model


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without its targets: the model returns logits only, and computes no loss."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of model inputs, got {type(batch).__name__}")
    return {key: value for key, value in batch.items() if key not in _TARGET_KEYS}


def _logits(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned no logits tensor, got {type(logits).__name__}")
    return logits


def _causal_labels(batch: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
    """The labels and whether they still need the shift by one position."""
    if batch.get("shift_labels") is not None:  # padding-free collators shift them already
        return batch["shift_labels"], False
    labels = batch.get("labels")
    if labels is None:  # as DataCollatorForLanguageModeling(mlm=False) builds them
        labels = batch["input_ids"].clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
    return labels, True


def causal_lm_forward(model: nn.Module, batch: Mapping[str, Any]) -> tuple:
    """Next-token logits and targets of a causal LM, the positions without a label dropped.

    As the ``transformers`` causal-LM loss: the logits at position ``t`` predict the label at
    ``t + 1`` (``shift_labels``, when the batch has them, are used as they are), and positions
    whose label is ``-100`` are no target.

    Args:
        model: A causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``), possibly wrapped (DDP).
        batch: ``input_ids``, optionally ``attention_mask`` and the model's other inputs, and
            ``labels`` (or ``shift_labels``); without either, the labels are ``input_ids``
            with the padding (``attention_mask == 0``) set to ``-100``.

    Returns:
        ``(logits[N, V], targets[N])`` over the ``N`` kept positions of the batch.
    """
    labels, shift = _causal_labels(batch)
    logits = _logits(model(**_model_inputs(batch)))
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


def classification_forward(model: nn.Module, batch: Mapping[str, Any]) -> tuple:
    """Logits and labels of a sequence (or image) classifier; labels ``-100`` are dropped.

    Args:
        model: A classifier (``...ForSequenceClassification``), possibly wrapped.
        batch: The model's inputs and ``labels`` (``[B]`` class indices).

    Returns:
        ``(logits[N, C], labels[N])``.
    """
    if batch.get("labels") is None:
        raise ValueError("classification_forward needs batch['labels']")
    labels = batch["labels"]
    logits = _logits(model(**_model_inputs(batch)))
    if labels.dtype.is_floating_point:  # regression targets: nothing to ignore
        return logits, labels
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


def count_causal_lm_targets(batch: Mapping[str, Any]) -> int:
    """The ``N`` of :func:`causal_lm_forward` on ``batch``, without a forward pass."""
    labels, shift = _causal_labels(batch)
    if shift:
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def count_classification_targets(batch: Mapping[str, Any]) -> int:
    """The ``N`` of :func:`classification_forward` on ``batch``, without a forward pass."""
    labels = batch["labels"]
    if labels.dtype.is_floating_point:
        return int(labels.shape[0])
    return int((labels != IGNORE_INDEX).sum())


# forward function -> its target counter; DropsplitTrainer looks the default counter up here
TARGET_COUNTERS: dict[Callable[..., Any], Callable[[Mapping[str, Any]], int]] = {
    causal_lm_forward: count_causal_lm_targets,
    classification_forward: count_classification_targets,
}
