"""Lightning: a ``LightningModule`` that trains with a dropsplit method (manual optimization).

A method makes the gradient itself (several forwards, its own backward), which is what
Lightning's manual optimization is for: :class:`DropsplitModule` sets
``automatic_optimization = False`` and its ``training_step`` runs
``method.step(self, forward_fn, batch, backward=self.manual_backward)``, then steps the
optimizer. Subclass it, build the model in ``__init__`` and define ``configure_optimizers``::

    class Classifier(DropsplitModule):
        def __init__(self):
            super().__init__(ds.DropoutK(2, noise="analytic", seed=0), forward_fn=mlp_forward)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), ds.Dropout(0.2), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    lightning.Trainer(max_steps=100, precision="bf16-mixed").fit(Classifier(), loader)

What the ``Trainer`` would do under automatic optimization, and refuses to do under manual
optimization, is done here: gradient accumulation (``accumulate_grad_batches``: each
micro-batch's gradient divided by it, as Lightning does; DDP does not synchronize on the
micro-batches before the last), clipping (``gradient_clip_val``, in ``on_before_optimizer_step``,
after an AMP scaler has unscaled the gradients) and the learning-rate schedulers of
``configure_optimizers`` (``interval="step"`` per optimizer step, ``"epoch"`` per epoch, with
their ``frequency``; ``ReduceLROnPlateau`` is left to you). Mixed precision is the
``Trainer``'s ``precision=``: the step runs under its autocast and ``manual_backward`` applies
its ``GradScaler``.

This module imports ``lightning`` (or, where only it is installed, ``pytorch_lightning``):
install ``dropsplit[lightning]``. ``import dropsplit`` does not import it.
"""

from __future__ import annotations

from typing import Any

import torch

from dropsplit.core.forward import ForwardFn
from dropsplit.methods import Method

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same code
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["DropsplitModule"]

STATE_KEY = "dropsplit_method"  # the method's generator state in Lightning checkpoints


class DropsplitModule(pl.LightningModule):
    """A ``LightningModule`` whose training step is a dropsplit method's step.

    ``forward_fn`` is called with the module itself, ``forward_fn(self, batch)``. Each
    training step logs ``train_loss`` (the method's data loss) and the method's scalar stats as
    ``dropsplit/<name>``. Checkpoints hold the method's generator state. Under DDP, give each
    process its own seed (e.g. ``seed=base + trainer.global_rank``).

    Args:
        method: The dropsplit method.
        forward_fn: ``(module, batch) -> (logits[N, C], targets[N][, aux])``.
        accumulate_grad_batches: Micro-batches per optimizer step (``>= 1``).
        gradient_clip_val: Clip the gradient to this norm (or value) before each step.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.

    Raises:
        TypeError: If ``method`` is not a dropsplit method or ``forward_fn`` is not callable.
        ValueError: If ``accumulate_grad_batches < 1``.
    """

    def __init__(
        self,
        method: Method,
        forward_fn: ForwardFn,
        *,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        super().__init__()
        if not isinstance(method, Method):
            raise TypeError(f"method must be a dropsplit method, got {type(method).__name__}")
        if not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}")
        m = accumulate_grad_batches
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"accumulate_grad_batches must be an int, got {type(m).__name__}")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.automatic_optimization = False  # the method runs its own backward
        self.method = method
        self.forward_fn = forward_fn
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One micro-batch: the method's gradient added to ``p.grad``; a step every window.

        Args:
            batch: Passed to ``forward_fn``.
            batch_idx: Index of the batch in the epoch (the window is
                ``accumulate_grad_batches`` consecutive batches).

        Returns:
            The method's data loss on the batch, detached.
        """
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise TypeError("DropsplitModule steps one optimizer: configure_optimizers gave more")
        m = self.accumulate_grad_batches
        last = (batch_idx + 1) % m == 0 or self.trainer.is_last_batch

        def backward(scalar: torch.Tensor) -> None:
            self.manual_backward(scalar / m)  # as Lightning's own accumulation scales

        # toggle_model(sync_grad=False): DDP's no_sync on the micro-batches before the last
        with optimizer.toggle_model(sync_grad=last):
            result = self.method.step(self, self.forward_fn, batch, backward=backward)
        if last:
            optimizer.step()  # clipping: on_before_optimizer_step, after unscaling
            optimizer.zero_grad()
            self._step_schedulers("step")
        self.log("train_loss", result.loss, prog_bar=True)
        stats = {f"dropsplit/{key}": value for key, value in result.stats.items() if "/" not in key}
        stats.pop("dropsplit/loss", None)
        if stats:
            self.log_dict(stats)
        return torch.tensor(result.loss)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip the (unscaled) gradient when ``gradient_clip_val`` is set."""
        if self.gradient_clip_val:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def on_train_epoch_end(self) -> None:
        """Step the schedulers configured with ``interval="epoch"``."""
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        count = self.trainer.global_step if interval == "step" else self.current_epoch + 1
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or config.reduce_on_plateau:
                continue  # ReduceLROnPlateau needs the monitored value: the user steps it
            if count % config.frequency == 0:
                config.scheduler.step()  # type: ignore[call-arg]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the method's generator state, so a resumed run draws the same masks."""
        checkpoint[STATE_KEY] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the method's generator state saved by :meth:`on_save_checkpoint`."""
        if STATE_KEY in checkpoint:
            self.method.load_state_dict(checkpoint[STATE_KEY])
