"""The quasi-recurrent network (Bradbury et al., 2017) as the paper's QRNN runs used it.

A layer maps the current input (``window=1``) or the previous and current inputs (``window=2``)
through one linear map to three gates, ``Z = tanh``, ``F = sigmoid``, ``O = sigmoid``, then runs
the forget-mult recurrence and the output gate:

    c_t = f_t * z_t + (1 - f_t) * c_{t-1},        h_t = o_t * c_t.

The last input of a window is carried into the next (``save_prev_x``), so BPTT windows read as
one sequence. Everything is plain tensor ops (no compiled kernel), so it is differentiable twice
and works under ``torch.func``. Two forget-mults give the same values:

* ``"loop"``: the time loop, ``T`` small steps;
* ``"scan"``: a Hillis-Steele scan over ``(a, b) o (a', b') = (a a', b + a b')`` with
  ``a = 1 - f`` and ``b = f z``: ``log2 T`` steps of whole-sequence ops (no log-space or
  divide-by-cumprod tricks: ``z`` can be negative and products underflow).

The input-to-gates weight can be a stack ``[k, 3H, window * E]`` (one DropConnect mask per
replica, for Dropout_k by batch duplication): replica ``r`` reads batch columns ``r B/k .. ``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dropsplit.core.sites import DropConnect

QRNNState = tuple[torch.Tensor, torch.Tensor]  # (c[1, B, H], previous input[1, B, E])
FORGET_MULTS = ("loop", "scan")


def forget_mult_loop(f: torch.Tensor, z: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """``c_t = f_t z_t + (1 - f_t) c_{t-1}`` for ``f, z[T, B, H]`` from ``c0[B, H]``, by a loop."""
    c, out = c0, []
    for t in range(f.shape[0]):
        c = f[t] * z[t] + (1 - f[t]) * c
        out.append(c)
    return torch.stack(out)


def forget_mult_scan(f: torch.Tensor, z: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """The same recurrence as :func:`forget_mult_loop` by a Hillis-Steele parallel scan.

    ``c_t = a_t c_{t-1} + b_t`` with ``a = 1 - f``, ``b = f z`` (``c0`` folded into ``b_0``);
    after the pass with offset ``s``, ``(a_t, b_t)`` composes steps ``t - 2s + 1 .. t``.
    """
    a, b = 1 - f, f * z
    b = torch.cat([(b[0] + a[0] * c0).unsqueeze(0), b[1:]])
    offset = 1
    while offset < f.shape[0]:
        b = torch.cat([b[:offset], b[offset:] + a[offset:] * b[:-offset]])
        a = torch.cat([a[:offset], a[offset:] * a[:-offset]])
        offset *= 2
    return b


class QRNNLayer(nn.Module):
    """One QRNN layer, sequence-first, with awd-lstm-lm's gate layout ``(Z, F, O)``.

    Args:
        input_size: Features per step ``E``.
        hidden_size: Hidden units ``H``.
        window: 1 (current input) or 2 (previous and current input).
        forget_mult: ``"loop"`` or ``"scan"`` (same values).
    """

    def __init__(
        self, input_size: int, hidden_size: int, window: int = 1, forget_mult: str = "scan"
    ) -> None:
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"window must be 1 or 2, got {window}")
        if forget_mult not in FORGET_MULTS:
            raise ValueError(f"forget_mult must be one of {FORGET_MULTS}, got {forget_mult!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.window = window
        self.forget_mult = forget_mult
        bound = 1 / math.sqrt(window * input_size)  # nn.Linear's init
        self.weight = nn.Parameter(
            torch.empty(3 * hidden_size, window * input_size).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(3 * hidden_size).uniform_(-bound, bound))

    def extra_repr(self) -> str:
        """Sizes, window and forget-mult."""
        return (
            f"{self.input_size}, {self.hidden_size}, window={self.window}, "
            f"forget_mult={self.forget_mult!r}"
        )

    def zero_state(self, batch_size: int) -> QRNNState:
        """``(c[1, B, H], previous input[1, B, E])``, zeros."""
        p = self.bias
        return p.new_zeros(1, batch_size, self.hidden_size), p.new_zeros(
            1, batch_size, self.input_size
        )

    def gates(self, source: torch.Tensor) -> torch.Tensor:
        """``source[T, B, window E] @ W^T + b``, with one weight per replica for a stack."""
        if self.weight.dim() == 2:
            return source @ self.weight.T + self.bias
        steps, batch, width = source.shape
        k = self.weight.shape[0]
        per_replica = source.reshape(steps, k, batch // k, width)
        out = torch.einsum("tkbe,kge->tkbg", per_replica, self.weight)
        return out.reshape(steps, batch, -1) + self.bias

    def forward(
        self, x: torch.Tensor, state: QRNNState | None = None
    ) -> tuple[torch.Tensor, QRNNState]:
        """Run ``x[T, B, E]`` from ``state``.

        Returns:
            ``(h[T, B, H], (c_T[1, B, H], x_T[1, B, E]))``.
        """
        c0, previous = self.zero_state(x.shape[1]) if state is None else state
        source = x
        if self.window == 2:
            source = torch.cat([torch.cat([previous, x[:-1]]), x], dim=-1)
        z, f, o = self.gates(source).chunk(3, dim=-1)
        run = forget_mult_loop if self.forget_mult == "loop" else forget_mult_scan
        c = run(torch.sigmoid(f), torch.tanh(z), c0[0])
        return torch.sigmoid(o) * c, (c[-1:], x[-1:])


class QRNN(nn.Module):
    """Multi-layer QRNN with DropConnect on each layer's input-to-gates weight.

    ``out, state = qrnn(x, state=None)`` with one :data:`QRNNState` per layer.

    Args:
        input_size: Features per step.
        hidden_size: Hidden units of every layer.
        num_layers: Number of stacked layers.
        weight_dropout: DropConnect probability on each layer's ``weight``.
        windows: Window of each layer (default: awd-lstm-lm's 2 for the first, 1 after).
        forget_mult: ``"loop"`` or ``"scan"``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        weight_dropout: float = 0.0,
        windows: tuple[int, ...] | None = None,
        forget_mult: str = "scan",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        windows = windows or awd_windows(num_layers)
        if len(windows) != num_layers:
            raise ValueError(f"windows must give one window per layer, got {windows}")
        self.layers = nn.ModuleList(
            qrnn_site(
                QRNNLayer(input_size if i == 0 else hidden_size, hidden_size, w, forget_mult),
                weight_dropout,
                i,
            )
            for i, w in enumerate(windows)
        )

    def forward(
        self, x: torch.Tensor, state: tuple[QRNNState, ...] | None = None
    ) -> tuple[torch.Tensor, tuple[QRNNState, ...]]:
        """Run ``x[T, B, input_size]`` through every layer."""
        new_state = []
        for i, layer in enumerate(self.layers):
            x, layer_state = layer(x, None if state is None else state[i])
            new_state.append(layer_state)
        return x, tuple(new_state)


def awd_windows(layers: int) -> tuple[int, ...]:
    """awd-lstm-lm's windows: 2 in the first layer, 1 after."""
    return (2,) + (1,) * (layers - 1)


def qrnn_site(layer: QRNNLayer, p: float, index: int) -> DropConnect:
    """``layer`` behind its DropConnect site on ``weight``, labelled ``weight.<index>``."""
    return DropConnect(layer, "weight", p, batched_weights=True, label=f"weight.{index}")
