"""An LSTM that supports double backward, ``torch.func`` and DropConnect on ``W_hh``.

Each layer is an :class:`LSTMLayer` with ``nn.LSTM``'s parameter layout, wrapped in a
:class:`~dropsplit.core.sites.DropConnect` site on ``weight_hh`` (no ``WeightDrop`` hack: the masked
weight is passed to the layer for one call through ``functional_call``).

Two implementations give the same values and gradients:

* ``"fused"`` (default): ``nn.LSTM``'s own kernel (``torch.lstm``) called with the (masked)
  weights. On the CPU it is differentiable twice, but autograd differentiates its backward as
  thousands of small ops, slower than differentiating the loop; so on the CPU a forward under a
  live gate context (its ``differentiated_twice`` attribute, set by
  :func:`~dropsplit.core.sites.site_context`: a method will double backward) runs
  the loop. On CUDA, cuDNN cannot do double backward, so cuDNN is switched off for the call
  whenever gradients are recorded (and used in ``no_grad``).
* ``"loop"``: a time loop of plain tensor ops: works under ``torch.func`` transforms (``vmap``,
  ``jacrev``) and with a ``[k, 4H, H]`` stack of recurrent weights (one DropConnect mask per
  replica, for Dropout_k by batch duplication). With such a stack the fused path calls the
  kernel once per replica on its slice of the batch.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from dropsplit.core.sites import DropConnect

State = tuple[torch.Tensor, torch.Tensor]
IMPLEMENTATIONS = ("fused", "loop")


class LSTMLayer(nn.Module):
    """One LSTM layer, sequence-first, with ``nn.LSTM``'s gates (i, f, g, o) and init.

    Args:
        input_size: Features per step.
        hidden_size: Hidden units ``H``.
        implementation: ``"fused"`` or ``"loop"``.
    """

    def __init__(self, input_size: int, hidden_size: int, implementation: str = "fused") -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.implementation = implementation
        self.differentiated_twice = False  # set by site_context while a method gates the sites
        bound = 1 / math.sqrt(hidden_size)
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(gates).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(gates).uniform_(-bound, bound))

    def zero_state(self, batch_size: int) -> State:
        """``(h[1, B, H], c[1, B, H])``, zeros."""
        zeros = self.bias_hh.new_zeros(1, batch_size, self.hidden_size)
        return zeros, zeros.clone()

    def extra_repr(self) -> str:
        """Sizes and implementation."""
        return f"{self.input_size}, {self.hidden_size}, implementation={self.implementation!r}"

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Run ``x[T, B, input_size]`` from ``state = (h[1, B, H], c[1, B, H])``.

        Returns:
            ``(outputs[T, B, H], (h_T[1, B, H], c_T[1, B, H]))``.
        """
        if state is None:
            zeros = x.new_zeros(1, x.shape[1], self.hidden_size)
            state = (zeros, zeros)
        twice = x.device.type == "cpu" and self.differentiated_twice
        if self.implementation == "fused" and not twice:
            if self.weight_hh.dim() == 3:
                return self._fused_replicas(x, state)
            return self._fused(x, state)
        return self._loop(x, state)

    def _fused(
        self, x: torch.Tensor, state: State, weight_hh: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN has no bfloat16 LSTM primitive for mixed inputs: the kernel runs in float32
            with torch.autocast("cpu", enabled=False):
                return self._fused(x.float(), (state[0].float(), state[1].float()), weight_hh)
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        weights = [self.weight_ih, w_hh, self.bias_ih, self.bias_hh]
        no_cudnn = x.is_cuda and torch.is_grad_enabled()
        flags = torch.backends.cudnn.flags(enabled=False) if no_cudnn else contextlib.nullcontext()
        with flags:
            out, h, c = torch.lstm(x, state, weights, True, 1, 0.0, self.training, False, False)
        return out, (h, c)

    def _fused_replicas(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One kernel call per replica's slice of the batch, each with its own ``W_hh``."""
        stack = self.weight_hh
        k = stack.shape[0]
        slices = zip(x.chunk(k, 1), state[0].chunk(k, 1), state[1].chunk(k, 1), strict=True)
        parts = [
            self._fused(xr, (h0, c0), w) for w, (xr, h0, c0) in zip(stack, slices, strict=True)
        ]
        out = torch.cat([o for o, _ in parts], 1)
        return out, (
            torch.cat([h for _, (h, _) in parts], 1),
            torch.cat([c for _, (_, c) in parts], 1),
        )

    def _loop(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        steps, batch, _ = x.shape
        hidden = self.hidden_size
        w_hh = self.weight_hh
        replicas = w_hh.shape[0] if w_hh.dim() == 3 else 1
        pre = (x @ self.weight_ih.T + (self.bias_ih + self.bias_hh)).unbind(0)
        h, c = state[0][0], state[1][0]
        outputs = []
        for t in range(steps):
            if replicas == 1:
                gates = torch.addmm(pre[t], h, w_hh.T)
            else:
                rec = torch.bmm(h.view(replicas, -1, hidden), w_hh.transpose(1, 2))
                gates = pre[t] + rec.reshape(batch, 4 * hidden)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))


class LSTM(nn.Module):
    """Multi-layer LSTM, a sequence-first counterpart of ``nn.LSTM`` with DropConnect on ``W_hh``.

    ``out, (h_n, c_n) = lstm(x, state=None)`` with ``h_n, c_n`` of shape ``[L, B, H]``.

    Args:
        input_size: Features per step.
        hidden_size: Hidden units of every layer.
        num_layers: Number of stacked layers.
        weight_dropout: DropConnect probability on each layer's ``weight_hh``.
        implementation: ``"fused"`` (``nn.LSTM``'s kernel) or ``"loop"`` (see module doc).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        weight_dropout: float = 0.0,
        implementation: str = "fused",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DropConnect(
                LSTMLayer(input_size if i == 0 else hidden_size, hidden_size, implementation),
                "weight_hh",
                weight_dropout,
                batched_weights=True,
            )
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Run ``x[T, B, input_size]`` from ``state = (h0[L, B, H], c0[L, B, H])``."""
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            layer_state = None if state is None else (state[0][i : i + 1], state[1][i : i + 1])
            x, (h, c) = layer(x, layer_state)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))

    @classmethod
    def from_torch(cls, lstm: nn.LSTM, weight_dropout: float = 0.0, **kwargs) -> LSTM:
        """Copy an ``nn.LSTM`` (sequence-first, unidirectional, with biases, no projection).

        Args:
            lstm: The module to copy.
            weight_dropout: DropConnect probability of the new module.
            **kwargs: Passed to the constructor (e.g. ``implementation``).

        Returns:
            An :class:`LSTM` with the same weights, dtype and device.

        Raises:
            ValueError: For an ``nn.LSTM`` configuration this class does not represent.
        """
        unsupported = {
            "batch_first": lstm.batch_first,
            "bidirectional": lstm.bidirectional,
            "proj_size": lstm.proj_size > 0,
            "bias=False": not lstm.bias,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"LSTM.from_torch does not support {', '.join(bad)}")
        new = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, weight_dropout, **kwargs)
        p = next(lstm.parameters())
        new.to(dtype=p.dtype, device=p.device)
        with torch.no_grad():
            for i, site in enumerate(new.layers):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(site.module, name).copy_(getattr(lstm, f"{name}_l{i}"))
        return new
