"""torch.compile: a compiled model gives every method the eager gradient (same draws); passes
differentiated twice run the eager module behind the compiled wrapper."""

import pytest
import torch
from torch import nn

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters

METHODS = {
    "dropout-1": lambda: ds.DropoutK(1, seed=0),
    "no-dropout": lambda: ds.NoDropout(seed=0),
    "dropout-2-difference": lambda: ds.DropoutK(2, noise="difference", seed=0),
    "r-drop": lambda: ds.RDrop(0.5, seed=0),
    "analytic-hvp-difference": lambda: ds.Analytic(gradient="hvp-difference", seed=0),
    "analytic-finite-difference": lambda: ds.Analytic(gradient="finite-difference", seed=0),
    "analytic-double-backward": lambda: ds.Analytic(seed=0),
    "analytic-jvp": lambda: ds.Analytic(gradient="jvp", seed=0),
}
# one backward through compiled graphs: their kernels round differently from eager in float32,
# and a difference estimator divides that rounding by its step (1e-3)
TOLERANCE = {"analytic-hvp-difference": 1e-3, "analytic-finite-difference": 1e-4}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.site, self.l2 = nn.Linear(8, 16), ds.Dropout(0.3), nn.Linear(16, 4)

    def forward(self, x):
        return self.l2(self.site(torch.tanh(self.l1(x))))


def forward(model, batch):
    x, y = batch
    return model(x), y


def gradient(model, method, batch):
    model.zero_grad(set_to_none=True)
    method.step(model, forward, batch)
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


@pytest.fixture(scope="module")
def pair():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    eager, inner = Net(), Net()
    inner.load_state_dict(eager.state_dict())
    batch = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
    torch.set_default_dtype(previous)
    return eager, torch.compile(inner), batch


@pytest.mark.parametrize("name", list(METHODS))
def test_compiled_model_gives_the_eager_gradient(pair, name):
    eager, compiled, batch = pair
    expected = gradient(eager, METHODS[name](), batch)
    got = gradient(compiled, METHODS[name](), batch)
    tolerance = TOLERANCE.get(name, 1e-6)
    assert float((got - expected).norm() / expected.norm()) < tolerance


def test_compiled_submodule_under_double_backward_is_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(torch.compile(nn.Linear(8, 16)), ds.Dropout(0.3), nn.Linear(16, 4))
    batch = (torch.randn(8, 8), torch.randint(0, 4, (8,)))
    with pytest.raises(ValueError, match="compiled submodules"):
        ds.Analytic(seed=0).step(model, forward, batch)
