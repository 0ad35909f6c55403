"""Right on real models, the core's part: no dropout outside the sites, buffers moved once per
step, masks replayed under gradient checkpointing, unbiased half-precision masks, eval mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import dropsplit as ds
from dropsplit.core.forward import trainable_parameters
from dropsplit.core.unsited import UnsitedDropoutError

METHODS = {
    "no-dropout": lambda: ds.NoDropout(seed=1),
    "dropout-1": lambda: ds.DropoutK(1, seed=1),
    "dropout-2-difference": lambda: ds.DropoutK(2, noise="difference", seed=1),
    "dropout-2-analytic": lambda: ds.DropoutK(2, noise="analytic", seed=1),
    "analytic-double-backward": lambda: ds.Analytic(seed=1),
    "analytic-hvp-difference": lambda: ds.Analytic(gradient="hvp-difference", seed=1),
    "analytic-jvp": lambda: ds.Analytic(gradient="jvp", seed=1),
    "analytic-finite-difference": lambda: ds.Analytic(gradient="finite-difference", seed=1),
    "r-drop": lambda: ds.RDrop(0.5, seed=1),
    "fraternal": lambda: ds.Fraternal(0.1, seed=1),
}


def forward(model, batch):
    x, y = batch
    return model(x), y


def gradient(model, method, batch):
    model.zero_grad(set_to_none=True)  # step() adds to p.grad
    method.step(model, forward, batch)
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


# --- no dropout outside the sites -------------------------------------------------------------


class FunctionalDropout(nn.Module):
    """A sited MLP whose hidden layer also calls F.dropout itself (a leftover, unsited dropout)."""

    def __init__(self, p_functional=0.1):
        super().__init__()
        self.l1, self.site, self.head = nn.Linear(4, 6), ds.Dropout(0.2), nn.Linear(6, 3)
        self.p_functional = p_functional

    def forward(self, x):
        h = F.dropout(torch.tanh(self.l1(x)), self.p_functional, self.training)
        return self.head(self.site(h))


class Attention(nn.Module):
    """Self-attention through fused sdpa (its own dropout_p), a site on the output."""

    def __init__(self, dropout_p=0.0):
        super().__init__()
        self.qkv, self.site, self.head = nn.Linear(4, 12), ds.Dropout(0.2), nn.Linear(4, 3)
        self.dropout_p = dropout_p

    def forward(self, x):  # x: [B, L, 4]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=True)
        return self.head(self.site(a)).reshape(-1, 3)


class DropPath(nn.Module):
    """Stands in for timm's DropPath (the guard knows it by class name and ``drop_prob``)."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


