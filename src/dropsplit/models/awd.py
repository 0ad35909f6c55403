"""The AWD-style language models of the paper's experiments (Sec. 4, awd-lstm-lm): LSTM and QRNN.

Sites, named as they appear in stats and logs:

* ``embedding``: embedding-row dropout (DropConnect on the embedding rows), optional;
* ``input``: locked dropout on the embedding output;
* ``hidden.i``: locked dropout between layers ``i`` and ``i + 1``;
* ``output``: locked dropout on the last layer's output, before the decoder;
* ``weight_hh.i`` (LSTM): DropConnect on layer ``i``'s recurrent weight;
* ``weight.i`` (QRNN): DropConnect on layer ``i``'s input-to-gates weight.

Locked masks are ``(1, B, H)``: one value per unit and sequence, shared over time. The decoder is
tied to the embedding (the last layer then has ``embedding_size`` units).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from dropsplit.core.sites import DropConnect, Dropout
from dropsplit.models.lstm import LSTMLayer
from dropsplit.models.qrnn import QRNNLayer, awd_windows, qrnn_site


class Embedding(nn.Embedding):
    """``nn.Embedding`` that also takes a ``[k, V, E]`` stack of weights.

    With one row mask per replica (Dropout_k by batch duplication), replica ``r`` of the
    sequence-first tokens ``[T, k B]`` reads columns ``r B .. (r + 1) B - 1``.
    """

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Look up ``tokens``."""
        if self.weight.dim() == 2:
            return super().forward(tokens)
        replicas = self.weight.shape[0]
        columns = torch.arange(tokens.shape[1], device=tokens.device)
        replica = (columns // (tokens.shape[1] // replicas)).expand_as(tokens)
        return self.weight[replica, tokens]


class RecurrentLM(nn.Module):
    """Embedding, ``layers`` recurrent layers behind weight sites, tied decoder (awd-lstm-lm).

    Subclasses say which layer: :meth:`make_layer` returns layer ``i`` behind its weight site.

    Args:
        vocab_size: Number of tokens.
        embedding_size: Embedding size (and last layer size when tied).
        hidden_size: Hidden size of the other layers.
        layers: Number of LSTM layers.
        p_input: Locked dropout on the embedding output.
        p_hidden: Locked dropout between layers.
        p_output: Locked dropout before the decoder.
        p_weight: DropConnect on each ``W_hh``.
        p_embedding: Embedding-row dropout (0 disables the site).
        tie_weights: Tie the decoder weight to the embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int = 400,
        hidden_size: int = 1150,
        layers: int = 3,
        p_input: float = 0.4,
        p_hidden: float = 0.4,
        p_output: float = 0.4,
        p_weight: float = 0.4,
        p_embedding: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.encoder = Embedding(vocab_size, embedding_size)
        self.embedding_dropout = DropConnect(
            self.encoder,
            "weight",
            p_embedding,
            shared_dims=(1,),
            batched_weights=True,
            label="embedding",
        )
        self.input_dropout = Dropout(p_input, shared_dims=(0,), batch_dim=1, label="input")
        sizes = [embedding_size] + [hidden_size] * (layers - 1)
        sizes.append(embedding_size if tie_weights else hidden_size)
        self.rnns = nn.ModuleList(
            self.make_layer(i, sizes[i], sizes[i + 1], p_weight) for i in range(layers)
        )
        self.hidden_dropouts = nn.ModuleList(
            Dropout(p_hidden, shared_dims=(0,), batch_dim=1, label=f"hidden.{i}")
            for i in range(layers - 1)
        )
        self.output_dropout = Dropout(p_output, shared_dims=(0,), batch_dim=1, label="output")
        self.decoder = nn.Linear(sizes[-1], vocab_size)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.sizes = sizes

    def make_layer(self, index: int, input_size: int, output_size: int, p: float) -> DropConnect:
        """Layer ``index`` behind its weight site."""
        raise NotImplementedError

    def init_state(self, batch_size: int) -> tuple[Any, ...]:
        """Zero state per layer (the layer's ``zero_state``)."""
        layers = (cast(LSTMLayer | QRNNLayer, site.module) for site in self.rnns)
        return tuple(layer.zero_state(batch_size) for layer in layers)

    def forward(
        self, tokens: torch.Tensor, state: tuple[Any, ...] | None = None
    ) -> tuple[torch.Tensor, tuple[Any, ...]]:
        """Logits ``[T, B, V]`` and the new state for tokens ``[T, B]``."""
        x = self.input_dropout(self.embedding_dropout(tokens))
        new_state = []
        for i, rnn in enumerate(self.rnns):
            x, layer_state = rnn(x, None if state is None else state[i])
            new_state.append(layer_state)
            if i < len(self.hidden_dropouts):
                x = self.hidden_dropouts[i](x)
        return self.decoder(self.output_dropout(x)), tuple(new_state)


class AWDLSTM(RecurrentLM):
    """The AWD-LSTM: :class:`RecurrentLM` with :class:`~dropsplit.models.lstm.LSTMLayer` layers.

    ``vocab_size``, ``embedding_size``, ``hidden_size``, ``layers``, ``p_input``, ``p_hidden``,
    ``p_output``, ``p_weight``, ``p_embedding`` and ``tie_weights`` are as for
    :class:`RecurrentLM` (``p_weight`` on each ``W_hh``).

    Args:
        implementation: LSTM implementation, ``"fused"`` or ``"loop"``.
    """

    def __init__(self, *args: Any, implementation: str = "fused", **kwargs: Any) -> None:
        self.implementation = implementation
        super().__init__(*args, **kwargs)

    def make_layer(self, index: int, input_size: int, output_size: int, p: float) -> DropConnect:
        """An LSTM layer behind DropConnect on its recurrent weight (``weight_hh.<index>``)."""
        return DropConnect(
            LSTMLayer(input_size, output_size, self.implementation),
            "weight_hh",
            p,
            batched_weights=True,
            label=f"weight_hh.{index}",
        )


class QRNNLM(RecurrentLM):
    """The AWD-QRNN: :class:`RecurrentLM` with :class:`~dropsplit.models.qrnn.QRNNLayer` layers.

    Windows as awd-lstm-lm (2 in the first layer, 1 after); ``p_weight`` is DropConnect on each
    layer's input-to-gates weight (``weight.<i>``), the paper's weight dropout for the QRNN.

    ``vocab_size``, ``embedding_size``, ``hidden_size``, ``layers``, ``p_input``, ``p_hidden``,
    ``p_output``, ``p_weight``, ``p_embedding`` and ``tie_weights`` are as for
    :class:`RecurrentLM`.

    Args:
        forget_mult: ``"loop"`` or ``"scan"`` (same values).
    """

    def __init__(self, *args: Any, forget_mult: str = "scan", **kwargs: Any) -> None:
        self.forget_mult = forget_mult
        super().__init__(*args, **kwargs)

    def make_layer(self, index: int, input_size: int, output_size: int, p: float) -> DropConnect:
        """A QRNN layer (window 2 first, 1 after) behind DropConnect on its ``weight``."""
        window = awd_windows(index + 1)[index]
        return qrnn_site(QRNNLayer(input_size, output_size, window, self.forget_mult), p, index)


def detach_state(state):
    """Detach a (nested) recurrent state from the graph (truncated BPTT)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    return state


def sequence_examples(out) -> torch.Tensor:
    """Example (batch column) of each target of :func:`lm_forward`'s flattened ``[T * B]``.

    For ``Analytic(gradient=ds.FiniteDifference(examples=sequence_examples))`` on a recurrent
    model; ``B`` is read from the returned recurrent state (``aux``). For any model (the
    stateless Transformer too) with a known batch size, use :func:`column_examples`.
    """
    columns = out.aux[0][0].shape[1]
    return torch.arange(out.n, device=out.logits.device) % columns


def column_examples(columns: int) -> Callable[[Any], torch.Tensor]:
    """``FiniteDifference(examples=...)`` for :func:`lm_forward` on ``columns`` sequences.

    For any model; the trainer offers it to the estimator as its batch layout.
    """

    def examples(out) -> torch.Tensor:
        if out.n % columns:
            raise ValueError(f"{out.n} targets do not split into {columns} sequences")
        return torch.arange(out.n, device=out.logits.device) % columns

    return examples


def lm_forward(model: nn.Module, batch):
    """``forward_fn`` for ``(inputs[T, B], targets[T, B], state)``; aux is the detached state."""
    inputs, targets, state = batch
    logits, state = model(inputs, state)
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), detach_state(state)
