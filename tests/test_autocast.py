"""Mixed precision: every method under torch.autocast(bfloat16) gives the float32 gradient
with the same draws, to the rounding of bfloat16.

Tolerance, derived: bfloat16 keeps 8 significant bits, so each rounding of an operand is a
relative error of at most u/2 = 2^-9; the matmuls accumulate in float32. The gradient of a
weight of this three-layer MLP passes through at most 8 rounded operands on its way from the
loss (3 forward matmuls, 3 backward ones, the softmax input and the loss gradient), so to first
order its relative error is at most 8 * 2^-9 = 2^-6 ~ 0.016 (measured: 0.003-0.006).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters

TOLERANCE = 8 * 2.0**-9

METHODS = {
    "no-dropout": lambda: ds.NoDropout(seed=0),
    "dropout-1": lambda: ds.DropoutK(1, seed=0),
    "dropout-4-batch": lambda: ds.DropoutK(4, implementation="batch", seed=0),
    "dropout-2-difference": lambda: ds.DropoutK(2, noise="difference", seed=0),
    "dropout-2-analytic": lambda: ds.DropoutK(2, noise="analytic", seed=0),
    "analytic-double-backward": lambda: ds.Analytic(seed=0),
    "analytic-jvp": lambda: ds.Analytic(gradient="jvp", seed=0),
    "analytic-hvp-difference": lambda: ds.Analytic(gradient="hvp-difference", seed=0),
    "analytic-finite-difference": lambda: ds.Analytic(gradient="finite-difference", seed=0),
    "r-drop": lambda: ds.RDrop(0.5, seed=0),
    "fraternal": lambda: ds.Fraternal(0.1, seed=0),
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.d1 = nn.Linear(16, 64), ds.Dropout(0.3)
        self.l2, self.d2 = nn.Linear(64, 64), ds.Dropout(0.3)
        self.l3 = nn.Linear(64, 5)

    def forward(self, x):
        return self.l3(self.d2(F.gelu(self.l2(self.d1(F.gelu(self.l1(x)))))))


def forward(model, batch):
    x, y = batch
    return model(x), y


@pytest.fixture
def float32():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


def gradient(model, method, batch, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        method.step(model, forward, batch)
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


@pytest.mark.parametrize("name", list(METHODS))
def test_autocast_gradient_is_the_float32_gradient_to_bfloat16_rounding(name, float32):
    torch.manual_seed(0)
    model, batch = MLP(), (torch.randn(64, 16), torch.randint(0, 5, (64,)))
    full = gradient(model, METHODS[name](), batch, autocast=False)
    mixed = gradient(model, METHODS[name](), batch, autocast=True)
    assert mixed.dtype == torch.float32
    assert float((mixed - full).norm() / full.norm()) < TOLERANCE


class InnerAutocast(MLP):
    """What accelerate's mixed precision makes of a model: autocast inside forward, float32 out."""

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(x).float()


@pytest.mark.parametrize("gradient", ["hvp-difference", "finite-difference"])
def test_an_autocast_inside_the_forward_is_refused_not_silently_wrong(gradient, float32):
    torch.manual_seed(0)
    model, batch = InnerAutocast(), (torch.randn(8, 16), torch.randint(0, 5, (8,)))
    with pytest.raises(ValueError, match="inside the model's forward"):
        ds.Analytic(gradient=gradient, seed=0).step(model, forward, batch)