def test_functional_dropout_is_an_error_naming_the_module():
    torch.manual_seed(0)
    model, batch = FunctionalDropout(), (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    for method in METHODS.values():
        with pytest.raises(UnsitedDropoutError, match=r"dropout\(p=0.1\) called by \(root\)"):
            method().step(model, forward, batch)
    with pytest.raises(UnsitedDropoutError, match=r"called by \(root\)"):
        ds.explicit_gap(model, forward, batch, samples=2)


def test_dropout_that_does_not_act_is_allowed():
    torch.manual_seed(0)
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    ds.DropoutK(1, seed=0).step(FunctionalDropout(p_functional=0.0), forward, batch)
    model = FunctionalDropout().eval()  # F.dropout(training=False) is the identity
    ds.NoDropout(seed=0).step(model, forward, batch)


def test_attention_dropout_in_sdpa_is_an_error():
    torch.manual_seed(0)
    batch = (torch.randn(2, 5, 4), torch.randint(0, 3, (10,)))
    with pytest.raises(UnsitedDropoutError, match="scaled_dot_product_attention"):
        ds.DropoutK(1, seed=0).step(Attention(dropout_p=0.1), forward, batch)


@pytest.mark.parametrize(
    "module",
    [nn.LSTM(4, 4, num_layers=2, dropout=0.2), DropPath(0.1)],
    ids=["lstm-inter-layer", "drop-path"],
)
def test_dropout_inside_a_module_is_an_error_before_the_pass(module):
    model = nn.Sequential(module, ds.Dropout(0.1))
    with pytest.raises(UnsitedDropoutError, match=r"0 \((LSTM|DropPath), p=0.[12]\)"):
        with ds.site_context(model, ds.SiteContext("off")):
            pass


# --- fused attention under double backward ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_double_backward_through_sdpa_runs_on_the_math_kernel(dtype):
    torch.manual_seed(0)
    model = Attention().to(dtype)
    batch = (torch.randn(2, 5, 4, dtype=dtype), torch.randint(0, 3, (10,)))
    exact = gradient(model, ds.Analytic(seed=3), batch)
    assert torch.isfinite(exact).all() and exact.norm() > 0
    # the same quantity without the fused kernel anywhere, as an independent path
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        reference = gradient(model, ds.Analytic(seed=3), batch)
    torch.testing.assert_close(exact, reference)


# --- the model is left as it was ------------------------------------------------------------------


class ConvBN(nn.Module):
    """conv + BatchNorm + channel dropout site + linear head."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.site, self.head = ds.Dropout(0.3, shared_dims=(2, 3)), nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.head(self.site(torch.relu(self.bn(self.conv(x)))).flatten(1))


def conv_batch():
    torch.manual_seed(0)
    return torch.randn(6, 2, 4, 4), torch.randint(0, 4, (6,))


def buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize(
    "measure",
    [
        lambda m, b: ds.explicit_gap(m, forward, b, samples=9, seed=0),
        lambda m, b: ds.explicit_regularizer(m, forward, b, "sampled", samples=3, seed=0),
        lambda m, b: ds.gradient_noise(m, forward, b, samples=3, seed=0),
    ],
    ids=["explicit-gap", "explicit-regularizer", "gradient-noise"],
)
def test_measurements_leave_every_buffer_unchanged(measure):
    torch.manual_seed(0)
    model, batch = ConvBN(), conv_batch()
    before = buffers(model)
    measure(model, batch)
    for name, value in buffers(model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_step_moves_batchnorm_once(name):
    torch.manual_seed(0)
    model, batch = ConvBN(), conv_batch()
    METHODS[name]().step(model, forward, batch)
    assert int(model.bn.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "name", ["no-dropout", "analytic-double-backward", "analytic-hvp-difference"]
)
def test_clean_first_pass_moves_batchnorm_as_a_clean_forward(name):
    """Methods whose real pass is clean move the statistics as one clean train-mode forward."""
    torch.manual_seed(0)
    model, batch = ConvBN(), conv_batch()
    reference = ConvBN()
    reference.load_state_dict(model.state_dict())
    with ds.site_context(reference, ds.SiteContext("off")):
        reference(batch[0])
    METHODS[name]().step(model, forward, batch)
    for key, value in buffers(reference).items():
        torch.testing.assert_close(buffers(model)[key], value, msg=key)


def test_methods_refuse_a_model_in_eval_mode():
    torch.manual_seed(0)
    model, batch = ConvBN().eval(), conv_batch()
    with pytest.raises(ValueError, match="eval mode"):
        ds.DropoutK(1, seed=0).step(model, forward, batch)
    ds.NoDropout(seed=0).step(model, forward, batch)  # a clean step is defined in either mode


# --- gradient checkpointing -----------------------------------------------------------------------


class Blocks(nn.Module):
    """Three tanh blocks with a site each, optionally checkpointed block by block."""

    def __init__(self, checkpoint_kwargs=None):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(6, 6), nn.Tanh(), ds.Dropout(0.3)) for _ in range(3)
        )
        self.head = nn.Linear(6, 4)
        self.checkpoint_kwargs = checkpoint_kwargs

    def forward(self, x):
        for block in self.blocks:
            kwargs = self.checkpoint_kwargs
            x = block(x) if kwargs is None else checkpoint(block, x, **kwargs)
        return self.head(x)


def checkpointed_pair(kwargs):
    torch.manual_seed(0)
    plain, recomputed = Blocks(), Blocks(kwargs)
    recomputed.load_state_dict(plain.state_dict())
    return plain, recomputed, (torch.randn(8, 6), torch.randint(0, 4, (8,)))


@pytest.mark.parametrize("name", list(METHODS))
def test_checkpointing_with_replayed_masks_gives_the_same_gradient(name):
    plain, recomputed, batch = checkpointed_pair(ds.checkpoint_kwargs())
    expected = gradient(plain, METHODS[name](), batch)
    torch.testing.assert_close(gradient(recomputed, METHODS[name](), batch), expected)


def test_checkpointing_without_replay_is_a_clear_error():
    _, recomputed, batch = checkpointed_pair({"use_reentrant": False})
    with pytest.raises(RuntimeError, match="replay_masks"):
        ds.DropoutK(1, seed=0).step(recomputed, forward, batch)


def test_plain_dropout_training_under_checkpointing_replays_by_itself():
    """Outside a method a site draws from the global RNG, which checkpointing restores."""
    plain, recomputed, batch = checkpointed_pair({"use_reentrant": False})
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(5)
        x, y = batch
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])


# --- masks in every dtype -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_masks_are_unbiased(dtype):
    n, q = 4_000_000, 0.1
    torch.manual_seed(0)
    dropped = float((ds.Dropout(q)(torch.ones(n, dtype=dtype)) == 0).double().mean())
    assert abs(dropped - q) < 4 * (q * (1 - q) / n) ** 0.5


def test_full_precision_masks_are_the_draws_they_always_were():
    """Float32 / float64 masks still compare a uniform of their own dtype (runs reproduce)."""
    for dtype in (torch.float32, torch.float64):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        mask = ds.sample_multiplier((50,), 0.4, g1, dtype)
        expected = (torch.rand(50, generator=g2, dtype=dtype) >= 0.4).to(dtype) / 0.6
        torch.testing.assert_close(mask, expected, rtol=0, atol=0)
