"""A tiny recurrent language model with every kind of site, for tests, the demo and the tour.

Sequence-first like the AWD-LSTM: locked dropout on the embedding output (``input``),
DropConnect on the recurrent weight (``weight_hh``), locked dropout on the output (``output``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dropsplit.core.sites import DropConnect, Dropout
from dropsplit.models.awd import lm_forward

__all__ = ["ElmanRNN", "TinyRNNLM", "lm_forward"]


class ElmanRNN(nn.Module):
    """``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)``, one layer, sequence-first.

    ``weight_hh`` may carry a leading replica dimension ``[k, H, H]``; the batch is then read as
    ``k`` consecutive replicas (Dropout_k by batch duplication with one weight mask each).

    Args:
        input_size: Features per step.
        hidden_size: Hidden units.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):
        """Run the sequence ``x[T, B, D]`` from state ``h[1, B, H]`` (zeros when ``None``).

        The state has ``nn.RNN``'s layout, so every tensor of a batch has its batch on dim 1.

        Returns:
            ``(outputs[T, B, H], h_T[1, B, H])``.
        """
        steps, batch, _ = x.shape
        hidden = self.weight_hh.shape[-1]
        h = x.new_zeros(batch, hidden) if h is None else h[0]
        inputs = x @ self.weight_ih.T + self.bias  # all steps at once
        w = self.weight_hh
        replicas = w.shape[0] if w.dim() == 3 else 1
        outputs = []
        for t in range(steps):
            if replicas == 1:
                rec = h @ w.T
            else:
                rec = torch.bmm(h.view(replicas, -1, hidden), w.transpose(1, 2)).view(batch, hidden)
            h = torch.tanh(inputs[t] + rec)
            outputs.append(h)
        return torch.stack(outputs), h.unsqueeze(0)


class TinyRNNLM(nn.Module):
    """Embedding -> locked dropout -> Elman RNN with DropConnect -> locked dropout -> head.

    Args:
        vocab: Number of tokens (input and output classes).
        embedding: Embedding size.
        hidden: Hidden size.
        p_input: Drop probability of the locked input site.
        p_weight: Drop probability of the DropConnect site on ``W_hh``.
        p_output: Drop probability of the locked output site.
    """

    def __init__(
        self,
        vocab: int = 8,
        embedding: int = 16,
        hidden: int = 32,
        p_input: float = 0.3,
        p_weight: float = 0.3,
        p_output: float = 0.3,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.input_dropout = Dropout(p_input, shared_dims=(0,), batch_dim=1, label="input")
        self.rnn = DropConnect(
            ElmanRNN(embedding, hidden),
            "weight_hh",
            p_weight,
            batched_weights=True,
            label="weight_hh",
        )
        self.output_dropout = Dropout(p_output, shared_dims=(0,), batch_dim=1, label="output")
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, h: torch.Tensor | None = None):
        """Logits ``[T, B, vocab]`` and the final state for tokens ``[T, B]``."""
        x = self.input_dropout(self.embedding(tokens))
        out, h = self.rnn(x, h)
        return self.head(self.output_dropout(out)), h
