"""A multilayer perceptron classifier with dropout sites (it knows nothing about methods)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dropsplit.core.sites import Dropout

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPClassifier(nn.Module):
    """``inputs -> hidden_sizes -> classes`` with a site on the input and after each hidden layer.

    Args:
        inputs: Features per example.
        classes: Classes (the logits' width).
        hidden_sizes: The width of each hidden layer.
        activation: ``"relu"``, ``"gelu"`` or ``"tanh"``.
        p_input: Drop probability of the input features.
        p_hidden: Drop probability of each hidden layer's activations.

    Raises:
        ValueError: For an unknown activation.
    """

    def __init__(
        self,
        inputs: int,
        classes: int,
        hidden_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        p_input: float = 0.0,
        p_hidden: float = 0.5,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = [Dropout(p_input, label="input")]
        width = inputs
        for i, size in enumerate(hidden_sizes):
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            layers.append(Dropout(p_hidden, label=f"hidden{i}"))
            width = size
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, classes]`` of features ``[B, inputs]``."""
        return self.net(x)
