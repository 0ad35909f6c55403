"""Lightning with a dropsplit method: a ``DropsplitModule`` trained by ``lightning.Trainer``.

:class:`~dropsplit.integrations.lightning.DropsplitModule` uses manual optimization: its
``training_step`` runs ``method.step(self, forward_fn, batch, backward=self.manual_backward)``
and steps the optimizer every ``accumulate_grad_batches`` batches. Mixed precision is the
``Trainer``'s (bfloat16 autocast here, on the CPU).

Run: ``python examples/lightning_recipe.py`` (needs ``pip install "dropsplit[lightning]"``).
"""

from __future__ import annotations

import lightning
import torch
from torch import nn

import dropsplit as ds
from dropsplit.integrations.lightning import DropsplitModule


def forward_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    """``(logits[N, C], targets[N])``; called with the module itself."""
    x, y = batch
    return module(x), y


class Classifier(DropsplitModule):
    """A small MLP; the analytic method replaces dropout's noise and its explicit effect."""

    def __init__(self) -> None:
        super().__init__(
            ds.Analytic(seed=0), forward_fn, accumulate_grad_batches=2, gradient_clip_val=1.0
        )
        self.net = nn.Sequential(
            nn.Linear(8, 64), nn.GELU(), ds.Dropout(0.3), nn.Linear(64, 4)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW (a scheduler configured here would be stepped too)."""
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    """Fit 30 optimizer steps (60 micro-batches) on four Gaussian blobs."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    centers = 2.0 * torch.randn(4, 8, generator=g)
    y = torch.randint(0, 4, (1024,), generator=g)
    x = centers[y] + torch.randn(1024, 8, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True
    )
    module = Classifier()
    trainer = lightning.Trainer(
        max_steps=30,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    metrics = trainer.callback_metrics
    print(
        f"final: step {trainer.global_step}  loss {metrics['train_loss']:.4f}  "
        f"explicit {metrics['dropsplit/explicit']:.4f}"
    )


if __name__ == "__main__":
    main()
