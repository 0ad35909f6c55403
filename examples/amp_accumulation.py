"""A plain PyTorch loop with a dropsplit method, mixed precision and gradient accumulation.

The method adds its gradient to ``p.grad`` and calls the ``backward=`` it is given on the one
scalar it backpropagates, so the loop keeps what it already does: ``torch.autocast`` around the
step, a ``GradScaler`` (float16 on CUDA) that scales that scalar, a division by the number of
micro-batches, and one optimizer step per window. On the CPU it runs in bfloat16, which needs
no scaler.

Run: ``python examples/amp_accumulation.py`` (about a second of training on a CPU).
"""

from __future__ import annotations

import torch
from torch import nn

import dropsplit as ds

MICRO_BATCHES = 4  # micro-batches per optimizer step
STEPS = 30


def forward_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    """``(logits[N, C], targets[N])``: what every method needs from the model."""
    x, y = batch
    return model(x), y


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 8 dimensions, one class each."""
    centers = 2.0 * torch.randn(4, 8, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    return centers[y] + torch.randn(n, 8, generator=generator), y


def main() -> None:
    """Train a small MLP with Dropout_2 plus its analytic noise, under autocast."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bfloat16 on the CPU; float16 on CUDA, whose small range needs the scaler
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    model = nn.Sequential(
        nn.Linear(8, 64), nn.GELU(), ds.Dropout(0.3), nn.Linear(64, 64), nn.GELU(),
        ds.Dropout(0.3), nn.Linear(64, 4),
    ).to(device)  # fmt: skip
    method = ds.DropoutK(2, noise="analytic", seed=0)  # any dropsplit method works here
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = make_data(4096, torch.Generator().manual_seed(1))
    x, y = x.to(device), y.to(device)

    def backward(scalar: torch.Tensor) -> None:
        # each micro-batch's mean loss is 1/MICRO_BATCHES of the window's mean
        scaler.scale(scalar / MICRO_BATCHES).backward()

    model.train()
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        window = torch.randint(0, len(y), (MICRO_BATCHES * 32,))
        losses = []
        for micro in window.chunk(MICRO_BATCHES):
            with torch.autocast(device.type, dtype=amp_dtype):
                result = method.step(model, forward_fn, (x[micro], y[micro]), backward=backward)
            losses.append(result.loss)
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        if step % 10 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  loss {sum(losses) / len(losses):.4f}  ({amp_dtype})")

    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype):
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    print(f"final: train accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
