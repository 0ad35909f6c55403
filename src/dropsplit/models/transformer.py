"""A decoder-only Transformer language model with a dropout site wherever GPT-2 / nanoGPT drop.

Pre-LayerNorm blocks (causal multi-head attention, then a GELU MLP), a learned position
embedding, a tied decoder. Sites, named as they appear in stats and logs:

* ``input``: the embedding output (token + position);
* ``attention.i``: the attention probabilities of block ``i`` (Transformer-XL's ``dropatt``);
* ``attn_out.i``: the attention block's output, before the residual add;
* ``mlp_hidden.i``: the MLP's hidden activation (after the GELU);
* ``mlp_out.i``: the MLP's output, before the residual add;
* ``output``: the final (normed) output, before the decoder.

Sequence-first like the recurrent models: tokens ``[T, B]``, activations ``[T, B, D]``,
attention probabilities ``[heads, B, T, T]``, so every site's batch dimension is 1 and Dropout_k by
batch duplication tiles the token columns. The model is stateless: a window sees only itself.

Attention takes one of two paths with the same values: ``F.scaled_dot_product_attention`` (fused
kernels) when the attention site does not act and no one will differentiate twice, else an
explicit ``softmax(q k^T / sqrt(d) + causal mask) v`` with the site on the probabilities. The fused
CPU and CUDA kernels have no double backward; the explicit path is always twice differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dropsplit.core.sites import Dropout


def _site(p: float, label: str) -> Dropout:
    return Dropout(p, batch_dim=1, label=label)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with a site on its probabilities and on its output.

    Args:
        width: Model width ``D`` (a multiple of ``heads``).
        heads: Number of heads.
        p_attention: Site ``attention.<index>`` on the probabilities.
        p_out: Site ``attn_out.<index>`` on the projected output.
        index: Block index, for the site labels.
    """

    def __init__(self, width: int, heads: int, p_attention: float, p_out: float, index: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attention_dropout = _site(p_attention, f"attention.{index}")
        self.out_dropout = _site(p_out, f"attn_out.{index}")
        self.differentiated_twice = False  # set by site_context while a method double-backwards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over ``x[T, B, D]`` (position ``t`` sees ``<= t``), projected, site applied."""
        steps, batch, width = x.shape
        q, k, v = self.qkv(x).view(steps, batch, 3, self.heads, -1).unbind(2)  # [T, B, h, d]
        if self.attention_dropout.acting or self.differentiated_twice:
            y = self.explicit(q, k, v)
        else:
            # [B, h, T, d] for the fused kernels
            q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3)
        return self.out_dropout(self.proj(y.reshape(steps, batch, width)))

    def explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``site(softmax(q k^T / sqrt(d) + causal)) v`` for ``q, k, v[T, B, h, d]``."""
        steps = q.shape[0]
        scores = torch.einsum("ibhd,jbhd->hbij", q, k) / math.sqrt(q.shape[-1])
        future = torch.ones(steps, steps, dtype=torch.bool, device=q.device).triu(1)
        probs = self.attention_dropout(scores.masked_fill(future, float("-inf")).softmax(-1))
        return torch.einsum("hbij,jbhd->ibhd", probs, v)


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``, sites inside."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_width: int,
        p_attention: float,
        p_attn_out: float,
        p_mlp_hidden: float,
        p_mlp_out: float,
        index: int,
    ) -> None:
        super().__init__()
        self.ln_attention = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, p_attention, p_attn_out, index)
        self.ln_mlp = nn.LayerNorm(width)
        self.fc = nn.Linear(width, mlp_width)
        self.mlp_hidden_dropout = _site(p_mlp_hidden, f"mlp_hidden.{index}")
        self.fc_out = nn.Linear(mlp_width, width)
        self.mlp_out_dropout = _site(p_mlp_out, f"mlp_out.{index}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block on ``x[T, B, D]``."""
        x = x + self.attention(self.ln_attention(x))
        hidden = self.mlp_hidden_dropout(F.gelu(self.fc(self.ln_mlp(x))))
        return x + self.mlp_out_dropout(self.fc_out(hidden))


class TransformerLM(nn.Module):
    """Decoder-only causal Transformer LM with the sites listed in the module docstring.

    ``logits, state = model(tokens[T, B], state=None)`` with ``logits[T, B, V]``; the state is
    ``()`` (stateless), so the model drops into the recurrent models' training loop.
    ``p_input``, ``p_attention``, ``p_attn_out``, ``p_mlp_hidden``, ``p_mlp_out`` and
    ``p_output`` are each site's ``q``.

    Args:
        vocab_size: Number of tokens.
        width: Model width ``D`` (embedding size).
        layers: Number of blocks.
        heads: Attention heads per block (``D`` must be a multiple).
        context: Longest window (rows of the position embedding).
        mlp_width: MLP hidden width (default ``4 D``).
        tie_weights: Tie the decoder weight to the token embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        context: int = 128,
        mlp_width: int | None = None,
        p_input: float = 0.1,
        p_attention: float = 0.1,
        p_attn_out: float = 0.1,
        p_mlp_hidden: float = 0.0,
        p_mlp_out: float = 0.1,
        p_output: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.context = context
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context, width)
        self.input_dropout = _site(p_input, "input")
        mlp = 4 * width if mlp_width is None else mlp_width
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp, p_attention, p_attn_out, p_mlp_hidden, p_mlp_out, i)
            for i in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.output_dropout = _site(p_output, "output")
        self.decoder = nn.Linear(width, vocab_size)
        self.apply(self._init)
        if tie_weights:
            self.decoder.weight = self.token_embedding.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        """GPT-2's init: normal(0, 0.02) weights, zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_state(self, batch_size: int) -> tuple[()]:
        """``()``: the model carries nothing across windows."""
        return ()

    def forward(
        self, tokens: torch.Tensor, state: tuple[()] | None = None
    ) -> tuple[torch.Tensor, tuple[()]]:
        """Logits ``[T, B, V]`` for ``tokens[T, B]`` (``T <= context``), and ``()``."""
        steps = tokens.shape[0]
        if steps > self.context:
            raise ValueError(
                f"a window of {steps} tokens is longer than the model's context {self.context}: "
                "raise the context (model.context) or shorten the windows (data.bptt)"
            )
        positions = torch.arange(steps, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)[:, None]
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.decoder(self.output_dropout(self.ln_final(x))), ()
