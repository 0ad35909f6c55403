"""The benchmark's reference models: each language model written the obvious way, plain dropout.

They set the bar for our models' dropout step (``dropsplit bench``): the same sizes and dropout,
built from what a user would write without dropsplit.

* :class:`PlainAWD`: ``nn.LSTM`` layers with hand-written locked dropout and DropConnect;
* :class:`PlainQRNN`: ``nn.Linear`` gates and a Python-loop forget-mult, the same dropout;
* :class:`PlainTransformer`: ``nn.TransformerEncoder`` (pre-LayerNorm, GELU, causal mask) with its
  own dropout (attention probabilities included, through ``nn.MultiheadAttention``).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from dropsplit.models.awd import AWDLSTM, QRNNLM
from dropsplit.models.lstm import LSTMLayer
from dropsplit.models.qrnn import QRNNLayer
from dropsplit.models.transformer import Block, TransformerLM


def locked(x: torch.Tensor, q: float) -> torch.Tensor:
    """Locked dropout on ``x[T, B, H]``: one mask per sequence and unit."""
    mask = x.new_empty(1, *x.shape[1:]).bernoulli_(1 - q) / (1 - q)
    return x * mask


def drop_connect(w: torch.Tensor, q: float) -> torch.Tensor:
    """``w`` times a fresh inverted-dropout mask."""
    return w * (w.new_empty(w.shape).bernoulli_(1 - q) / (1 - q))


class PlainAWD(nn.Module):
    """The same LM from ``nn.LSTM`` modules with hand-written locked dropout and DropConnect."""

    def __init__(self, model: AWDLSTM, q: float = 0.4) -> None:
        super().__init__()
        self.q = q
        self.encoder, self.decoder = model.encoder, model.decoder
        self.lstms = nn.ModuleList()
        for site in model.rnns:
            layer = cast(LSTMLayer, site.module)
            lstm = nn.LSTM(layer.input_size, layer.hidden_size)
            with torch.no_grad():
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(lstm, f"{name}_l0").copy_(getattr(layer, name))
            self.lstms.append(lstm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, B, V]`` with fresh masks, from a zero state."""
        x = locked(self.encoder(tokens), self.q)
        for i, lstm in enumerate(self.lstms):
            w = drop_connect(lstm.get_parameter("weight_hh_l0"), self.q)
            x = torch.func.functional_call(lstm, {"weight_hh_l0": w}, (x,))[0]
            if i < len(self.lstms) - 1:
                x = locked(x, self.q)
        return self.decoder(locked(x, self.q))


class PlainQRNN(nn.Module):
    """The same QRNN LM with ``nn.Linear`` gates and the forget-mult as a Python loop."""

    def __init__(self, model: QRNNLM, q: float = 0.4) -> None:
        super().__init__()
        self.q = q
        self.encoder, self.decoder = model.encoder, model.decoder
        self.linears = nn.ModuleList()
        self.windows = []
        for site in model.rnns:
            layer = cast(QRNNLayer, site.module)
            linear = nn.Linear(layer.window * layer.input_size, 3 * layer.hidden_size)
            with torch.no_grad():
                linear.weight.copy_(layer.weight)
                linear.bias.copy_(layer.bias)
            self.linears.append(linear)
            self.windows.append(layer.window)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, B, V]`` with fresh masks, from a zero state."""
        x = locked(self.encoder(tokens), self.q)
        for i, (module, window) in enumerate(zip(self.linears, self.windows, strict=True)):
            linear = cast(nn.Linear, module)
            if window == 2:
                x = torch.cat([torch.cat([torch.zeros_like(x[:1]), x[:-1]]), x], -1)
            gates = nn.functional.linear(x, drop_connect(linear.weight, self.q), linear.bias)
            z, f, o = gates.chunk(3, -1)
            z, f = torch.tanh(z), torch.sigmoid(f)
            c, outs = torch.zeros_like(z[0]), []
            for t in range(z.shape[0]):
                c = f[t] * z[t] + (1 - f[t]) * c
                outs.append(c)
            x = torch.sigmoid(o) * torch.stack(outs)
            if i < len(self.linears) - 1:
                x = locked(x, self.q)
        return self.decoder(locked(x, self.q))


class PlainTransformer(nn.Module):
    """A Transformer LM of the same sizes on ``nn.TransformerEncoder`` (pre-LN, GELU, causal)."""

    def __init__(self, model: TransformerLM, q: float = 0.2) -> None:
        super().__init__()
        block = cast(Block, model.blocks[0])
        width, heads = model.token_embedding.embedding_dim, block.attention.heads
        layer = nn.TransformerEncoderLayer(
            width, heads, block.fc.out_features, q, activation="gelu", norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, len(model.blocks), enable_nested_tensor=False)
        self.token_embedding, self.position_embedding = (
            model.token_embedding,
            model.position_embedding,
        )
        self.dropout, self.ln_final, self.decoder = (
            nn.Dropout(q),
            nn.LayerNorm(width),
            model.decoder,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, B, V]`` with dropout at every place ``TransformerLM`` has a site."""
        steps = tokens.shape[0]
        positions = torch.arange(steps, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions)[:, None])
        causal = nn.Transformer.generate_square_subsequent_mask(steps, device=tokens.device)
        x = self.encoder(x, mask=causal, is_causal=True)
        return self.decoder(self.dropout(self.ln_final(x)))
